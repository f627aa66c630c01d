#!lua name=presence
--[[
presence: the atomic core of the presence service, as a Redis Functions library.

Load it with:   redis-cli -x FUNCTION LOAD REPLACE < lua/presence.lua
Every key a function touches is passed in KEYS; no key is built here. Per-user keys
share the hash tag {appId:userId}, so one user's keys live in one cluster slot.
Time always comes from the server's TIME.

Argument layout (4.0.0): the functions that write inbox entries (presence_login, presence_logout,
presence_set_custom_status, presence_fanout) all take the inbox options first:
  ARGV[1] inbox MAXLEN (exact) ARGV[2] inbox TTL ms   ARGV[3] doorbell channel prefix ('' = no PUBLISH)
and the user's own functions (login, logout, set_custom_status) go on with the same five:
  ARGV[4] outbox MAXLEN (~)  ARGV[5] outbox TTL ms  (used only with the change feed KEYS)
  ARGV[6] appId              ARGV[7] userId         ARGV[8] operation id (a login's: its connId)
Their replies share one layout (a status change):
  {changed 0|1, pack JSON, version, online 1|2, inbox last id, kicked count, recipient userIds...}
  pack: the 4004 data (login, logout) or the 4006 data (set_custom_status), '' when a logout
  changed nothing; version: the user's version the pack carries (0 with no pack); online: 1 while
  the user has a live session, else 2; inbox last id: the newest entry of the user's inbox before the
  call's own entries, '0-0' with no inbox (login only: where the new session starts; '' from the others); kicked: sessions the login kicked (0 from
  the others); recipients: the friends and live subscribers to fan the pack out to (none when
  changed = 0).

Versions: every change of a user (session or custom status) moves the user's version (field
`version` of the status HASH) forward by one, atomically with the change, and every pack of that
user (4004, 4005, 4006, 4007) carries it as "version". presence_fanout keeps, per recipient, the
newest version it wrote for each (command, user) (the recipient's `pushed` HASH) and skips an older
or equal one, so a recipient's last entry for a user is always the newest state, whatever order
the fan-outs run in, and a repeated fan-out writes nothing twice.

Unknown outcomes: a change call carries an operation id (the login's connId for a login). When a
call is repeated after a timeout and its operation is one of the user's last LIMITS.recentOps (field
`ops`, even with later changes after it), nothing is applied again: the reply is rebuilt from the
CURRENT stored state (changed = 1), so the caller fans out the newest state, which converges.

Inbox entries (per-user STREAM) have the fields:
  c  command (4004, 4005, 4006, 4007, 9002)
  d  data, the JSON of the pack
  x  connection id to skip (sync entries skip the session that caused them)  [optional]
  t  the only connection id to deliver to (kicks)                            [optional]
A doorbell is PUBLISHed to <channel prefix><brokerId> with the inbox keys that got
entries as a JSON array of strings, once per gateway node per call. An empty
channel prefix (presence_fanout on a cluster) publishes nothing: the reply names the
nodes, and the caller rings each gateway once for all the slots of one change.

On a Redis Cluster every call must name keys of one slot: operations over several
users are split by the caller into one call per slot, each idempotent.

Identifiers (the rule of presence/ids.py): a userId is 1..LIMITS.userIdBytes bytes, an imei
1..LIMITS.imeiBytes bytes, both valid UTF-8 without control characters (C0, DEL, C1), U+2028,
U+2029 or '|'; a userId also without '{' or '}'.

Integer arguments are decimal digits as Redis reads them (optional '-', no leading zero, no '+',
fraction or exponent), at most 2^53 - 1; a MAXLEN or TTL is >= 0 unless said otherwise. Every function
checks all its ARGV before its first write.
Errors start with PRESENCE_PARAM (a bad argument; the call changed nothing) or PRESENCE_LIMIT (a
per-user limit is reached; the call changed nothing). presence/functions.py maps them to ParamError
(90001) and LimitError (90005); any other error is Redis's own (a system error).
]]

local VERSION = '4.1.3'

-- The library's limits. presence/limits.py holds the same values (tests/test_limits.py compares
-- them with presence_limits and probes each one), so Python refuses what the library would refuse.
local LIMITS = {
  userIdBytes = 64,
  imeiBytes = 128,
  customTextBytes = 100,
  subTimeMs = 2592000000, -- 30 days
  maxSessions = 10, -- presence_login's default when ARGV[15] is absent
  recentOps = 16, -- operation ids remembered per user (repeats of them are replays)
}
local LIMIT_NAMES = {'userIdBytes', 'imeiBytes', 'customTextBytes', 'subTimeMs', 'maxSessions', 'recentOps'}
local DEFAULT_OUTBOX_MAXLEN = 1000
local DEFAULT_OUTBOX_TTL = 86400000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function param_error(msg)
  return redis.error_reply('PRESENCE_PARAM ' .. msg)
end

-- The identifier rule of presence/ids.py, on bytes: valid UTF-8, 1..most bytes, no control
-- character (C0, DEL, C1), no U+2028/U+2029, none of the characters in `banned` (a pattern set).
local function valid_id(s, most, banned)
  if type(s) ~= 'string' or #s < 1 or #s > most then return false end
  if string.find(s, '[%z\1-\31\127' .. banned .. ']') then return false end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    if c >= 0x80 then
      local c2, c3, c4 = string.byte(s, i + 1, i + 3)
      c2, c3, c4 = c2 or 0, c3 or 0, c4 or 0
      if c >= 0xC2 and c <= 0xDF then
        if c2 < 0x80 or c2 > 0xBF or (c == 0xC2 and c2 <= 0x9F) then return false end -- C1 controls
        i = i + 1
      elseif c >= 0xE0 and c <= 0xEF then
        local lo, hi = 0x80, 0xBF
        if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end -- overlong; surrogates
        if c2 < lo or c2 > hi or c3 < 0x80 or c3 > 0xBF then return false end
        if c == 0xE2 and c2 == 0x80 and (c3 == 0xA8 or c3 == 0xA9) then return false end -- U+2028/9
        i = i + 2
      elseif c >= 0xF0 and c <= 0xF4 then
        local lo, hi = 0x80, 0xBF
        if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
        if c2 < lo or c2 > hi or c3 < 0x80 or c3 > 0xBF or c4 < 0x80 or c4 > 0xBF then return false end
        i = i + 3
      else
        return false
      end
    end
    i = i + 1
  end
  return true
end

local USER_ID_RULE = '1..' .. LIMITS.userIdBytes .. ' bytes of UTF-8 without control characters, | { }'
local IMEI_RULE = '1..' .. LIMITS.imeiBytes .. ' bytes without control characters or |'

-- A gateway node id: what a session records as its brokerId (presence/config.py's node_id rule).
local function valid_node_id(s)
  return type(s) == 'string' and s ~= '' and #s <= 100 and not string.find(s, '[^%w%._:-]')
end
local function valid_user_id(u) return valid_id(u, LIMITS.userIdBytes, '|{}') end
local function valid_imei(s) return valid_id(s, LIMITS.imeiBytes, '|') end

-- Looser: ids stored before the identifier rule still log out (no ghost sessions after an upgrade).
local function stored_user_id(u)
  return type(u) == 'string' and #u >= 1 and #u <= LIMITS.userIdBytes and not string.find(u, '[|{}]')
end
local STORED_ID_RULE_ERROR = 'userIds must be 1..' .. LIMITS.userIdBytes .. ' bytes without | { }'

-- A subscription set lives as long as its latest entry, so no such key outlives what it holds.
local function expire_with_latest(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIREAT', key, math.floor(tonumber(top[2]))) end
end

local function to_int(v)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) then return nil end
  return n
end

--[[ Arguments. Every function checks all its ARGV before its first write (a refused call changes
nothing). An integer argument is decimal digits as Redis itself reads an integer (an optional '-',
no leading zero, no '+', exponent, fraction, 'inf' or spaces: tonumber alone takes all of those), so
what passes here also passes where it is handed on to Redis (PEXPIRE, XADD MAXLEN); and at most
MAX_INT, the integers a Lua number holds exactly. ]]
local MAX_INT = 9007199254740991 -- 2^53 - 1

local function int_text(n) return string.format('%d', n) end

-- ARGV[i] as an integer in min..max; `default` when it is absent or '' (without a default it is
-- required). Else nil and the PRESENCE_PARAM error: '<name> must be <rule>' (rule: 'an integer in
-- min..max' unless given).
local function arg_int(args, i, name, min, max, default, rule)
  local s = args[i]
  if default ~= nil and (s == nil or s == '') then return default end
  local n = type(s) == 'string' and #s <= 17 and string.find(s, '^-?[1-9]%d*$') and tonumber(s)
  if s == '0' then n = 0 end
  if not n or n < min or n > max then
    return nil, param_error(name .. ' must be ' .. (rule or ('an integer in ' .. int_text(min) .. '..' .. int_text(max))))
  end
  return n
end

-- Several integer ARGV at once: each spec is {i, field, name, min, max, default, rule}; the values go
-- to into[field]. Returns nil, or the error of the first bad one.
local function arg_ints(args, specs, into)
  for _, spec in ipairs(specs) do
    local n, err = arg_int(args, spec[1], spec[3], spec[4], spec[5], spec[6], spec[7])
    if err then return err end
    into[spec[2]] = n
  end
  return nil
end

--[[ JSON: every JSON object the library writes (stored sessions, the packs of 4004/4005/4006/4007
and 9002, a login's kicked devices, presence_query's reply) comes from json_object, so its bytes
(field order, number format) are defined once. Clients, the gateway and presence/models.py read
them. ]]
local RAW = {} -- marks a value that is JSON already (stored session records, stored numbers)
local function raw(text) return {[RAW] = text} end
local NULL = raw('null')

-- An object from a flat list {name, value, name, value, ...}, names in that order. A value is a
-- number (an integer written in full: Lua's own format turns 1e14 and more into 1e+14), a string
-- (JSON-encoded) or raw(json).
local function json_object(fields)
  local parts = {}
  for i = 1, #fields, 2 do
    local value = fields[i + 1]
    local kind = type(value)
    if kind == 'string' then
      value = cjson.encode(value)
    elseif kind == 'table' then
      value = value[RAW]
    elseif value == math.floor(value) then
      value = string.format('%d', value)
    end
    parts[#parts + 1] = cjson.encode(fields[i]) .. ':' .. value
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

local function json_list(items)
  return raw('[' .. table.concat(items, ',') .. ']')
end

-- One stored session (a value of the sessions HASH; presence/models.py Session).
local function session_json(app_id, user_id, ct, imei, broker_id, broker_host, version, login_time, conn_id)
  return json_object({'appId', app_id, 'userId', user_id, 'clientType', ct, 'imei', imei, 'connectState', 1,
    'brokerId', broker_id, 'brokerHost', broker_host, 'version', version, 'loginTime', login_time,
    'connId', conn_id})
end

-- A string field of a stored session (brokerId, connId), read without decoding the whole record:
-- session_json writes it as "name":"value", which the pattern finds unless the value needed an
-- escape (brokerId never does: it is [A-Za-z0-9._:-]); then the record is decoded.
local SESSION_STRING = {brokerId = '"brokerId":"([^"\\]*)"', connId = '"connId":"([^"\\]*)"'}
local function session_string(record, name)
  local value = string.match(record, SESSION_STRING[name])
  if value then return value end
  local ok, decoded = pcall(cjson.decode, record)
  if ok and type(decoded) == 'table' and type(decoded[name]) == 'string' then return decoded[name] end
  return nil
end

-- 4004/4005 data (UserStatusChangeNotifyPack): the user's live sessions; and online 1|2.
local function status_pack(app_id, user_id, session_values, version)
  local online = 2
  if #session_values > 0 then online = 1 end
  return json_object({'appId', app_id, 'userId', user_id, 'status', online, 'client', json_list(session_values),
    'version', version}), online
end

-- 4006/4007 data (UserCustomStatusChangeNotifyPack).
local function custom_pack(user_id, custom, text, version)
  return json_object({'userId', user_id, 'customStatus', custom, 'customText', text, 'version', version})
end

-- 9002 data (KickPack): the login that displaced the kicked connection.
local function kick_pack(app_id, user_id, ct, imei)
  return json_object({'appId', app_id, 'userId', user_id, 'clientType', ct, 'imei', imei})
end

--[[ Inbox removals. Every entry an inbox loses goes through inbox_drop_through, which removes the
oldest entries up to and including `last`: XTRIM the ones before it, XDEL `last` itself. Redis
records an XDEL in XINFO STREAM's max-deleted-entry-id but not a trim (XTRIM or XADD MAXLEN leave it
at 0-0, 7.0 on), so the inbox itself tells a resume the newest entry it lost: a cursor before it
missed something (presence/inbox.py, Inboxes.can_resume). Entries only ever go oldest first. ]]
local function inbox_drop_through(inbox, last, more)
  if more then redis.call('XTRIM', inbox, 'MINID', last) end
  redis.call('XDEL', inbox, last)
end

-- Append one entry to an inbox, drop the oldest beyond keep (a checked integer >= 0; exactly: the
-- drop is recorded) and refresh its expiry; returns the entry id.
local function inbox_add(inbox, keep, ttl_ms, command, data, skip, target)
  local id
  if target then
    id = redis.call('XADD', inbox, '*', 'c', command, 'd', data, 't', target)
  elseif skip then
    id = redis.call('XADD', inbox, '*', 'c', command, 'd', data, 'x', skip)
  else
    id = redis.call('XADD', inbox, '*', 'c', command, 'd', data)
  end
  -- A kick (a targeted entry) drops nothing: a same-device reconnect writes one for its dead predecessor
  -- right before it resumes, and it must not push out a push the device missed. The next entry trims.
  local excess = 0
  if not target then excess = redis.call('XLEN', inbox) - keep end
  if excess > 0 then
    local oldest = redis.call('XRANGE', inbox, '-', '+', 'COUNT', excess)
    inbox_drop_through(inbox, oldest[#oldest][1], excess > 1)
  end
  redis.call('PEXPIRE', inbox, ttl_ms)
  return id
end

-- One doorbell per node, naming the inboxes with new entries.
local function ring(channel_prefix, by_node)
  local n = 0
  if channel_prefix == nil or channel_prefix == '' then return 0 end
  for node, inboxes in pairs(by_node) do
    redis.call('PUBLISH', channel_prefix .. node, cjson.encode(inboxes))
    n = n + 1
  end
  return n
end

local function add_nodes(by_node, session_values, inbox)
  for _, v in ipairs(session_values) do
    local node = session_string(v, 'brokerId')
    if node then
      local list = by_node[node]
      if list == nil then
        by_node[node] = {inbox}
      elseif list[#list] ~= inbox then
        list[#list + 1] = inbox
      end
    end
  end
end

-- Friends plus live subscribers (expired ones pruned first), without the user itself.
local function recipients(friends_key, subscribers_key, user_id, now)
  redis.call('ZREMRANGEBYSCORE', subscribers_key, '-inf', now)
  local seen = {[user_id] = true}
  local out = {}
  for _, f in ipairs(redis.call('SMEMBERS', friends_key)) do
    if not seen[f] then seen[f] = true; out[#out + 1] = f end
  end
  for _, s in ipairs(redis.call('ZRANGE', subscribers_key, 0, -1)) do
    if not seen[s] then seen[s] = true; out[#out + 1] = s end
  end
  return out
end

-- The reply of the user's own functions (the layout in the header above). Recipients only when
-- something changed: then the caller fans the pack out to them.
local function change_reply(changed, pack, version, online, last, kicked, who)
  local reply = {changed, pack, version, online, last, kicked}
  if changed == 1 and who then
    for _, r in ipairs(who) do reply[#reply + 1] = r end
  end
  return reply
end

-- The user's version after a change (moved atomically with it), recording the change's operation id.
local function next_version(status, op_id)
  if op_id ~= nil and op_id ~= '' and not string.find(op_id, '%s') then
    local kept = {op_id}
    for o in string.gmatch(redis.call('HGET', status, 'ops') or '', '%S+') do
      if #kept >= LIMITS.recentOps then break end
      if o ~= op_id then kept[#kept + 1] = o end
    end
    redis.call('HSET', status, 'op', op_id, 'ops', table.concat(kept, ' '))
  else
    redis.call('HDEL', status, 'op')
  end
  return redis.call('HINCRBY', status, 'version', 1)
end

local function stored_version(status)
  return tonumber(redis.call('HGET', status, 'version') or '0')
end

-- Whether op_id is one of the user's recent changes (a repeat of a call whose reply was lost),
-- even when other changes came after it: a retry then applies nothing and replies the current state.
local function is_recent_op(status, op_id)
  if op_id == nil or op_id == '' then return false end
  local st = redis.call('HMGET', status, 'op', 'ops')
  if st[1] == op_id then return true end
  for o in string.gmatch(st[2] or '', '%S+') do
    if o == op_id then return true end
  end
  return false
end

local function last_id(inbox)
  local last = redis.call('XREVRANGE', inbox, '+', '-', 'COUNT', 1)
  if #last == 0 then return '0-0' end
  return last[1][1]
end

-- The change feed and the online counters (optional KEYS of the user's functions).
-- Feed entries go to the user's outbox STREAM (the user's slot, so atomic with the change);
-- the caller relays them to the app's feed shard with presence_feed_append. Fields (all strings):
--   event login|logout|status  appId  userId  clientType  imei  reason  status 1|2 (after the change)
--   sessions (live sessions after)  version (the user's version after the change, as in the packs)
--   time ms  [customStatus customText]  [kicked]
local function feed_add(outbox, maxlen, ttl_ms, fields)
  redis.call('XADD', outbox, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  redis.call('PEXPIRE', outbox, ttl_ms)
end

local function session_fields(event, app_id, user_id, ct, imei, reason, online, sessions, version, now)
  return {'event', event, 'appId', tostring(app_id), 'userId', user_id, 'clientType', tostring(ct),
    'imei', imei, 'reason', reason, 'status', tostring(online), 'sessions', tostring(sessions),
    'version', tostring(version), 'time', tostring(now)}
end

-- Online counters: one HASH per cluster slot (its hash tag shares the user's slot), fields
-- '<appId>:u' (users online) and '<appId>:s:<clientType>' (sessions of that client type).
local function count(counters, app_id, ct, sessions_delta, users_delta)
  if sessions_delta ~= 0 then redis.call('HINCRBY', counters, app_id .. ':s:' .. ct, sessions_delta) end
  if users_delta ~= 0 then redis.call('HINCRBY', counters, app_id .. ':u', users_delta) end
end

-- ARGV[1..2] of the functions that write inbox entries: the inbox MAXLEN (into.maxlen) and TTL
-- (checked; PEXPIRE gets ARGV[2] as given).
local INBOX_INTS = {{1, 'maxlen', 'inbox MAXLEN', 0, MAX_INT}, {2, 'ttl_checked', 'inbox TTL ms', 0, MAX_INT}}
-- ARGV[4..6] of the user's own functions: an outbox option absent or '' is its default.
local CHANGE_INTS = {
  {4, 'outbox_maxlen', 'outbox MAXLEN', 0, MAX_INT, DEFAULT_OUTBOX_MAXLEN},
  {5, 'outbox_ttl', 'outbox TTL ms', 0, MAX_INT, DEFAULT_OUTBOX_TTL},
  {6, 'app_id', 'appId', 1, 2147483647},
}

-- ARGV[1..8] of the user's own functions (the layout in the header above), checked; or an error.
local function change_args(name, keys, args, most_keys, most_args)
  if #keys ~= 5 and #keys ~= most_keys then
    return nil, param_error(name .. ' takes 5 or ' .. most_keys .. ' keys')
  end
  if #args > most_args then return nil, param_error(name .. ' takes at most ' .. most_args .. ' ARGV') end
  local c = {
    ttl = args[2], prefix = args[3], user_id = args[7], op_id = args[8] or '',
    sessions = keys[1], status = keys[2], subscribers = keys[3], inbox = keys[4], friends = keys[5],
    outbox = keys[6], counters = keys[7],
  }
  local err = arg_ints(args, INBOX_INTS, c) or arg_ints(args, CHANGE_INTS, c)
  if err then return nil, err end
  return c
end

-- Which existing session (client type old_ct) a new login (client type new_ct) kicks
-- under the app's multi-login model. WEBAPI (0) neither kicks nor is kicked.
local function kicks(model, new_ct, old_ct)
  if new_ct == 0 or old_ct == 0 then return false end
  if model == 1 then return true end
  if model == 2 then return new_ct ~= 1 and old_ct ~= 1 end
  if model == 3 then
    if new_ct == 1 or old_ct == 1 then return false end
    local function group(ct) if ct == 2 or ct == 3 then return 'mobile' end return 'desktop' end
    return group(new_ct) == group(old_ct)
  end
  return false
end

-- presence_login's ARGV[9..15] on top of change_args, checked; or an error.
local LOGIN_INTS = {
  {9, 'ct', 'clientType', 0, 5, nil, '0..5'},
  {13, 'client_version', 'client version', -MAX_INT, MAX_INT, 0},
  {14, 'model', 'loginModel', 1, 4, nil, '1..4'},
  {15, 'max_sessions', 'max sessions', 1, MAX_INT, LIMITS.maxSessions, 'at least 1'},
}
local function login_args(keys, args)
  local c, err = change_args('presence_login', keys, args, 7, 15)
  if c == nil then return nil, err end
  c.conn_id, c.imei, c.broker_id, c.broker_host = c.op_id, args[10], args[11] or '', args[12] or ''
  if not valid_user_id(c.user_id) then return nil, param_error('userId must be ' .. USER_ID_RULE) end
  err = arg_ints(args, LOGIN_INTS, c)
  if err then return nil, err end
  if not valid_imei(c.imei) then return nil, param_error('imei must be ' .. IMEI_RULE) end
  if #c.conn_id < 1 or string.find(c.conn_id, '"') then return nil, param_error('connId is required') end
  if string.find(c.broker_id, '[^%w%._:-]') then return nil, param_error('brokerId must be [A-Za-z0-9._:-]') end
  c.field = c.ct .. ':' .. c.imei
  return c
end

-- Who the login displaces, decided before anything is written (a refused login leaves no trace):
-- the same device on another connection (replaced, no change for others) and the sessions the
-- login model kicks; `remaining` sessions stay.
local function login_plan(c, existing)
  local plan = {kick = {}, remaining = 0, replaced = false, others = 0, before = #existing / 2}
  for i = 1, #existing, 2 do
    local f, v = existing[i], existing[i + 1]
    if f == c.field then
      plan.replaced = true
      if session_string(v, 'connId') ~= c.conn_id then plan.kick[#plan.kick + 1] = {f, v, false} end
    else
      local old_ct = to_int(string.match(f, '^(%d+):'))
      if old_ct and kicks(c.model, c.ct, old_ct) then
        plan.kick[#plan.kick + 1] = {f, v, true}
        plan.others = plan.others + 1
      else
        plan.remaining = plan.remaining + 1
      end
    end
  end
  return plan
end

-- Removes the kicked sessions of other devices (with their feed entry and counters) and tells every
-- kicked connection (9002, to that connection only). Returns the kicked devices' JSON for the feed.
local function kick_sessions(c, plan, version, now, by_node)
  local kicked_json, live = {}, plan.before
  for _, k in ipairs(plan.kick) do
    if k[3] then
      redis.call('HDEL', c.sessions, k[1])
      live = live - 1
      if c.outbox then
        local kct = to_int(string.match(k[1], '^(%d+):'))
        local kimei = string.match(k[1], '^%d+:(.*)$')
        count(c.counters, c.app_id, kct, -1, 0)
        feed_add(c.outbox, c.outbox_maxlen, c.outbox_ttl, session_fields('logout', c.app_id, c.user_id, kct,
          kimei, 'kicked', 1, live, version, now))
        kicked_json[#kicked_json + 1] = json_object({'clientType', kct, 'imei', kimei})
      end
    end
    inbox_add(c.inbox, c.maxlen, c.ttl, 9002, kick_pack(c.app_id, c.user_id, c.ct, c.imei), nil,
      session_string(k[2], 'connId'))
    add_nodes(by_node, {k[2]}, c.inbox)
  end
  return kicked_json
end

-- The login's feed entry (after the kicked devices' own) and the counters it moves.
local function login_feed(c, plan, version, now, kicked_json)
  if not plan.replaced then count(c.counters, c.app_id, c.ct, 1, plan.before == 0 and 1 or 0) end
  local fields = session_fields('login', c.app_id, c.user_id, c.ct, c.imei, 'login', 1,
    redis.call('HLEN', c.sessions), version, now)
  -- the devices this login kicked (their own 'kicked' entries came just before), as Tencent's KickedDevice
  fields[#fields + 1] = 'kicked'
  fields[#fields + 1] = json_list(kicked_json)[RAW]
  feed_add(c.outbox, c.outbox_maxlen, c.outbox_ttl, fields)
end

--[[ presence_login
KEYS[1] sessions HASH     KEYS[2] status HASH   KEYS[3] subscribers ZSET
KEYS[4] inbox STREAM      KEYS[5] friends SET
Optional (the change feed and online counters; both or neither):
KEYS[6] the user's outbox STREAM   KEYS[7] the online counters HASH of the user's slot
ARGV[1] inbox MAXLEN  ARGV[2] inbox TTL ms  ARGV[3] doorbell channel prefix
ARGV[4] outbox MAXLEN  ARGV[5] outbox TTL ms  ARGV[6] appId  ARGV[7] userId
ARGV[8] connId (the new session's connection; also the login's operation id)
ARGV[9] clientType 0..5  ARGV[10] imei  ARGV[11] brokerId (the gateway node; [A-Za-z0-9._:-])
ARGV[12] brokerHost  ARGV[13] client version  ARGV[14] loginModel 1..4
ARGV[15] most live sessions of the user, WEBAPI included (optional, default LIMITS.maxSessions)
  With KEYS[6..7], a login that changed something appends a 'logout' entry (reason kicked) per
  kicked session, then a 'login' entry (field kicked: JSON list of {clientType, imei} it kicked), to
  the outbox, and moves the counters.
Reply: a status change {changed, 4004 data, version, online 1, inbox last id, kicked, recipients...}
  A repeat of a login whose session (same connId) is still stored applies nothing: changed = 1 and
  the current state, for the caller to fan out. changed = 0 when the login only replaced the same
  device's session (a reconnect): nobody is told, friends see no second "online". Kicked sessions
  (same device on another connection, or the login model's conflicts) are removed and get a 9002
  entry. The new session's other sessions get a 4005 entry (skipping the new connection).
Errors: PRESENCE_PARAM for a key count other than 5 or 7, an inbox or outbox MAXLEN or TTL that is
  not an integer >= 0 (the outbox ones may be '': defaults), an appId outside 1..2147483647, a non-integer client version, a
  userId or imei breaking the identifier rule, clientType outside 0..5, an empty connId or one with '"', a brokerId
  outside [A-Za-z0-9._:-], loginModel outside 1..4, max sessions below 1.
  PRESENCE_LIMIT when the login would make more live sessions than ARGV[15]: the new login is
  refused and nothing is written (existing sessions are never kicked for it).
]]
local function presence_login(keys, args)
  local c, err = login_args(keys, args)
  if c == nil then return err end
  local now = now_ms()

  -- A repeat (the first reply was lost): the session is there; tell the caller the current state.
  local mine = redis.call('HGET', c.sessions, c.field)
  if mine and session_string(mine, 'connId') == c.conn_id then
    local version = stored_version(c.status)
    local pack, online = status_pack(c.app_id, c.user_id, redis.call('HVALS', c.sessions), version)
    return change_reply(1, pack, version, online, last_id(c.inbox), 0, recipients(c.friends, c.subscribers, c.user_id, now))
  end

  local plan = login_plan(c, redis.call('HGETALL', c.sessions))
  if plan.remaining + 1 > c.max_sessions then
    return redis.error_reply('PRESENCE_LIMIT ' .. c.user_id .. ' already has ' .. plan.remaining ..
      ' live sessions, the most per user is ' .. c.max_sessions)
  end
  -- Only the same device coming back (a reconnect) is no change for anybody else: it keeps the
  -- version others hold. Otherwise the version moves once, for the login and the kicks it causes.
  local changed = 1
  if plan.replaced and plan.others == 0 then changed = 0 end
  -- Where the new session starts: before this login's own entries (kicks, 4005), none of which is for
  -- it; '0-0' when there is no inbox, so a resume from an older id is refused (it may have been trimmed).
  local start = last_id(c.inbox)
  local version
  if changed == 1 then
    version = next_version(c.status, c.conn_id)
  else
    redis.call('HSET', c.status, 'op', c.conn_id)
    version = stored_version(c.status)
  end
  local by_node = {}
  local kicked_json = kick_sessions(c, plan, version, now, by_node)
  redis.call('HSET', c.sessions, c.field, session_json(c.app_id, c.user_id, c.ct, c.imei, c.broker_id,
    c.broker_host, c.client_version, now, c.conn_id))
  redis.call('HSET', c.status, 'lastSeen', now)
  if c.outbox and changed == 1 then login_feed(c, plan, version, now, kicked_json) end

  local values = redis.call('HVALS', c.sessions)
  local pack, online = status_pack(c.app_id, c.user_id, values, version)
  if changed == 1 and #values > 1 then
    inbox_add(c.inbox, c.maxlen, c.ttl, 4005, pack, c.conn_id, nil)
    add_nodes(by_node, values, c.inbox)
  elseif redis.call('EXISTS', c.inbox) == 1 then
    redis.call('PEXPIRE', c.inbox, c.ttl)
  end
  ring(c.prefix, by_node)
  local who = nil
  if changed == 1 then who = recipients(c.friends, c.subscribers, c.user_id, now) end
  return change_reply(changed, pack, version, online, start, #plan.kick, who)
end

--[[ presence_logout
KEYS[1] sessions HASH     KEYS[2] status HASH   KEYS[3] subscribers ZSET
KEYS[4] inbox STREAM      KEYS[5] friends SET
Optional (the change feed and online counters; both or neither):
KEYS[6] the user's outbox STREAM   KEYS[7] the online counters HASH of the user's slot
ARGV[1] inbox MAXLEN  ARGV[2] inbox TTL ms  ARGV[3] doorbell channel prefix
ARGV[4] outbox MAXLEN  ARGV[5] outbox TTL ms  ARGV[6] appId  ARGV[7] userId
ARGV[8] operation id ('' = none)
ARGV[9] clientType  ARGV[10] imei
ARGV[11] connId: remove only if the session still belongs to this connection ('' = any)
ARGV[12] reason, for the feed entry (logout|close|timeout|reaped|kicked|shutdown|error|...; '' = logout)
ARGV[13] TTL ms of the inbox once the last session is gone (undelivered kicks drain)
ARGV[14] evidence age ms: the user was last seen this long before now (optional, default 0)
ARGV[15] evidence time ms on the server's clock (optional, 0 = use ARGV[14]); never later than now
Reply: a status change {changed, 4004 data, version, online, '', 0, recipients...}
  changed = 0 (pack '', version 0) when the session is gone or belongs to a newer connection: a
  late logout never removes a newer login of the same device. A repeat of one of the user's recent
  operations (ARGV[8]) applies nothing and replies changed = 1 with the current state. lastSeen
  becomes the later of its stored value and the evidence. The user's other sessions get a 4005
  entry (skipping ARGV[11]).
Errors: PRESENCE_PARAM for a key count other than 5 or 7, ARGV[1..5] as presence_login's, a
  an appId outside 1..2147483647, a userId that is not 1..LIMITS.userIdBytes bytes without | { } (ids stored
  before the identifier rule still log out), a missing clientType or imei, clientType outside 0..5,
  an offline inbox TTL that is not an integer >= 0, an evidence age or time that is not '' or an
  integer >= 0.
]]
local LOGOUT_INTS = {
  {9, 'ct', 'clientType', 0, 5, nil, '0..5'},
  {13, 'offline_ttl', 'the offline inbox TTL ms', 0, MAX_INT},
  {14, 'age', 'evidence age ms', 0, MAX_INT, 0},
  {15, 'seen_at', 'evidence time ms', 0, MAX_INT, 0},
}
local function presence_logout(keys, args)
  local c, err = change_args('presence_logout', keys, args, 7, 15)
  if c == nil then return err end
  local imei, conn_id = args[10], args[11] or ''
  if not stored_user_id(c.user_id) then
    return param_error('userId must be 1..' .. LIMITS.userIdBytes .. ' bytes without | { }')
  end
  if args[9] == nil or imei == nil then return param_error('clientType and imei are required') end
  err = arg_ints(args, LOGOUT_INTS, c)
  if err then return err end
  local ct, age, seen_at, offline_ttl = c.ct, c.age, c.seen_at, args[13]
  local reason = args[12]
  if reason == nil or reason == '' then reason = 'logout' end
  local now = now_ms()

  if is_recent_op(c.status, c.op_id) then
    local version = stored_version(c.status)
    local pack, online = status_pack(c.app_id, c.user_id, redis.call('HVALS', c.sessions), version)
    return change_reply(1, pack, version, online, '', 0, recipients(c.friends, c.subscribers, c.user_id, now))
  end

  local field = ct .. ':' .. imei
  local current = redis.call('HGET', c.sessions, field)
  if not current or (conn_id ~= '' and session_string(current, 'connId') ~= conn_id) then
    local online = 2
    if redis.call('HLEN', c.sessions) > 0 then online = 1 end
    return change_reply(0, '', 0, online, '', 0, nil)
  end

  redis.call('HDEL', c.sessions, field)
  local version = next_version(c.status, c.op_id)
  local seen = now - age
  if seen_at > 0 then seen = math.min(seen_at, now) end
  local before = to_int(redis.call('HGET', c.status, 'lastSeen'))
  if before == nil or before < seen then redis.call('HSET', c.status, 'lastSeen', seen) end
  local values = redis.call('HVALS', c.sessions)
  local pack, online = status_pack(c.app_id, c.user_id, values, version)
  if c.outbox then
    count(c.counters, c.app_id, ct, -1, #values == 0 and -1 or 0)
    feed_add(c.outbox, c.outbox_maxlen, c.outbox_ttl, session_fields('logout', c.app_id, c.user_id, ct, imei,
      reason, online, #values, version, now))
  end
  if #values == 0 then
    if redis.call('EXISTS', c.inbox) == 1 then redis.call('PEXPIRE', c.inbox, offline_ttl) end
  else
    inbox_add(c.inbox, c.maxlen, c.ttl, 4005, pack, conn_id ~= '' and conn_id or nil, nil)
    local by_node = {}
    add_nodes(by_node, values, c.inbox)
    ring(c.prefix, by_node)
  end
  return change_reply(1, pack, version, online, '', 0, recipients(c.friends, c.subscribers, c.user_id, now))
end

--[[ presence_set_custom_status
KEYS[1] sessions HASH     KEYS[2] status HASH   KEYS[3] subscribers ZSET
KEYS[4] inbox STREAM      KEYS[5] friends SET
Optional (the change feed): KEYS[6] the user's outbox STREAM
ARGV[1] inbox MAXLEN  ARGV[2] inbox TTL ms  ARGV[3] doorbell channel prefix
ARGV[4] outbox MAXLEN  ARGV[5] outbox TTL ms  ARGV[6] appId  ARGV[7] userId
ARGV[8] operation id ('' = none)
ARGV[9] customStatus (integer)  ARGV[10] customText (<= LIMITS.customTextBytes bytes)
ARGV[11] origin connId ('' = none: every session of the user gets the 4007 sync)
  With KEYS[6] it appends a 'status' entry (clientType 0, imei and reason '') with customStatus
  and customText.
Reply: a status change {1, 4006 data, version, online, '', 0, recipients...}
  A repeat of one of the user's recent operations (ARGV[8], even after later changes) applies
  nothing and replies the current state. The user's sessions but the origin get a 4007 entry.
Errors: PRESENCE_PARAM for a key count other than 5 or 6, ARGV[1..5] as presence_login's, a
  an appId outside 1..2147483647, a userId breaking the identifier rule, a non-integer customStatus, a customText over LIMITS.customTextBytes bytes.
]]
local function presence_set_custom_status(keys, args)
  local c, err = change_args('presence_set_custom_status', keys, args, 6, 11)
  if c == nil then return err end
  local text, origin = args[10] or '', args[11] or ''
  if not valid_user_id(c.user_id) then return param_error('userId must be ' .. USER_ID_RULE) end
  local custom
  custom, err = arg_int(args, 9, 'customStatus', -MAX_INT, MAX_INT)
  if err then return err end
  if #text > LIMITS.customTextBytes then
    return param_error('customText must be at most ' .. LIMITS.customTextBytes .. ' bytes')
  end
  local now = now_ms()
  if is_recent_op(c.status, c.op_id) then
    local st = redis.call('HMGET', c.status, 'customStatus', 'customText')
    local version = stored_version(c.status)
    local online = 2
    if redis.call('HLEN', c.sessions) > 0 then online = 1 end
    return change_reply(1, custom_pack(c.user_id, to_int(st[1]) or custom, st[2] or text, version), version,
      online, '', 0, recipients(c.friends, c.subscribers, c.user_id, now))
  end
  redis.call('HSET', c.status, 'customStatus', custom, 'customText', text, 'customAt', now)
  local version = next_version(c.status, c.op_id)
  local pack = custom_pack(c.user_id, custom, text, version)
  local values = redis.call('HVALS', c.sessions)
  local online = 2
  if #values > 0 then online = 1 end
  if c.outbox then
    local fields = session_fields('status', c.app_id, c.user_id, 0, '', '', online, #values, version, now)
    fields[#fields + 1] = 'customStatus'; fields[#fields + 1] = tostring(custom)
    fields[#fields + 1] = 'customText'; fields[#fields + 1] = text
    feed_add(c.outbox, c.outbox_maxlen, c.outbox_ttl, fields)
  end
  local others = #values
  if origin ~= '' then others = others - 1 end
  if others > 0 then
    inbox_add(c.inbox, c.maxlen, c.ttl, 4007, pack, origin ~= '' and origin or nil, nil)
    local by_node = {}
    add_nodes(by_node, values, c.inbox)
    ring(c.prefix, by_node)
  end
  return change_reply(1, pack, version, online, '', 0, recipients(c.friends, c.subscribers, c.user_id, now))
end

--[[ presence_fanout
KEYS: recipient triples  sessions_1, inbox_1, pushed_1, sessions_2, inbox_2, pushed_2, ...
  (one slot on a cluster); without ARGV[6..7], pairs  sessions_1, inbox_1, ...  (no ordering)
ARGV[1] inbox MAXLEN  ARGV[2] inbox TTL ms
ARGV[3] doorbell channel prefix ('' = publish nothing, name the nodes in the reply)
ARGV[4] command (4004 | 4006 | 4010 ...)  ARGV[5] data JSON
ARGV[6] the changed user's id   ARGV[7] its version (the one in ARGV[5])
Reply: {entries written, doorbells published}, and when ARGV[3] is '':
  {entries written, 0, node id, {inbox keys}, node id, {inbox keys}, ...}
  Only recipients with an online session get an entry: offline users pull on connect.
  A recipient whose pushed HASH already holds this version or a newer one for (command, user)
  gets nothing: the newest state is never followed by an older one. Safe to repeat.
Errors: PRESENCE_PARAM for an ARGV count other than 5 or 7 (the count alone picks pairs or triples),
  an inbox MAXLEN or TTL that is not an integer >= 0, a command that is not a positive integer, a
  changed userId that is not 1..LIMITS.userIdBytes bytes without | { }, a version that is not an
  integer >= 0, or when the keys are not whole triples (pairs with 5 ARGV).
]]
local FANOUT_INTS = {{4, 'command', 'command', 1, MAX_INT}}
local FANOUT_VERSION = {{7, 'version', 'version', 0, MAX_INT}}
local function presence_fanout(keys, args)
  -- The mode comes from the ARGV count alone: a bad version is an error, never pairs mode.
  if #args ~= 5 and #args ~= 7 then
    return param_error('presence_fanout takes inbox options, a command and data (5 ARGV), then a userId and version (7)')
  end
  local o = {}
  local err = arg_ints(args, INBOX_INTS, o) or arg_ints(args, FANOUT_INTS, o)
  if err then return err end
  local maxlen, ttl, prefix, command, data = o.maxlen, args[2], args[3], args[4], args[5]
  local subject, version, step = args[6], nil, 2
  if #args == 7 then
    if not stored_user_id(subject) then return param_error('the changed userId must be 1..' .. LIMITS.userIdBytes .. ' bytes without | { }') end
    err = arg_ints(args, FANOUT_VERSION, o)
    if err then return err end
    version, step = o.version, 3
  end
  if #keys % step ~= 0 then return param_error('presence_fanout takes sessions/inbox(/pushed) key groups') end
  local field = command .. ':' .. (subject or '')
  local by_node = {}
  local written = 0
  for i = 1, #keys, step do
    local values = redis.call('HVALS', keys[i])
    local fresh = #values > 0
    if fresh and step == 3 then
      local seen = to_int(redis.call('HGET', keys[i + 2], field))
      fresh = seen == nil or seen < version
      if fresh then
        redis.call('HSET', keys[i + 2], field, version)
        redis.call('PEXPIRE', keys[i + 2], ttl)
      end
    end
    if fresh then
      inbox_add(keys[i + 1], maxlen, ttl, command, data, nil, nil)
      add_nodes(by_node, values, keys[i + 1])
      written = written + 1
    end
  end
  local reply = {written, ring(prefix, by_node)}
  if prefix == nil or prefix == '' then
    for node, inboxes in pairs(by_node) do
      reply[#reply + 1] = node
      reply[#reply + 1] = inboxes
    end
  end
  return reply
end

--[[ presence_subscribe  (the subscriber's side)
KEYS[1] the subscriber's subscriptions ZSET (reverse index)
ARGV[1] subscriber userId  ARGV[2] subTime ms (1 .. LIMITS.subTimeMs, relative)
ARGV[3] most live subscriptions per subscriber  ARGV[4..] target userIds
Reply: {expireAt ms, live subscriptions after the call}
  Subscribing again overwrites the expiry. Expired entries are pruned first. Then the
  caller runs presence_subscribers_add with this expireAt on the targets' keys (per slot):
  pushes start once that ran; repeating both converges. The reverse index
  expires (PEXPIREAT) with its latest entry.
Errors: PRESENCE_PARAM for a key count other than 1, no target, a subscriber or target breaking the
  identifier rule, the subscriber among the targets, subTime out of range, a limit that is not a
  positive integer, and when the call would make more live subscriptions than ARGV[3] (nothing is
  written then, not even the pruning of expired entries).
]]
local SUBSCRIBE_INTS = {
  {2, 'sub_time', 'subTime', 1, LIMITS.subTimeMs, nil, 'between 1 and ' .. LIMITS.subTimeMs .. ' ms'},
  {3, 'limit', 'limit', 1, MAX_INT, nil, 'a positive integer'},
}
local function presence_subscribe(keys, args)
  local subscriber, o = args[1], {}
  local n = #args - 3
  if #keys ~= 1 or n < 1 then return param_error('presence_subscribe takes 1 key and at least one target') end
  if not valid_user_id(subscriber) then return param_error('subscriber userId must be ' .. USER_ID_RULE) end
  local err = arg_ints(args, SUBSCRIBE_INTS, o)
  if err then return err end
  local limit = o.limit
  local now = now_ms()
  local expire_at = now + o.sub_time
  local index = keys[1]
  -- Counted as after pruning the expired entries, which happens only once the call is accepted.
  local fresh = {}
  local added = 0
  for i = 1, n do
    local target = args[i + 3]
    if not valid_user_id(target) then return param_error('subUserId must be ' .. USER_ID_RULE) end
    if target == subscriber then return param_error('subUserId must not contain the subscriber itself') end
    if not fresh[target] then
      local score = redis.call('ZSCORE', index, target)
      if not score or tonumber(score) <= now then added = added + 1 end
    end
    fresh[target] = true
  end
  local live = redis.call('ZCOUNT', index, '(' .. now, '+inf') + added
  if live > limit then
    return param_error('at most ' .. limit .. ' live subscriptions per user, this call would make ' .. live)
  end
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  for i = 1, n do
    redis.call('ZADD', index, expire_at, args[i + 3])
  end
  expire_with_latest(index)
  return {expire_at, live}
end

--[[ presence_subscriptions  (no-writes)
KEYS[1] the subscriber's subscriptions ZSET
ARGV[1] most entries to return
Reply: {now ms, target userId, expireAt ms, target userId, expireAt ms, ...}: the live subscriptions,
  the soonest to expire first (expired entries are left for the next write to prune)
Errors: PRESENCE_PARAM for a key count other than 1 or a limit that is not a positive integer.
]]
local function presence_subscriptions(keys, args)
  if #keys ~= 1 or #args ~= 1 then return param_error('presence_subscriptions takes 1 key and a limit') end
  local limit, err = arg_int(args, 1, 'limit', 1, MAX_INT)
  if err then return err end
  local now = now_ms()
  local reply = {now}
  local live = redis.call('ZRANGE', keys[1], '(' .. now, '+inf', 'BYSCORE', 'LIMIT', 0, limit, 'WITHSCORES')
  for i = 1, #live, 2 do
    reply[#reply + 1] = live[i]
    reply[#reply + 1] = math.floor(tonumber(live[i + 1]))
  end
  return reply
end

--[[ presence_subscribers_add  (the targets' side of presence_subscribe)
KEYS[1..n] each target's subscribers ZSET  (one slot on a cluster)
ARGV[1] subscriber userId   ARGV[2] expireAt ms (absolute: the presence_subscribe reply)
Reply: number of subscribers ZSETs the subscriber was new in
  Expired entries are pruned first. Idempotent: a repeat sets the same score. Every set
  written expires (PEXPIREAT) with its latest entry, so subscriptions to users who never
  come online leave no key behind.
Errors: PRESENCE_PARAM without keys, with other than 2 ARGV, a subscriber breaking the identifier
  rule, an expireAt that is not a positive integer.
]]
local function presence_subscribers_add(keys, args)
  local subscriber = args[1]
  if #keys < 1 or #args ~= 2 then return param_error('presence_subscribers_add takes keys, a subscriber and expireAt') end
  if not valid_user_id(subscriber) then return param_error('subscriber userId must be ' .. USER_ID_RULE) end
  local expire_at, err = arg_int(args, 2, 'expireAt', 1, MAX_INT, nil, 'a positive integer')
  if err then return err end
  local now = now_ms()
  local added = 0
  for i = 1, #keys do
    redis.call('ZREMRANGEBYSCORE', keys[i], '-inf', now)
    added = added + redis.call('ZADD', keys[i], expire_at, subscriber)
    expire_with_latest(keys[i])
  end
  return added
end

--[[ presence_unsubscribe  (the subscriber's side)
KEYS[1] the subscriber's subscriptions ZSET   ARGV[1] subscriber userId   ARGV[2..] target userIds
Reply: number of subscriptions removed
  Then the caller runs presence_subscribers_remove on the targets' keys (per slot).
Errors: PRESENCE_PARAM for a key count other than 1, no target, a subscriber or target that is not
  1..LIMITS.userIdBytes bytes without | { }.
]]
local function presence_unsubscribe(keys, args)
  if #keys ~= 1 or #args < 2 then return param_error('presence_unsubscribe takes 1 key and at least one target') end
  -- The looser rule of stored ids: subscriptions stored before the identifier rule still go.
  for i = 1, #args do
    if not stored_user_id(args[i]) then return param_error(STORED_ID_RULE_ERROR) end
  end
  local removed = 0
  for i = 2, #args do
    removed = removed + redis.call('ZREM', keys[1], args[i])
  end
  return removed
end

--[[ presence_subscribers_remove  (the targets' side of presence_unsubscribe)
KEYS[1..n] each target's subscribers ZSET  (one slot on a cluster)   ARGV[1] subscriber userId
Reply: number of subscribers ZSETs the subscriber was removed from
Errors: PRESENCE_PARAM without keys, with other than 1 ARGV, or a subscriber that is not
  1..LIMITS.userIdBytes bytes without | { }.
]]
local function presence_subscribers_remove(keys, args)
  if #keys < 1 or #args ~= 1 then return param_error('presence_subscribers_remove takes keys and a subscriber') end
  if not stored_user_id(args[1]) then return param_error(STORED_ID_RULE_ERROR) end
  local removed = 0
  for i = 1, #keys do
    removed = removed + redis.call('ZREM', keys[i], args[1])
  end
  return removed
end

local function friends_change(keys, args, op)
  local n = #keys
  if n < 1 or #args ~= 2 * n then return param_error('friend functions take a (userId, friendId) pair per key') end
  for i = 1, n do
    local owner, friend = args[2 * i - 1], args[2 * i]
    if not valid_user_id(owner) then return param_error('fromId must be ' .. USER_ID_RULE) end
    if not valid_user_id(friend) then return param_error('toId must be ' .. USER_ID_RULE) end
    if owner == friend then return param_error('toId must differ from fromId') end
  end
  local changed = 0
  for i = 1, n do
    changed = changed + redis.call(op, keys[i], args[2 * i])
  end
  return changed
end

--[[ presence_friends_add
KEYS[i] the friends SET of user ARGV[2i-1]   (one slot on a cluster; a key may repeat)
ARGV[2i-1] that user's id   ARGV[2i] the friend's userId to add to it
Reply: number of friends added (pairs already present count 0: a repeat converges)
  A friendship is mutual: the caller adds (a, b) in a's slot, then (b, a) in b's slot,
  one call per slot (one call for everything on a single server).
Errors: PRESENCE_PARAM without keys, without exactly one pair per key, for an id breaking the
  identifier rule, or a user paired with itself (nothing is written then).
]]
local function presence_friends_add(keys, args) return friends_change(keys, args, 'SADD') end

--[[ presence_friends_remove
KEYS and ARGV as presence_friends_add.   Reply: number of friends removed
Errors: as presence_friends_add.
]]
local function presence_friends_remove(keys, args) return friends_change(keys, args, 'SREM') end

--[[ presence_query  (no-writes)
KEYS: pairs  sessions_1, status_1, sessions_2, status_2, ...  (one slot on a cluster)
ARGV: userIds, in KEYS order
Reply: one JSON object {userId: {session: [...], customStatus, customText, status 1|2, lastSeen, version}}
  customStatus/customText/lastSeen are null when never set; version is 0 before the first change.
Errors: PRESENCE_PARAM unless there is a sessions/status key pair per userId.
]]
local function presence_query(keys, args)
  if #keys ~= 2 * #args then return param_error('presence_query takes a sessions/status key pair per userId') end
  local users = {}
  for i = 1, #args do
    local values = redis.call('HVALS', keys[2 * i - 1])
    local st = redis.call('HMGET', keys[2 * i], 'customStatus', 'customText', 'lastSeen', 'version')
    local online = 2
    if #values > 0 then online = 1 end
    users[#users + 1] = args[i]
    users[#users + 1] = raw(json_object({'session', json_list(values), 'customStatus', st[1] and raw(st[1]) or NULL,
      'customText', st[2] or NULL, 'status', online, 'lastSeen', st[3] and raw(st[3]) or NULL,
      'version', raw(st[4] or '0')}))
  end
  return json_object(users)
end

--[[ presence_query_raw  (no-writes; what the facade calls: presence_query's data without building JSON)
KEYS: pairs  sessions_1, status_1, sessions_2, status_2, ...  (one slot on a cluster)
ARGV: none (the caller knows the users, in KEYS order)
Reply: per user, in KEYS order, 5 items: {session JSON...}, customStatus, customText, lastSeen,
  version (nil when never set). Building the JSON object in Lua was most of presence_query's time.
Errors: PRESENCE_PARAM unless the keys are whole pairs and ARGV is empty.
]]
local function presence_query_raw(keys, args)
  if #keys % 2 ~= 0 or #args ~= 0 then return param_error('presence_query_raw takes sessions/status key pairs and no ARGV') end
  local reply, n, call = {}, 0, redis.call
  for i = 1, #keys, 2 do
    local st = call('HMGET', keys[i + 1], 'customStatus', 'customText', 'lastSeen', 'version')
    reply[n + 1] = call('HVALS', keys[i])
    reply[n + 2], reply[n + 3], reply[n + 4], reply[n + 5] = st[1], st[2], st[3], st[4]
    n = n + 5
  end
  return reply
end

-- A stream entry id <ms>-<seq>, each part at most MAX_INT (formatted back exactly by next_id).
local function parse_id(id)
  if type(id) ~= 'string' then return nil end
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms or #ms > 16 or #seq > 16 then return nil end
  ms, seq = tonumber(ms), tonumber(seq)
  if ms > MAX_INT or seq >= MAX_INT then return nil end
  return {ms, seq}
end

-- The smallest id after a parsed one.
local function next_id(p) return string.format('%d-%d', p[1], p[2] + 1) end

local function id_after(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2]) end

--[[ presence_feed_append  (the relay step of the change feed)
KEYS[1] the app's feed shard STREAM   KEYS[2] the user's relay cursor STRING (same slot as KEYS[1])
KEYS[3] the user's outbox STREAM (optional; only where it may share the call: one server)
ARGV[1] feed MAXLEN (~)  ARGV[2] cursor TTL ms
ARGV[3..] entries in outbox order: outbox id, field count n, then n field and value strings
Reply: {entries appended, the cursor after the call}
  Entries whose outbox id is not after the cursor were appended before (a retry, or a concurrent
  relay of the same user) and are skipped: the shard gets each entry of a user once while the cursor
  lives, in outbox order. With KEYS[3] the relayed entries are also trimmed from the outbox (else the
  caller runs presence_outbox_trim on the outbox afterwards).
Errors: PRESENCE_PARAM for a key count other than 2 or 3, a MAXLEN or TTL that is not a positive
  integer, an entry that is not (id, an even field count >= 2, fields); all entries are checked
  before the first is appended.
]]
-- An emptied outbox is kept a minute, not deleted: a stream remembers its last id, so the user's
-- next entry (maybe in the same millisecond) still gets an id after the relay cursor.
local EMPTY_OUTBOX_TTL = 60000
local FEED_INTS = {{1, 'maxlen', 'feed MAXLEN', 1, MAX_INT}, {2, 'ttl', 'cursor TTL ms', 1, MAX_INT}}
local function presence_feed_append(keys, args)
  if #keys ~= 2 and #keys ~= 3 then return param_error('presence_feed_append takes 2 or 3 keys') end
  local o = {}
  local err = arg_ints(args, FEED_INTS, o)
  if err then return err end
  local maxlen, ttl = o.maxlen, o.ttl
  -- Every entry is checked before the first XADD: {parsed id, first field index, field count}.
  local entries = {}
  local i = 3
  while i <= #args do
    local parsed, n = parse_id(args[i]), arg_int(args, i + 1, 'field count', 2, #args - i - 1)
    if parsed == nil or n == nil or n % 2 ~= 0 then return param_error('entries are: outbox id, field count, fields') end
    entries[#entries + 1] = {parsed, i + 2, n}
    i = i + 2 + n
  end
  local cursor_text = redis.call('GET', keys[2]) or '0-0'
  local cursor = parse_id(cursor_text) or {0, 0}
  local appended, last = 0, nil
  for _, e in ipairs(entries) do
    local parsed, first, n = e[1], e[2], e[3]
    if id_after(parsed, cursor) then
      redis.call('XADD', keys[1], 'MAXLEN', '~', maxlen, '*', unpack(args, first, first + n - 1))
      appended = appended + 1
      cursor, cursor_text = parsed, args[first - 2]
    end
    if last == nil or id_after(parsed, last) then last = parsed end
  end
  if appended > 0 then redis.call('SET', keys[2], cursor_text, 'PX', ttl) end
  if keys[3] and last then
    redis.call('XTRIM', keys[3], 'MINID', next_id(last))
    if redis.call('XLEN', keys[3]) == 0 then redis.call('PEXPIRE', keys[3], EMPTY_OUTBOX_TTL) end
  end
  return {appended, cursor_text}
end

--[[ presence_outbox_trim
KEYS[1] the user's outbox STREAM   ARGV[1] the last relayed outbox id
Reply: entries left in the outbox (an empty outbox expires a minute later)
Errors: PRESENCE_PARAM for a key count other than 1 or an entry id that is not <ms>-<seq>.
]]
local function presence_outbox_trim(keys, args)
  local last = parse_id(args[1])
  if #keys ~= 1 or #args ~= 1 or last == nil then return param_error('presence_outbox_trim takes 1 key and an entry id') end
  redis.call('XTRIM', keys[1], 'MINID', next_id(last))
  local left = redis.call('XLEN', keys[1])
  if left == 0 then redis.call('PEXPIRE', keys[1], EMPTY_OUTBOX_TTL) end
  return left
end

--[[ presence_inbox_trim  (the gateway, for inboxes whose local sessions all received everything)
KEYS[1] inbox STREAM
ARGV[1] resume window ms (>= 1)   ARGV[2] the last entry id every local session of the user received
Reply: entries left
  Drops the entries up to ARGV[2] that are older than the window (by their id, Redis clock): a client
  reconnecting within the window still resumes from any id it saw. The newest entry dropped is
  recorded (inbox_drop_through), so a device that had not received it (its session detached, another
  device's cursor trimmed) is told to pull. An inbox left empty is deleted (its last id is older than
  the window, so the next entry's id is still after every cursor; a missing inbox never resumes).
  Another gateway with sessions of the user has read these entries unless it stalled for longer than
  the window, and a window longer than node_ttl means such a gateway was reaped: its clients reconnect
  and re-pull.
Errors: PRESENCE_PARAM for a key count other than 1, a window below 1 ms, an entry id that is not
  <ms>-<seq>.
]]
local function presence_inbox_trim(keys, args)
  local window, upto = arg_int(args, 1, 'window', 1, MAX_INT), parse_id(args[2])
  -- A window of at least 1 ms keeps a deleted inbox's last id before any id the next entry can get.
  if #keys ~= 1 or #args ~= 2 or window == nil or upto == nil then
    return param_error('presence_inbox_trim takes 1 key, a window of at least 1 ms and an entry id')
  end
  local horizon = now_ms() - window
  local min_id = string.format('%d-0', horizon)
  if upto[1] <= horizon then min_id = next_id(upto) end
  local last = {}  -- the newest to go (none when the window reaches back before the epoch)
  if horizon > 0 or upto[1] <= horizon then last = redis.call('XREVRANGE', keys[1], '(' .. min_id, '-', 'COUNT', 1) end
  if #last > 0 then inbox_drop_through(keys[1], last[1][1], true) end
  local left = redis.call('XLEN', keys[1])
  if left == 0 then redis.call('DEL', keys[1]) end
  return left
end


--[[ presence_node_heartbeat
KEYS[1] nodes ZSET (node id -> last beat ms)
KEYS[2] incarnations HASH (node id -> incarnation of its last beat; same slot as KEYS[1])  [optional]
ARGV[1] node id
ARGV[2] incarnation: a random id of the beating process  [with KEYS[2] only]
ARGV[3] a claim: the last beat (ms, 0 = not registered) this beat must replace; when another one is
        there, nothing is written  [optional, after ARGV[2] only]
Reply: {1 if the node was already registered else 0, now ms, previous beat ms (0 when not registered),
        previous incarnation ('' when not registered, or none was recorded), 1 if written else 0}
  0 after the first beat means a reaper logged this node's sessions out meanwhile. A previous
  incarnation other than ARGV[2] means another process beats the same node id. A starting process
  claims the node id with the beat it read before (ARGV[3]): another one means a live process beat it.
  Without KEYS[2] (callers before 4.1) no incarnation is read or written.
Errors: PRESENCE_PARAM for a key count other than 1 or 2, more than 3 ARGV, a node id that is not
  1..100 of [A-Za-z0-9._:-] (the brokerId rule), KEYS[2] without an incarnation (or an incarnation without
  KEYS[2]), or an ARGV[3] that is not an integer >= 0.
]]
local function presence_node_heartbeat(keys, args)
  local node, incarnation, claim = args[1], args[2], args[3]
  if (#keys ~= 1 and #keys ~= 2) or #args > 3 or not valid_node_id(node)
      or (#keys == 2) ~= (incarnation ~= nil and incarnation ~= '') then
    return param_error('presence_node_heartbeat takes 1 key and a node id, or 2 keys, a node id and an incarnation')
  end
  if claim ~= nil then
    claim = arg_int(args, 3, 'claim', 0, MAX_INT)
    if claim == nil or #keys ~= 2 then
      return param_error('presence_node_heartbeat: a claim is the last beat in ms, after an incarnation')
    end
  end
  local now = now_ms()
  local was = redis.call('ZSCORE', keys[1], node)
  local previous_ms = was and tonumber(was) or 0
  local previous = ''
  if #keys == 2 and was then previous = redis.call('HGET', keys[2], node) or '' end
  if claim ~= nil and claim ~= previous_ms then
    return {was and 1 or 0, now, previous_ms, previous, 0}
  end
  if #keys == 2 then redis.call('HSET', keys[2], node, incarnation) end
  redis.call('ZADD', keys[1], now, node)
  return {was and 1 or 0, now, previous_ms, previous, 1}
end

--[[ presence_nodes_expired  (no-writes)
KEYS[1] nodes ZSET   ARGV[1] node TTL ms
Reply: ids of nodes whose last heartbeat is older than the TTL
Errors: PRESENCE_PARAM for a key count other than 1 or a TTL that is not an integer >= 0.
]]
local function presence_nodes_expired(keys, args)
  local ttl = arg_int(args, 1, 'TTL', 0, MAX_INT)
  if #keys ~= 1 or #args ~= 1 or ttl == nil then return param_error('presence_nodes_expired takes 1 key and a TTL in ms') end
  return redis.call('ZRANGEBYSCORE', keys[1], '-inf', string.format('(%d', now_ms() - ttl))
end

--[[ presence_version  (no-writes)
KEYS: none   ARGV: none   Reply: the library version string
Errors: none.
]]
local function presence_version() return VERSION end

--[[ presence_limits  (no-writes)
KEYS: none   ARGV: none
Reply: {name, value, name, value, ...}: the library's limits (LIMITS above), in this order:
  userIdBytes, imeiBytes, customTextBytes, subTimeMs, maxSessions (presence_login's default),
  recentOps (operation ids remembered per user)
Errors: none.
]]
local function presence_limits()
  local reply = {}
  for _, name in ipairs(LIMIT_NAMES) do
    reply[#reply + 1] = name
    reply[#reply + 1] = LIMITS[name]
  end
  return reply
end

redis.register_function('presence_login', presence_login)
redis.register_function('presence_logout', presence_logout)
redis.register_function('presence_set_custom_status', presence_set_custom_status)
redis.register_function('presence_fanout', presence_fanout)
redis.register_function('presence_subscribe', presence_subscribe)
redis.register_function('presence_subscribers_add', presence_subscribers_add)
redis.register_function('presence_unsubscribe', presence_unsubscribe)
redis.register_function{function_name = 'presence_subscriptions', callback = presence_subscriptions, flags = {'no-writes'}}
redis.register_function('presence_subscribers_remove', presence_subscribers_remove)
redis.register_function('presence_friends_add', presence_friends_add)
redis.register_function('presence_friends_remove', presence_friends_remove)
redis.register_function{function_name = 'presence_query', callback = presence_query, flags = {'no-writes'}}
redis.register_function('presence_feed_append', presence_feed_append)
redis.register_function('presence_outbox_trim', presence_outbox_trim)
redis.register_function('presence_inbox_trim', presence_inbox_trim)
redis.register_function{function_name = 'presence_query_raw', callback = presence_query_raw, flags = {'no-writes'}}
redis.register_function('presence_node_heartbeat', presence_node_heartbeat)
redis.register_function{function_name = 'presence_nodes_expired', callback = presence_nodes_expired, flags = {'no-writes'}}
redis.register_function{function_name = 'presence_version', callback = presence_version, flags = {'no-writes'}}
redis.register_function{function_name = 'presence_limits', callback = presence_limits, flags = {'no-writes'}}

#!lua name=presence
--[[
presence: the atomic core of the presence service, as a Redis Functions library.

Load it with:   redis-cli -x FUNCTION LOAD REPLACE < lua/presence.lua
Every key a function touches is passed in KEYS; no key is built here. Per-user keys
share the hash tag {appId:userId}, so one user's keys live in one cluster slot.
Time always comes from the server's TIME.

Versions: every change of a user (session or custom status) moves the user's version (field
`version` of the status HASH) forward by one, atomically with the change, and every pack of that
user (4004, 4005, 4006, 4007) carries it as "version". presence_fanout keeps, per recipient, the
newest version it wrote for each (command, user) (the recipient's `pushed` HASH) and skips an older
or equal one, so a recipient's last entry for a user is always the newest state, whatever order
the fan-outs run in, and a repeated fan-out writes nothing twice.

Unknown outcomes: a change call may carry an operation id (the login's connId for a login). When a
call is repeated after a timeout and its operation is one of the user's last 16 (field `ops`, even
with later changes after it), nothing is applied again: the reply is rebuilt from the CURRENT stored
state (changed = 1), so the caller fans out the newest state, which converges.

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

Identifiers (the rule of presence/ids.py): a userId is 1..64 bytes, an imei 1..128 bytes,
both valid UTF-8 without control characters (C0, DEL, C1), U+2028, U+2029 or '|'; a userId
also without '{' or '}'.

Errors start with PRESENCE_PARAM (bad argument), PRESENCE_LIMIT (a per-user limit is
reached) or PRESENCE_STATE (a conflict).
]]

local VERSION = '3.3.0'
local MAX_SUB_TIME = 2592000000 -- 30 days in ms
local MAX_CUSTOM_TEXT = 100 -- bytes
local DEFAULT_MAX_SESSIONS = 10

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

local function valid_user_id(u) return valid_id(u, 64, '|{}') end
local function valid_imei(s) return valid_id(s, 128, '|') end

-- Looser: ids stored before the identifier rule still log out (no ghost sessions after an upgrade).
local function stored_user_id(u)
  return type(u) == 'string' and #u >= 1 and #u <= 64 and not string.find(u, '[|{}]')
end

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

-- brokerId of a stored session JSON, read without decoding the whole record.
local function broker_of(session_json)
  return string.match(session_json, '"brokerId":"([^"]*)"')
end

local function connid_of(session_json)
  return string.match(session_json, '"connId":"([^"]*)"')
end

-- Append one entry to an inbox and refresh its expiry; returns the entry id.
local function inbox_add(inbox, maxlen, ttl_ms, command, data, skip, target)
  local id
  if target then
    id = redis.call('XADD', inbox, 'MAXLEN', '~', maxlen, '*', 'c', command, 'd', data, 't', target)
  elseif skip then
    id = redis.call('XADD', inbox, 'MAXLEN', '~', maxlen, '*', 'c', command, 'd', data, 'x', skip)
  else
    id = redis.call('XADD', inbox, 'MAXLEN', '~', maxlen, '*', 'c', command, 'd', data)
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
    local node = broker_of(v)
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

local function status_pack(app_id, user_id, session_values, version)
  local online = 2
  if #session_values > 0 then online = 1 end
  return '{"appId":' .. app_id .. ',"userId":' .. cjson.encode(user_id) .. ',"status":' .. online ..
    ',"client":[' .. table.concat(session_values, ',') .. '],"version":' .. version .. '}', online
end

local function custom_pack(user_id, custom, text, version)
  return '{"userId":' .. cjson.encode(user_id) .. ',"customStatus":' .. custom ..
    ',"customText":' .. cjson.encode(text) .. ',"version":' .. version .. '}'
end

-- How many of a user's latest operation ids are remembered: a retry behind fewer changes than
-- this is still known as a repeat (the ids live in the status HASH, so they expire with it).
local RECENT_OPS = 16

-- The user's version after a change (moved atomically with it), recording the change's operation id.
local function next_version(status, op_id)
  if op_id ~= nil and op_id ~= '' and not string.find(op_id, '%s') then
    local kept = {op_id}
    for o in string.gmatch(redis.call('HGET', status, 'ops') or '', '%S+') do
      if #kept >= RECENT_OPS then break end
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
--   time ms  [customStatus customText]
local function feed_add(outbox, maxlen, ttl_ms, fields)
  redis.call('XADD', outbox, 'MAXLEN', '~', to_int(maxlen) or 1000, '*', unpack(fields))
  redis.call('PEXPIRE', outbox, to_int(ttl_ms) or 86400000)
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

--[[ presence_login
KEYS[1] sessions HASH     KEYS[2] status HASH   KEYS[3] subscribers ZSET
KEYS[4] inbox STREAM      KEYS[5] friends SET
ARGV[1] appId  ARGV[2] userId  ARGV[3] clientType 0..5  ARGV[4] imei  ARGV[5] connId
ARGV[6] brokerId  ARGV[7] brokerHost  ARGV[8] version  ARGV[9] loginModel 1..4
ARGV[10] inbox MAXLEN  ARGV[11] inbox TTL ms  ARGV[12] doorbell channel prefix
ARGV[13] most live sessions of the user, WEBAPI included (optional, default 10)
Optional (the change feed and online counters; both or neither):
KEYS[6] the user's outbox STREAM   KEYS[7] the online counters HASH of the user's slot
ARGV[14] outbox MAXLEN  ARGV[15] outbox TTL ms
  A login that changed something appends a 'logout' entry (reason kicked) per kicked session,
  then a 'login' entry (field kicked: JSON list of {clientType, imei} it kicked), to the outbox,
  and moves the counters.
Reply: {changed 0|1, 4004 data JSON, inbox last id, kicked count, recipient userIds...}
  The 4004 data carries the user's version. A repeat of a login whose session (same connId) is
  still stored applies nothing: changed = 1 and the current state, for the caller to fan out.
  changed = 0 when the login only replaced the same device's session (a reconnect):
  nobody is told, friends see no second "online". Kicked sessions (same device on
  another connection, or the login model's conflicts) are removed and get a 9002 entry.
Errors: PRESENCE_LIMIT when the login would make more live sessions than ARGV[13]: the new
  login is refused and nothing is written (existing sessions are never kicked for it).
]]
local function presence_login(keys, args)
  if #keys ~= 5 and #keys ~= 7 then return param_error('presence_login takes 5 or 7 keys') end
  local app_id, user_id, imei, conn_id = to_int(args[1]), args[2], args[4], args[5]
  local ct, model = to_int(args[3]), to_int(args[9])
  local broker_id = args[6] or ''
  if app_id == nil then return param_error('appId must be an integer') end
  if not valid_user_id(user_id) then return param_error('userId must be 1..64 bytes of UTF-8 without control characters, | { }') end
  if ct == nil or ct < 0 or ct > 5 then return param_error('clientType must be 0..5') end
  if not valid_imei(imei) then return param_error('imei must be 1..128 bytes without control characters or |') end
  if conn_id == nil or #conn_id < 1 or string.find(conn_id, '"') then return param_error('connId is required') end
  if string.find(broker_id, '[^%w%._:-]') then return param_error('brokerId must be [A-Za-z0-9._:-]') end
  if model == nil or model < 1 or model > 4 then return param_error('loginModel must be 1..4') end
  local maxlen, ttl, prefix = args[10], args[11], args[12]
  local max_sessions = to_int(args[13]) or DEFAULT_MAX_SESSIONS
  if max_sessions < 1 then return param_error('max sessions must be at least 1') end

  local sessions, status, subscribers, inbox, friends = keys[1], keys[2], keys[3], keys[4], keys[5]
  local now = now_ms()
  local field = ct .. ':' .. imei
  local by_node = {}
  local kicked, kicked_others, replaced = 0, 0, false

  -- A repeat (the first reply was lost): the session is there; tell the caller the current state.
  local mine = redis.call('HGET', sessions, field)
  if mine and connid_of(mine) == conn_id then
    local values = redis.call('HVALS', sessions)
    local pack = status_pack(app_id, user_id, values, stored_version(status))
    local reply = {1, pack, last_id(inbox), 0}
    for _, r in ipairs(recipients(friends, subscribers, user_id, now)) do reply[#reply + 1] = r end
    return reply
  end

  -- Decide first, write after the session cap check: a refused login leaves no trace.
  local existing = redis.call('HGETALL', sessions)
  local to_kick, remaining = {}, 0
  for i = 1, #existing, 2 do
    local f, v = existing[i], existing[i + 1]
    if f == field then
      replaced = true
      if connid_of(v) ~= conn_id then to_kick[#to_kick + 1] = {f, v, false} end
    else
      local old_ct = to_int(string.match(f, '^(%d+):'))
      if old_ct and kicks(model, ct, old_ct) then
        to_kick[#to_kick + 1] = {f, v, true}
        kicked_others = kicked_others + 1
      else
        remaining = remaining + 1
      end
    end
  end
  if remaining + 1 > max_sessions then
    return redis.error_reply('PRESENCE_LIMIT ' .. user_id .. ' already has ' .. remaining ..
      ' live sessions, the most per user is ' .. max_sessions)
  end
  local outbox, counters = keys[6], keys[7]
  local before = #existing / 2
  local live = before
  -- Only the same device coming back (a reconnect) is no change for anybody else: it keeps the
  -- version others hold. Otherwise the version moves once, for the login and the kicks it causes.
  local changed = 1
  if replaced and kicked_others == 0 then changed = 0 end
  local version
  if changed == 1 then
    version = next_version(status, conn_id)
  else
    redis.call('HSET', status, 'op', conn_id)
    version = stored_version(status)
  end
  local kicked_json = {}
  for _, k in ipairs(to_kick) do
    if k[3] then
      redis.call('HDEL', sessions, k[1])
      live = live - 1
      if outbox then
        local kct = to_int(string.match(k[1], '^(%d+):'))
        local kimei = string.match(k[1], '^%d+:(.*)$')
        count(counters, app_id, kct, -1, 0)
        feed_add(outbox, args[14], args[15], session_fields('logout', app_id, user_id, kct,
          kimei, 'kicked', 1, live, version, now))
        kicked_json[#kicked_json + 1] = '{"clientType":' .. kct .. ',"imei":' .. cjson.encode(kimei) .. '}'
      end
    end
    kicked = kicked + 1
    local data = '{"appId":' .. app_id .. ',"userId":' .. cjson.encode(user_id) ..
      ',"clientType":' .. ct .. ',"imei":' .. cjson.encode(imei) .. '}'
    inbox_add(inbox, maxlen, ttl, 9002, data, nil, connid_of(k[2]))
    add_nodes(by_node, {k[2]}, inbox)
  end
  local session = '{"appId":' .. app_id .. ',"userId":' .. cjson.encode(user_id) ..
    ',"clientType":' .. ct .. ',"imei":' .. cjson.encode(imei) .. ',"connectState":1' ..
    ',"brokerId":' .. cjson.encode(broker_id) .. ',"brokerHost":' .. cjson.encode(args[7] or '') ..
    ',"version":' .. (to_int(args[8]) or 0) .. ',"loginTime":' .. now ..
    ',"connId":' .. cjson.encode(conn_id) .. '}'
  redis.call('HSET', sessions, field, session)
  redis.call('HSET', status, 'lastSeen', now)
  if outbox and changed == 1 then
    if not replaced then count(counters, app_id, ct, 1, before == 0 and 1 or 0) end
    local fields = session_fields('login', app_id, user_id, ct, imei, 'login', 1,
      redis.call('HLEN', sessions), version, now)
    -- the devices this login kicked (their own 'kicked' entries came just before), as Tencent's KickedDevice
    fields[#fields + 1] = 'kicked'
    fields[#fields + 1] = '[' .. table.concat(kicked_json, ',') .. ']'
    feed_add(outbox, args[14], args[15], fields)
  end

  local values = redis.call('HVALS', sessions)
  local pack = status_pack(app_id, user_id, values, version)
  if changed == 1 and #values > 1 then
    inbox_add(inbox, maxlen, ttl, 4005, pack, conn_id, nil)
    add_nodes(by_node, values, inbox)
  elseif redis.call('EXISTS', inbox) == 1 then
    redis.call('PEXPIRE', inbox, ttl)
  end
  ring(prefix, by_node)

  local reply = {changed, pack, last_id(inbox), kicked}
  if changed == 1 then
    for _, r in ipairs(recipients(friends, subscribers, user_id, now)) do reply[#reply + 1] = r end
  end
  return reply
end

--[[ presence_logout
KEYS[1] sessions HASH     KEYS[2] status HASH   KEYS[3] subscribers ZSET
KEYS[4] inbox STREAM      KEYS[5] friends SET
ARGV[1] appId  ARGV[2] userId  ARGV[3] clientType  ARGV[4] imei
ARGV[5] connId: remove only if the session still belongs to this connection ('' = any)
ARGV[6] inbox MAXLEN  ARGV[7] inbox TTL ms  ARGV[8] doorbell channel prefix
ARGV[9] TTL ms of the inbox once the last session is gone (undelivered kicks drain)
ARGV[10] operation id ('' = none; optional)
ARGV[11] evidence age ms: the user was last seen this long before now (optional, default 0)
ARGV[12] evidence time ms on the server's clock (optional, 0 = use ARGV[11]); never later than now
Optional (the change feed and online counters; both or neither):
KEYS[6] the user's outbox STREAM   KEYS[7] the online counters HASH of the user's slot
ARGV[13] reason (logout|close|timeout|reaped|kicked|shutdown|error)  ARGV[14] outbox MAXLEN
ARGV[15] outbox TTL ms
Reply: {changed 0|1, 4004 data JSON, online 1|2, recipient userIds...}
  changed = 0 (and nothing else) when the session is gone or belongs to a newer
  connection: a late logout never removes a newer login of the same device. A repeat of
  one of the user's recent operations (ARGV[10]) applies nothing and replies changed = 1 with the
  current state. lastSeen becomes the later of its stored value and the evidence.
]]
local function presence_logout(keys, args)
  if #keys ~= 5 and #keys ~= 7 then return param_error('presence_logout takes 5 or 7 keys') end
  local app_id, user_id, ct, imei, conn_id = to_int(args[1]), args[2], to_int(args[3]), args[4], args[5] or ''
  if app_id == nil then return param_error('appId must be an integer') end
  if not stored_user_id(user_id) then return param_error('userId must be 1..64 bytes without | { }') end
  if ct == nil or imei == nil then return param_error('clientType and imei are required') end
  local maxlen, ttl, prefix, idle_ttl = args[6], args[7], args[8], args[9]
  local sessions, status, subscribers, inbox, friends = keys[1], keys[2], keys[3], keys[4], keys[5]

  local op_id, age, seen_at = args[10] or '', to_int(args[11]) or 0, to_int(args[12]) or 0
  local now = now_ms()

  if is_recent_op(status, op_id) then
    local values = redis.call('HVALS', sessions)
    local pack, online = status_pack(app_id, user_id, values, stored_version(status))
    local reply = {1, pack, online}
    for _, r in ipairs(recipients(friends, subscribers, user_id, now)) do reply[#reply + 1] = r end
    return reply
  end

  local field = ct .. ':' .. imei
  local current = redis.call('HGET', sessions, field)
  if not current then return {0} end
  if conn_id ~= '' and connid_of(current) ~= conn_id then return {0} end

  redis.call('HDEL', sessions, field)
  local version = next_version(status, op_id)
  local seen = now - math.max(age, 0)
  if seen_at > 0 then seen = math.min(seen_at, now) end
  local before = to_int(redis.call('HGET', status, 'lastSeen'))
  if before == nil or before < seen then redis.call('HSET', status, 'lastSeen', seen) end
  local values = redis.call('HVALS', sessions)
  local pack, online = status_pack(app_id, user_id, values, version)
  if keys[6] then
    count(keys[7], app_id, ct, -1, #values == 0 and -1 or 0)
    feed_add(keys[6], args[14], args[15], session_fields('logout', app_id, user_id, ct, imei,
      args[13] or 'logout', online, #values, version, now))
  end
  if #values == 0 then
    if redis.call('EXISTS', inbox) == 1 then redis.call('PEXPIRE', inbox, idle_ttl) end
  else
    inbox_add(inbox, maxlen, ttl, 4005, pack, conn_id ~= '' and conn_id or nil, nil)
    local by_node = {}
    add_nodes(by_node, values, inbox)
    ring(prefix, by_node)
  end
  local reply = {1, pack, online}
  for _, r in ipairs(recipients(friends, subscribers, user_id, now)) do reply[#reply + 1] = r end
  return reply
end

--[[ presence_set_custom_status
KEYS[1] sessions HASH     KEYS[2] status HASH   KEYS[3] subscribers ZSET
KEYS[4] inbox STREAM      KEYS[5] friends SET
ARGV[1] appId  ARGV[2] userId  ARGV[3] customStatus (integer)  ARGV[4] customText (<= 100 bytes)
ARGV[5] origin connId ('' = none: every session of the user gets the 4007 sync)
ARGV[6] inbox MAXLEN  ARGV[7] inbox TTL ms  ARGV[8] doorbell channel prefix
ARGV[9] operation id ('' = none; optional)
Optional (the change feed): KEYS[6] the user's outbox STREAM  ARGV[10] outbox MAXLEN  ARGV[11] outbox TTL ms
  appends a 'status' entry (clientType 0, imei and reason '') with customStatus and customText.
Reply: {1, 4006 data JSON (with the user's version), recipient userIds...}
  A repeat of one of the user's recent operations (ARGV[9], even after later changes) applies
  nothing and replies the current state.
]]
local function presence_set_custom_status(keys, args)
  if #keys ~= 5 and #keys ~= 6 then return param_error('presence_set_custom_status takes 5 or 6 keys') end
  local app_id, user_id, custom, text, origin = to_int(args[1]), args[2], to_int(args[3]), args[4] or '', args[5] or ''
  if app_id == nil then return param_error('appId must be an integer') end
  if not valid_user_id(user_id) then return param_error('userId must be 1..64 bytes of UTF-8 without control characters, | { }') end
  if custom == nil then return param_error('customStatus must be an integer') end
  if #text > MAX_CUSTOM_TEXT then return param_error('customText must be at most 100 bytes') end
  local maxlen, ttl, prefix = args[6], args[7], args[8]
  local sessions, status, subscribers, inbox, friends = keys[1], keys[2], keys[3], keys[4], keys[5]

  local op_id = args[9] or ''
  local now = now_ms()
  if is_recent_op(status, op_id) then
    local st = redis.call('HMGET', status, 'customStatus', 'customText')
    local reply = {1, custom_pack(user_id, to_int(st[1]) or custom, st[2] or text, stored_version(status))}
    for _, r in ipairs(recipients(friends, subscribers, user_id, now)) do reply[#reply + 1] = r end
    return reply
  end
  redis.call('HSET', status, 'customStatus', custom, 'customText', text, 'customAt', now)
  local version = next_version(status, op_id)
  local pack = custom_pack(user_id, custom, text, version)
  local values = redis.call('HVALS', sessions)
  if keys[6] then
    local fields = session_fields('status', app_id, user_id, 0, '', '', #values > 0 and 1 or 2, #values,
      version, now)
    fields[#fields + 1] = 'customStatus'; fields[#fields + 1] = tostring(custom)
    fields[#fields + 1] = 'customText'; fields[#fields + 1] = text
    feed_add(keys[6], args[10], args[11], fields)
  end
  local others = #values
  if origin ~= '' then others = others - 1 end
  if others > 0 then
    inbox_add(inbox, maxlen, ttl, 4007, pack, origin ~= '' and origin or nil, nil)
    local by_node = {}
    add_nodes(by_node, values, inbox)
    ring(prefix, by_node)
  end
  local reply = {1, pack}
  for _, r in ipairs(recipients(friends, subscribers, user_id, now)) do reply[#reply + 1] = r end
  return reply
end

--[[ presence_fanout
KEYS: recipient triples  sessions_1, inbox_1, pushed_1, sessions_2, inbox_2, pushed_2, ...
  (one slot on a cluster); without ARGV[6..7], pairs  sessions_1, inbox_1, ...  (no ordering)
ARGV[1] command (4004 | 4006)  ARGV[2] data JSON  ARGV[3] inbox MAXLEN  ARGV[4] inbox TTL ms
ARGV[5] doorbell channel prefix ('' = publish nothing, name the nodes in the reply)
ARGV[6] the changed user's id   ARGV[7] its version (the one in ARGV[2])
Reply: {entries written, doorbells published}, and when ARGV[5] is '':
  {entries written, 0, node id, {inbox keys}, node id, {inbox keys}, ...}
  Only recipients with an online session get an entry: offline users pull on connect.
  A recipient whose pushed HASH already holds this version or a newer one for (command, user)
  gets nothing: the newest state is never followed by an older one. Safe to repeat.
]]
local function presence_fanout(keys, args)
  local command, data, maxlen, ttl, prefix = args[1], args[2], args[3], args[4], args[5]
  local subject, version = args[6], to_int(args[7])
  local step = 2
  if subject ~= nil and version ~= nil then step = 3 end
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
ARGV[1] subscriber userId  ARGV[2] subTime ms (1 .. 2592000000, relative)
ARGV[3] most live subscriptions per subscriber  ARGV[4..] target userIds
Reply: {expireAt ms, live subscriptions after the call}
  Subscribing again overwrites the expiry. Expired entries are pruned first. Then the
  caller runs presence_subscribers_add with this expireAt on the targets' keys (per slot):
  pushes start once that ran; repeating both converges. The reverse index
  expires (PEXPIREAT) with its latest entry.
]]
local function presence_subscribe(keys, args)
  local subscriber, sub_time, limit = args[1], to_int(args[2]), to_int(args[3])
  local n = #args - 3
  if #keys ~= 1 or n < 1 then return param_error('presence_subscribe takes 1 key and at least one target') end
  if not valid_user_id(subscriber) then return param_error('subscriber userId must be 1..64 bytes of UTF-8 without control characters, | { }') end
  if sub_time == nil or sub_time < 1 or sub_time > MAX_SUB_TIME then
    return param_error('subTime must be between 1 and ' .. MAX_SUB_TIME .. ' ms')
  end
  if limit == nil or limit < 1 then return param_error('limit must be a positive integer') end
  local now = now_ms()
  local expire_at = now + sub_time
  local index = keys[1]
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
  local fresh = {}
  local added = 0
  for i = 1, n do
    local target = args[i + 3]
    if not valid_user_id(target) then return param_error('subUserId must be 1..64 bytes of UTF-8 without control characters, | { }') end
    if target == subscriber then return param_error('subUserId must not contain the subscriber itself') end
    if not fresh[target] and not redis.call('ZSCORE', index, target) then added = added + 1 end
    fresh[target] = true
  end
  local live = redis.call('ZCARD', index) + added
  if live > limit then
    return param_error('at most ' .. limit .. ' live subscriptions per user, this call would make ' .. live)
  end
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
]]
local function presence_subscriptions(keys, args)
  local limit = to_int(args[1])
  if #keys ~= 1 or limit == nil or limit < 1 then return param_error('presence_subscriptions takes 1 key and a limit') end
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
]]
local function presence_subscribers_add(keys, args)
  local subscriber, expire_at = args[1], to_int(args[2])
  if #keys < 1 or #args ~= 2 then return param_error('presence_subscribers_add takes keys, a subscriber and expireAt') end
  if not valid_user_id(subscriber) then return param_error('subscriber userId must be 1..64 bytes of UTF-8 without control characters, | { }') end
  if expire_at == nil or expire_at < 1 then return param_error('expireAt must be a positive integer') end
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
]]
local function presence_unsubscribe(keys, args)
  if #keys ~= 1 or #args < 2 then return param_error('presence_unsubscribe takes 1 key and at least one target') end
  local removed = 0
  for i = 2, #args do
    removed = removed + redis.call('ZREM', keys[1], args[i])
  end
  return removed
end

--[[ presence_subscribers_remove  (the targets' side of presence_unsubscribe)
KEYS[1..n] each target's subscribers ZSET  (one slot on a cluster)   ARGV[1] subscriber userId
Reply: number of subscribers ZSETs the subscriber was removed from
]]
local function presence_subscribers_remove(keys, args)
  if #keys < 1 or #args ~= 1 then return param_error('presence_subscribers_remove takes keys and a subscriber') end
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
    if not valid_user_id(owner) then return param_error('fromId must be 1..64 bytes of UTF-8 without control characters, | { }') end
    if not valid_user_id(friend) then return param_error('toId must be 1..64 bytes of UTF-8 without control characters, | { }') end
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
]]
local function presence_friends_add(keys, args) return friends_change(keys, args, 'SADD') end

--[[ presence_friends_remove
KEYS and ARGV as presence_friends_add.   Reply: number of friends removed
]]
local function presence_friends_remove(keys, args) return friends_change(keys, args, 'SREM') end

--[[ presence_query  (no-writes)
KEYS: pairs  sessions_1, status_1, sessions_2, status_2, ...  (one slot on a cluster)
ARGV: userIds, in KEYS order
Reply: one JSON object {userId: {session: [...], customStatus, customText, status 1|2, lastSeen, version}}
  customStatus/customText/lastSeen are null when never set; version is 0 before the first change.
]]
local function presence_query(keys, args)
  if #keys ~= 2 * #args then return param_error('presence_query takes a sessions/status key pair per userId') end
  local parts = {}
  for i = 1, #args do
    local values = redis.call('HVALS', keys[2 * i - 1])
    local st = redis.call('HMGET', keys[2 * i], 'customStatus', 'customText', 'lastSeen', 'version')
    local online = 2
    if #values > 0 then online = 1 end
    parts[#parts + 1] = cjson.encode(args[i]) .. ':{"session":[' .. table.concat(values, ',') ..
      '],"customStatus":' .. (st[1] or 'null') .. ',"customText":' .. (st[2] and cjson.encode(st[2]) or 'null') ..
      ',"status":' .. online .. ',"lastSeen":' .. (st[3] or 'null') .. ',"version":' .. (st[4] or '0') .. '}'
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

--[[ presence_query_raw  (no-writes; what the facade calls: presence_query's data without building JSON)
KEYS: pairs  sessions_1, status_1, sessions_2, status_2, ...  (one slot on a cluster)
ARGV: none (the caller knows the users, in KEYS order)
Reply: per user, in KEYS order, 5 items: {session JSON...}, customStatus, customText, lastSeen,
  version (nil when never set). Building the JSON object in Lua was most of presence_query's time.
]]
local function presence_query_raw(keys, args)
  if #keys % 2 ~= 0 then return param_error('presence_query_raw takes sessions/status key pairs') end
  local reply, n, call = {}, 0, redis.call
  for i = 1, #keys, 2 do
    local st = call('HMGET', keys[i + 1], 'customStatus', 'customText', 'lastSeen', 'version')
    reply[n + 1] = call('HVALS', keys[i])
    reply[n + 2], reply[n + 3], reply[n + 4], reply[n + 5] = st[1], st[2], st[3], st[4]
    n = n + 5
  end
  return reply
end

local function parse_id(id)
  local ms, seq = string.match(id or '', '^(%d+)-(%d+)$')
  if not ms then return nil end
  return {tonumber(ms), tonumber(seq)}
end

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
]]
-- An emptied outbox is kept a minute, not deleted: a stream remembers its last id, so the user's
-- next entry (maybe in the same millisecond) still gets an id after the relay cursor.
local EMPTY_OUTBOX_TTL = 60000

local function presence_feed_append(keys, args)
  if #keys ~= 2 and #keys ~= 3 then return param_error('presence_feed_append takes 2 or 3 keys') end
  local maxlen, ttl = to_int(args[1]), to_int(args[2])
  if maxlen == nil or maxlen < 1 or ttl == nil or ttl < 1 then return param_error('MAXLEN and cursor TTL must be positive') end
  local cursor_text = redis.call('GET', keys[2]) or '0-0'
  local cursor = parse_id(cursor_text) or {0, 0}
  local appended, last = 0, nil
  local i = 3
  while i <= #args do
    local id, n = args[i], to_int(args[i + 1])
    local parsed = parse_id(id)
    if parsed == nil or n == nil or n < 2 or n % 2 ~= 0 then return param_error('entries are: outbox id, field count, fields') end
    if id_after(parsed, cursor) then
      local fields = {}
      for j = 1, n do fields[j] = args[i + 1 + j] end
      redis.call('XADD', keys[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
      appended = appended + 1
      cursor, cursor_text = parsed, id
    end
    if last == nil or id_after(parsed, last) then last = parsed end
    i = i + 2 + n
  end
  if appended > 0 then redis.call('SET', keys[2], cursor_text, 'PX', ttl) end
  if keys[3] and last then
    redis.call('XTRIM', keys[3], 'MINID', last[1] .. '-' .. (last[2] + 1))
    if redis.call('XLEN', keys[3]) == 0 then redis.call('PEXPIRE', keys[3], EMPTY_OUTBOX_TTL) end
  end
  return {appended, cursor_text}
end

--[[ presence_outbox_trim
KEYS[1] the user's outbox STREAM   ARGV[1] the last relayed outbox id
Reply: entries left in the outbox (an empty outbox expires a minute later)
]]
local function presence_outbox_trim(keys, args)
  local last = parse_id(args[1])
  if #keys ~= 1 or last == nil then return param_error('presence_outbox_trim takes 1 key and an entry id') end
  redis.call('XTRIM', keys[1], 'MINID', last[1] .. '-' .. (last[2] + 1))
  local left = redis.call('XLEN', keys[1])
  if left == 0 then redis.call('PEXPIRE', keys[1], EMPTY_OUTBOX_TTL) end
  return left
end

--[[ presence_inbox_trim  (the gateway, for inboxes whose local sessions all received everything)
KEYS[1] inbox STREAM
ARGV[1] resume window ms (>= 1)   ARGV[2] the last entry id every local session of the user received
Reply: entries left
  Drops the entries up to ARGV[2] that are older than the window (by their id, Redis clock): a client
  reconnecting within the window still resumes from any id it saw. An inbox left empty is deleted (its
  last id is older than the window, so the next entry's id is still after every cursor). Another gateway
  with sessions of the user has read these entries unless it stalled for longer than the window, and a
  window longer than node_ttl means such a gateway was reaped: its clients reconnect and re-pull.
]]
local function presence_inbox_trim(keys, args)
  local window, upto = to_int(args[1]), parse_id(args[2])
  -- A window of at least 1 ms keeps a deleted inbox's last id before any id the next entry can get.
  if #keys ~= 1 or window == nil or window < 1 or upto == nil then
    return param_error('presence_inbox_trim takes 1 key, a window of at least 1 ms and an entry id')
  end
  local horizon = now_ms() - window
  local min_id = horizon .. '-0'
  if upto[1] <= horizon then min_id = string.format('%d-%d', upto[1], upto[2] + 1) end
  redis.call('XTRIM', keys[1], 'MINID', min_id)
  local left = redis.call('XLEN', keys[1])
  if left == 0 then redis.call('DEL', keys[1]) end
  return left
end

--[[ presence_node_heartbeat
KEYS[1] nodes ZSET   ARGV[1] node id
Reply: {1 if the node was already registered else 0, now ms}
  0 after the first beat means a reaper logged this node's sessions out meanwhile.
]]
local function presence_node_heartbeat(keys, args)
  local now = now_ms()
  local was = redis.call('ZSCORE', keys[1], args[1])
  redis.call('ZADD', keys[1], now, args[1])
  return {was and 1 or 0, now}
end

--[[ presence_nodes_expired  (no-writes)
KEYS[1] nodes ZSET   ARGV[1] node TTL ms
Reply: ids of nodes whose last heartbeat is older than the TTL
]]
local function presence_nodes_expired(keys, args)
  return redis.call('ZRANGEBYSCORE', keys[1], '-inf', '(' .. (now_ms() - tonumber(args[1])))
end

--[[ presence_version  (no-writes)
KEYS: none   ARGV: none   Reply: the library version string
]]
local function presence_version() return VERSION end

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

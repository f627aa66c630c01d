// @ts-check
/**
 * presence-client.js: a browser client for the presence gateway.
 *
 * One ES module, no build step, no dependencies. It speaks the gateway's WebSocket JSON text mode
 * (gateway/PROTOCOL.md, section 2.2): LOGIN, PING on an interval, a watchdog that drops a silent socket,
 * reconnection with jittered exponential backoff, resume from the last seen eventId, and
 * SUBSCRIBE / PULL requests over the socket. API reference: gateway/PROTOCOL.md, section 8.
 *
 * @example
 *   import { PresenceClient } from "./presence-client.js";
 *   const client = new PresenceClient({ url: "ws://127.0.0.1:19000/ws", appId: 10000, userId: "bob", userSign });
 *   client.on("resync", async () => render(await client.pull()));   // after every login that did not resume
 *   client.on("status", (data) => update(data.userId, data.status)); // 4004: a friend or subscription changed
 *
 * @module presence-client
 */

/** Command codes of the wire protocol. */
export const Command = Object.freeze({
  LOGIN: 9000,
  LOGINACK: 9001,
  MUTUALLOGIN: 9002,
  LOGOUT: 9003,
  PING: 9999,
  SUBSCRIBE: 4002,
  PULL: 4003,
  NOTIFY: 4004,
  NOTIFY_SYNC: 4005,
  CUSTOM_NOTIFY: 4006,
  CUSTOM_NOTIFY_SYNC: 4007,
  FRIENDSHIP_NOTIFY: 4010,
  QUERY_SUBSCRIPTIONS: 4011,
  ERROR: 9100,
});

/** Client (device) types. */
export const ClientType = Object.freeze({ WEBAPI: 0, WEB: 1, IOS: 2, ANDROID: 3, WINDOWS: 4, MAC: 5 });

/** `status` values of 4004 / 4005 data and of query results. */
export const Status = Object.freeze({ ONLINE: 1, OFFLINE: 2 });

/** Codes of errors the client raises itself (server codes are positive: 200, 6000x, 9000x). */
export const ClientCode = Object.freeze({
  /** No reply within `requestTimeout`. */
  TIMEOUT: -1,
  /** The socket went away before the reply came; the request may or may not have been applied. */
  DISCONNECTED: -2,
  /** The client was closed, logged out or kicked; it sends nothing more until `connect()`. */
  CLOSED: -3,
  /** The arguments were refused before anything was sent. */
  INVALID: -4,
});

/** Server error codes after which retrying the same userSign cannot succeed (60000..60006). */
const AUTH_CODES = new Set([60000, 60001, 60002, 60003, 60004, 60005, 60006]);
const PARAMETER_ERROR = 90001;
const OPEN = 1; // WebSocket.OPEN, without relying on a global in non-browser hosts

/**
 * @typedef {object} Session One online device of a user.
 * @property {number} appId
 * @property {string} userId
 * @property {number} clientType 0 WEBAPI, 1 WEB, 2 IOS, 3 ANDROID, 4 WINDOWS, 5 MAC
 * @property {string} imei device id
 * @property {number} connectState 1 online
 * @property {string} [brokerId] gateway node holding the connection
 * @property {string} [brokerHost]
 * @property {number} [version] client SDK version
 * @property {number} [loginTime] ms since the epoch (server clock)
 */

/**
 * @typedef {object} StatusNotify Data of 4004 (a friend / subscription target) and 4005 (your own devices).
 * @property {number} appId
 * @property {string} userId whose status changed
 * @property {number} status 1 online (at least one session), 2 offline
 * @property {Session[]} client that user's online sessions after the change
 */

/**
 * @typedef {object} CustomNotify Data of 4006 (someone else) and 4007 (yourself, set elsewhere).
 * @property {string} userId
 * @property {number} customStatus app-defined
 * @property {string} customText
 */

/**
 * @typedef {object} FriendshipNotify Data of 4010 (ours): friendships of yours were added or deleted.
 * @property {number} appId
 * @property {"add"|"delete"} action
 * @property {Record<string, UserOnlineStatus>} friends each friend added or deleted -> their status now
 */

/**
 * @typedef {object} SubscriptionList Reply of querySubscriptions (4011).
 * @property {{userId: string, expireAt: number}[]} subscriptions live ones, the soonest to expire first
 * @property {number} serverTime now on the server's clock, ms
 */

/**
 * @typedef {object} KickNotify Data of 9002: the login that displaced this connection.
 * @property {number} appId
 * @property {string} userId
 * @property {number} clientType
 * @property {string} imei
 */

/**
 * @typedef {object} UserOnlineStatus One user in a PULL result.
 * @property {Session[]} session online sessions
 * @property {number|null} [customStatus]
 * @property {string|null} [customText]
 * @property {number} status 1 online, 2 offline
 * @property {number|null} [lastSeen] ms since the epoch (server clock) when the last session ended
 */

/**
 * @typedef {object} SubscribeResult
 * @property {number} expireAt ms since the epoch (server clock) when the subscription ends
 * @property {number} liveSubscriptions subscriptions the caller now holds
 * @property {Record<string, UserOnlineStatus>} users every target's status now (read after subscribing)
 */

/**
 * @typedef {object} OpenDetail Detail of 'open': the gateway accepted the LOGIN.
 * @property {string} userId
 * @property {string} lastEventId the resume cursor the gateway reported
 * @property {boolean|null} resumed true: missed pushes are being replayed; false: re-pull; null: fresh login
 * @property {boolean} reconnected false for the first login of this client (or after `connect()`)
 */

/**
 * @typedef {object} ResyncDetail Detail of 'resync': pushes were (or may have been) missed, pull now.
 * @property {"login"|"not-resumed"} reason "login": a fresh login; "not-resumed": a reconnect the gateway could not
 *   resume, or an unasked LOGINACK on the live socket (the server lost its state and logged the session in again)
 */

/**
 * @typedef {object} CloseDetail Detail of 'close'.
 * @property {number} code WebSocket close code (4000 when the client's watchdog dropped the socket)
 * @property {string} reason
 * @property {boolean} reconnect whether the client will reconnect by itself
 * @property {number|null} delay ms until the next attempt, when it will
 */

/**
 * @typedef {object} ErrorDetail Detail of 'error': the gateway's ERROR (9100) before it closes the socket.
 * @property {number} code e.g. 60003 userSign invalid, 60004 expired, 90001 parameter error
 * @property {string} msg
 */

/**
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"} ClientState
 *   idle: not started; connecting: socket opening or LOGIN sent; open: logged in;
 *   reconnecting: waiting for the next attempt; closed: stopped (close(), logout(), kicked, or refused credentials)
 */

/**
 * @typedef {object} PresenceClientOptions
 * @property {string} url the gateway's WebSocket URL, e.g. "ws://host:19000/ws" (http(s):// and relative URLs are converted)
 * @property {number} appId
 * @property {string} userId
 * @property {string | (() => string | Promise<string>)} userSign a userSign, or a function called before every LOGIN
 *   (use one to fetch a fresh sign from your backend: then an expired or refused sign is retried, not fatal)
 * @property {string} [imei] this device's id, unique per tab/device of the user (1..128 UTF-8 bytes); default: random "web-..."
 * @property {number} [clientType] default 1 (WEB)
 * @property {number} [version] client SDK version sent in every frame, default 1
 * @property {number} [pingInterval] ms between PINGs, default 10000 (the gateway drops a socket silent for 30 s)
 * @property {number} [timeout] ms without any message from the server (or without LOGINACK after connecting)
 *   before the socket counts as dead and is replaced, default 2 * pingInterval + 2000
 * @property {number} [requestTimeout] ms to wait for a SUBSCRIBE / PULL reply (including time spent waiting for a login), default 10000
 * @property {number} [reconnectMinDelay] ms, first retry delay before jitter, default 500
 * @property {number} [reconnectMaxDelay] ms, cap of the backoff, default 30000
 * @property {number} [reconnectFactor] growth per failed attempt, default 2
 * @property {number} [reconnectJitter] 0..1: each delay is scaled by a random factor in [1 - jitter, 1], default 0.5
 * @property {string|null} [lastEventId] a resume cursor saved earlier (e.g. in sessionStorage), default none
 * @property {boolean} [autoConnect] connect from the constructor, default true
 * @property {boolean} [wakeOnVisible] when the page becomes visible or the browser goes online: PING at once,
 *   or skip the remaining backoff delay, default true
 * @property {typeof WebSocket} [WebSocket] WebSocket constructor to use, default the global one
 */

/** The error a request promise is rejected with: the server's `{code, msg}` or a {@link ClientCode}. */
export class PresenceError extends Error {
  /**
   * @param {number} code
   * @param {string} msg
   */
  constructor(code, msg) {
    super(`${msg} (${code})`);
    this.name = "PresenceError";
    /** @type {number} */
    this.code = code;
    /** @type {string} */
    this.msg = msg;
  }
}

/**
 * Every event the client dispatches. `detail` is the payload; for pushes it is the pack's `data`.
 * @template [T=any]
 */
export class PresenceEvent extends Event {
  /**
   * @param {string} type
   * @param {T} detail
   * @param {Record<string, any>|null} [pack] the whole server message, for pushes
   */
  constructor(type, detail, pack = null) {
    super(type);
    /** @type {T} */
    this.detail = detail;
    /** @type {Record<string, any>|null} the whole server message (userId, appId, toId, command, data, eventId) */
    this.pack = pack;
    /** @type {number|null} */
    this.command = pack ? pack.command : null;
    /** @type {string|null} the push's stream id "ms-seq" (the ms part is the server's clock) */
    this.eventId = pack && typeof pack.eventId === "string" ? pack.eventId : null;
  }
}

/**
 * Compare two stream ids "ms-seq" numerically.
 * @param {string} a
 * @param {string} b
 * @returns {number} < 0, 0 or > 0
 */
export function compareEventIds(a, b) {
  const [am, as = "0"] = a.split("-");
  const [bm, bs = "0"] = b.split("-");
  return Number(am) - Number(bm) || Number(as) - Number(bs);
}

/** @returns {string} a random device id for this tab, "web-" + 12 hex digits */
export function randomImei() {
  const bytes = new Uint8Array(6);
  globalThis.crypto.getRandomValues(bytes);
  return "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * @typedef {object} PendingRequest
 * @property {number} command
 * @property {object} data
 * @property {(data: any) => void} resolve
 * @property {(err: PresenceError) => void} reject
 * @property {ReturnType<typeof setTimeout>|undefined} timer
 * @property {boolean} done
 */

/**
 * A presence connection that stays up: logs in, pings, replaces dead sockets, resumes, and tells the
 * app when to re-pull. Events (listen with `on(type, fn)` or `addEventListener(type, e => e.detail)`):
 *
 * | event     | detail                        | when |
 * |-----------|-------------------------------|------|
 * | open      | {@link OpenDetail}            | LOGINACK: logged in |
 * | resync    | {@link ResyncDetail}          | after 'open' unless the login resumed: pull now |
 * | status    | {@link StatusNotify}          | 4004: a friend / subscription target changed |
 * | online    | {@link StatusNotify}          | 4004 with status 1 |
 * | offline   | {@link StatusNotify}          | 4004 with status 2 |
 * | sync      | {@link StatusNotify}          | 4005: your own devices changed (another tab, phone, ...) |
 * | custom    | {@link CustomNotify}          | 4006 (someone else) or 4007 (yourself, set elsewhere) |
 * | friendship | {@link FriendshipNotify}     | 4010: friends added or deleted (by an admin), with their status |
 * | kicked    | {@link KickNotify}            | 9002: another login displaced this one; no reconnect |
 * | error     | {@link ErrorDetail}           | 9100: the gateway refused something and closes |
 * | close     | {@link CloseDetail}           | the socket is gone (will reconnect unless detail.reconnect is false) |
 * | state     | {@link ClientState}           | `state` changed |
 * | message   | the whole server message      | every server message except PING replies, before the specific event |
 */
export class PresenceClient extends EventTarget {
  /** @param {PresenceClientOptions} options */
  constructor(options) {
    super();
    const o = options || /** @type {PresenceClientOptions} */ ({});
    if (!o.url) throw new TypeError("PresenceClient: url is required");
    if (!Number.isInteger(o.appId)) throw new TypeError("PresenceClient: appId must be an integer");
    if (typeof o.userId !== "string" || !o.userId) throw new TypeError("PresenceClient: userId is required");
    if (!o.userSign) throw new TypeError("PresenceClient: userSign (a string or a function) is required");
    /** @readonly */ this.url = toWebSocketUrl(o.url);
    /** @readonly */ this.appId = o.appId;
    /** @readonly */ this.userId = o.userId;
    /** @type {string | (() => string | Promise<string>)} read before every LOGIN: assign a new one at any time */
    this.userSign = o.userSign;
    /** @readonly */ this.imei = o.imei || randomImei();
    /** @readonly */ this.clientType = o.clientType ?? ClientType.WEB;
    /** @readonly */ this.version = o.version ?? 1;
    /** @readonly */ this.pingInterval = o.pingInterval ?? 10000;
    /** @readonly */ this.timeout = o.timeout ?? 2 * this.pingInterval + 2000;
    /** @readonly */ this.requestTimeout = o.requestTimeout ?? 10000;
    if (!(this.pingInterval > 0 && this.timeout > this.pingInterval)) {
      throw new TypeError("PresenceClient: pingInterval must be > 0 and timeout > pingInterval (PING replies reset it)");
    }
    this._minDelay = o.reconnectMinDelay ?? 500;
    this._maxDelay = o.reconnectMaxDelay ?? 30000;
    this._factor = o.reconnectFactor ?? 2;
    this._jitter = Math.min(1, Math.max(0, o.reconnectJitter ?? 0.5));
    this._WebSocket = o.WebSocket || globalThis.WebSocket;
    /** @type {string|null} the id of the last push seen (or the LOGINACK cursor); sent as lastEventId on reconnect */
    this.lastEventId = o.lastEventId ?? null;
    /** @type {Map<string, number>} newest version seen per user and kind ("s:" status, "c:" custom status) */
    this._versions = new Map();
    /** @type {ClientState} */
    this.state = "idle";
    /** @type {WebSocket|null} */
    this._ws = null;
    this._loggedIn = false;
    this._everOpened = false;
    this._stopped = false;
    this._attempt = 0;
    /** @type {ReturnType<typeof setTimeout>|undefined} */ this._retryTimer = undefined;
    /** @type {ReturnType<typeof setTimeout>|undefined} */ this._watchdog = undefined;
    /** @type {ReturnType<typeof setInterval>|undefined} */ this._pinger = undefined;
    /** @type {Map<number, PendingRequest[]>} replies come back in request order, one FIFO per command */
    this._inflight = new Map([
      [Command.SUBSCRIBE, []],
      [Command.PULL, []],
      [Command.QUERY_SUBSCRIPTIONS, []],
    ]);
    /** @type {PendingRequest[]} requests made while not logged in, sent after the next LOGINACK */
    this._queued = [];
    this._wakeListening = false;
    this._onWake = () => this._wake();
    this._wakeOnVisible = o.wakeOnVisible ?? true;
    if (o.autoConnect ?? true) this.connect();
  }

  /** True while logged in (state "open"). */
  get connected() {
    return this._loggedIn;
  }

  /**
   * Listen to an event; the listener gets `(detail, event)`. Returns a function that removes it.
   * @param {string} type
   * @param {(detail: any, event: PresenceEvent) => void} listener
   * @param {AddEventListenerOptions} [options]
   * @returns {() => void}
   */
  on(type, listener, options) {
    /** @param {Event} e */
    const wrapped = (e) => listener(/** @type {PresenceEvent} */ (e).detail, /** @type {PresenceEvent} */ (e));
    this.addEventListener(type, wrapped, options);
    return () => this.removeEventListener(type, wrapped, options);
  }

  /**
   * Start (or restart after close(), logout() or a kick). Does nothing while connecting or connected.
   * Use {@link ready} to wait for the login.
   */
  connect() {
    if (this.state === "connecting" || this.state === "open") return;
    if (this.state !== "reconnecting") this._everOpened = false;
    this._stopped = false;
    this._attempt = 0;
    clearTimeout(this._retryTimer);
    this._listenForWake(true);
    this._open();
  }

  /**
   * Resolves with the next (or current) login; rejects when the client stops first or after `timeoutMs`.
   * @param {number} [timeoutMs]
   * @returns {Promise<OpenDetail|null>} null when already logged in
   */
  ready(timeoutMs = this.requestTimeout) {
    if (this._loggedIn) return Promise.resolve(null);
    if (this._stopped) return Promise.reject(new PresenceError(ClientCode.CLOSED, "client is closed"));
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        offOpen();
        offState();
      };
      const timer = setTimeout(() => {
        done();
        reject(new PresenceError(ClientCode.TIMEOUT, `not logged in within ${timeoutMs} ms`));
      }, timeoutMs);
      const offOpen = this.on("open", (detail) => {
        done();
        resolve(detail);
      });
      const offState = this.on("state", (state) => {
        if (state !== "closed") return;
        done();
        reject(new PresenceError(ClientCode.CLOSED, "client is closed"));
      });
    });
  }

  /**
   * Subscribe to users' status for a while (they need not be friends): their changes arrive as
   * 'status' / 'custom' until the subscription expires. Resubscribing extends it.
   * @param {string|string[]} userIds
   * @param {number} ms duration, 1 .. the server's maximum
   * @returns {Promise<SubscribeResult>}
   */
  subscribe(userIds, ms) {
    const list = typeof userIds === "string" ? [userIds] : Array.from(userIds || []);
    if (!list.length || !list.every((u) => typeof u === "string" && u)) {
      return Promise.reject(new PresenceError(ClientCode.INVALID, "subscribe: userIds must be non-empty strings"));
    }
    if (!Number.isInteger(ms) || ms < 1) {
      return Promise.reject(new PresenceError(ClientCode.INVALID, "subscribe: ms must be a positive integer"));
    }
    return this._request(Command.SUBSCRIBE, { subUserId: list, subTime: ms });
  }

  /**
   * Your live subscriptions and when each expires.
   * @returns {Promise<SubscriptionList>}
   */
  querySubscriptions() {
    return this._request(Command.QUERY_SUBSCRIPTIONS, {});
  }

  /**
   * Pull the status of your friends (no argument) or of the given users.
   * @param {string[]} [userList]
   * @returns {Promise<Record<string, UserOnlineStatus>>} userId -> status
   */
  pull(userList) {
    if (userList === undefined || userList === null) return this._request(Command.PULL, {});
    if (!Array.isArray(userList)) {
      return Promise.reject(new PresenceError(ClientCode.INVALID, "pull: userList must be an array of user ids"));
    }
    return this._request(Command.PULL, { userList });
  }

  /**
   * Sign out this device: the gateway removes the session at once (friends see it offline without the
   * grace delay) and closes the socket. No reconnect until `connect()`.
   * @returns {Promise<void>} resolves once the socket is closed (at most ~2 s)
   */
  logout() {
    const ws = this._ws;
    if (!ws || !this._loggedIn) {
      this.close();
      return Promise.resolve();
    }
    this._stopped = true;
    this._send(Command.LOGOUT, {});
    return new Promise((resolve) => {
      const finish = () => {
        clearTimeout(timer);
        off();
        resolve();
      };
      const off = this.on("close", finish);
      const timer = setTimeout(() => {
        this.close(1000, "logout");
        finish();
      }, 2000);
    });
  }

  /**
   * Close the socket without LOGOUT and stop reconnecting. The gateway treats it as a drop: friends
   * see this device offline after its grace period, unless the same imei logs in again within it
   * (a page reload), in which case they see nothing.
   * @param {number} [code] 1000 or 3000..4999
   * @param {string} [reason]
   */
  close(code = 1000, reason = "client closed") {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    this._listenForWake(false);
    if (this._ws) {
      this._socketGone(this._ws, code, reason, true);
    } else if (this.state !== "closed") {
      this._failQueued(ClientCode.CLOSED, "client is closed");
      this._setState("closed");
    }
  }

  // --- connection lifecycle ---

  _open() {
    this._setState("connecting");
    /** @type {WebSocket} */
    let ws;
    try {
      ws = new this._WebSocket(this.url);
    } catch (err) {
      this._afterClose(1006, `cannot open ${this.url}: ${err}`);
      return;
    }
    this._ws = ws;
    this._loggedIn = false;
    ws.onopen = () => this._onSocketOpen(ws);
    ws.onmessage = (ev) => this._onSocketMessage(ws, ev);
    ws.onclose = (ev) => this._socketGone(ws, ev.code, ev.reason, false);
    ws.onerror = () => {}; // a 'close' always follows; browsers give no detail here
    this._armWatchdog(); // also bounds the time to open and to LOGINACK
  }

  /** @param {WebSocket} ws */
  async _onSocketOpen(ws) {
    if (ws !== this._ws) return;
    this._armWatchdog();
    /** @type {string} */
    let sign;
    try {
      sign = typeof this.userSign === "function" ? await this.userSign() : this.userSign;
    } catch (err) {
      if (ws === this._ws) this._socketGone(ws, 4000, `userSign provider failed: ${err}`, true);
      return;
    }
    if (ws !== this._ws) return;
    /** @type {Record<string, any>} */
    // lastEventId, even null (a first login), asks LOGINACK for the cursor: the gateway adds it only when asked.
    const data = { userId: this.userId, userSign: sign, lastEventId: this.lastEventId || null };
    this._send(Command.LOGIN, data);
  }

  /**
   * @param {WebSocket} ws
   * @param {MessageEvent} ev
   */
  _onSocketMessage(ws, ev) {
    if (ws !== this._ws) return;
    this._armWatchdog();
    if (typeof ev.data !== "string") return; // the gateway answers text with text
    /** @type {any} */
    let pack;
    try {
      pack = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!pack || typeof pack !== "object") return;
    const command = pack.command;
    if (command === Command.PING) return;
    const data = pack.data && typeof pack.data === "object" ? pack.data : {};
    if (typeof pack.eventId === "string") {
      // A reconnect may replay what was already seen: drop anything not newer than the cursor.
      if (this.lastEventId && compareEventIds(pack.eventId, this.lastEventId) <= 0) return;
      this.lastEventId = pack.eventId;
    }
    if (this._isStale(command, data)) return;
    this._emit("message", pack, pack);
    switch (command) {
      case Command.LOGINACK:
        this._onLoginAck(data);
        break;
      case Command.NOTIFY:
        this._emit("status", data, pack);
        if (data.status === Status.ONLINE) this._emit("online", data, pack);
        else if (data.status === Status.OFFLINE) this._emit("offline", data, pack);
        break;
      case Command.NOTIFY_SYNC:
        this._emit("sync", data, pack);
        break;
      case Command.CUSTOM_NOTIFY:
      case Command.CUSTOM_NOTIFY_SYNC:
        this._emit("custom", data, pack);
        break;
      case Command.FRIENDSHIP_NOTIFY:
        this._emit("friendship", data, pack);
        break;
      case Command.SUBSCRIBE:
      case Command.PULL:
      case Command.QUERY_SUBSCRIPTIONS:
        this._onReply(command, data);
        break;
      case Command.MUTUALLOGIN:
        this._stopped = true; // the gateway closes the socket next; reconnecting would kick the other login back
        this._listenForWake(false);
        this._emit("kicked", data, pack);
        break;
      case Command.ERROR:
        // A request the server could not serve (90000 while Redis is away): it answers that request, and the
        // connection stays open. Settle it now (the reply FIFO stays in step) instead of timing it out.
        if ((data.command === Command.SUBSCRIBE || data.command === Command.PULL) && this._loggedIn) {
          this._onReply(data.command, { code: data.code, msg: data.msg });
          break;
        }
        // Retrying the same LOGIN cannot succeed after a refused userSign (unless a provider makes a new
        // one) or a refused parameter (imei, appId, ...): stop. Other errors (system error) are retried.
        if (
          (AUTH_CODES.has(data.code) && typeof this.userSign !== "function") ||
          (!this._loggedIn && data.code === PARAMETER_ERROR)
        ) {
          this._stopped = true;
          this._listenForWake(false);
        }
        this._emit("error", { code: data.code, msg: data.msg }, pack);
        break;
      default:
        break;
    }
  }

  /**
   * A LOGINACK: the answer to our LOGIN, or one the gateway sends unasked on the live socket after Redis lost
   * the session and it logged it in again (resumed false). Both are handled alike: forget versions, re-pull.
   * @param {Record<string, any>} data
   */
  _onLoginAck(data) {
    this._loggedIn = true;
    this._attempt = 0;
    const resumed = typeof data.resumed === "boolean" ? data.resumed : null;
    const cursor = typeof data.lastEventId === "string" ? data.lastEventId : null;
    // Not resumed: we resync from a pull. Versions restart when Redis lost its data (an empty restart, a
    // failover to a lagging replica), so the versions seen before say nothing about the pushes to come.
    if (resumed !== true) this._versions.clear();
    // Resumed: the gateway replays what follows our cursor, so keep it. Otherwise adopt the gateway's.
    if (cursor && !(resumed === true && this.lastEventId && compareEventIds(cursor, this.lastEventId) < 0)) {
      this.lastEventId = cursor;
    }
    const reconnected = this._everOpened;
    this._everOpened = true;
    clearInterval(this._pinger);
    this._pinger = setInterval(() => this._send(Command.PING, {}), this.pingInterval);
    this._setState("open");
    /** @type {OpenDetail} */
    const detail = { userId: this.userId, lastEventId: this.lastEventId || "0-0", resumed, reconnected };
    this._emit("open", detail);
    if (resumed !== true) this._emit("resync", { reason: resumed === false ? "not-resumed" : "login" });
    const queued = this._queued.splice(0);
    for (const req of queued) if (!req.done) this._transmit(req);
  }

  /**
   * The one way a socket ends, whether the server closed it, the watchdog dropped it or close() was called.
   * @param {WebSocket} ws
   * @param {number} code
   * @param {string} reason
   * @param {boolean} local we end it: close the socket ourselves and do not wait for its 'close' event
   */
  _socketGone(ws, code, reason, local) {
    if (ws !== this._ws) return;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (local) {
      try {
        ws.close(code, reason.slice(0, 120));
      } catch {
        try {
          ws.close();
        } catch {
          // already closing
        }
      }
    }
    this._ws = null;
    this._afterClose(code, reason);
  }

  /**
   * Whether a status (4004/4005) or custom status (4006/4007) pack is older than (or as old as) one already
   * seen for that user: pushes of concurrent changes may arrive out of order; the user's version orders them.
   * @param {number} command
   * @param {any} data
   * @returns {boolean}
   */
  _isStale(command, data) {
    if (typeof data.version !== "number" || typeof data.userId !== "string") return false;
    let kind;
    if (command === Command.NOTIFY || command === Command.NOTIFY_SYNC) kind = "s:";
    else if (command === Command.CUSTOM_NOTIFY || command === Command.CUSTOM_NOTIFY_SYNC) kind = "c:";
    else return false;
    const key = kind + data.userId;
    const seen = this._versions.get(key);
    if (seen !== undefined && data.version <= seen) return true;
    this._versions.set(key, data.version);
    return false;
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  _afterClose(code, reason) {
    this._loggedIn = false;
    clearInterval(this._pinger);
    clearTimeout(this._watchdog);
    for (const queue of this._inflight.values()) {
      for (const req of queue.splice(0)) {
        this._settle(req, new PresenceError(ClientCode.DISCONNECTED, `connection closed before the reply (${code})`));
      }
    }
    if (code === 4002) this._stopped = true; // "logged in elsewhere", even if the 9002 frame was lost
    const reconnect = !this._stopped;
    let delay = null;
    if (reconnect && code === 1012) {
      // A deploy (service restart): the session is kept for the gateway's grace, so reconnect at once
      // (jittered, so a whole gateway's clients do not arrive together) and resume with lastEventId.
      delay = Math.round(250 * Math.random());
      this._setState("reconnecting");
      this._retryTimer = setTimeout(() => this._open(), delay);
    } else if (reconnect) {
      const base = Math.min(this._maxDelay, this._minDelay * Math.pow(this._factor, this._attempt));
      delay = Math.round(base * (1 - this._jitter * Math.random()));
      this._attempt += 1;
      this._setState("reconnecting");
      this._retryTimer = setTimeout(() => this._open(), delay);
    } else {
      this._failQueued(ClientCode.CLOSED, "client is closed");
      this._listenForWake(false);
      this._setState("closed");
    }
    /** @type {CloseDetail} */
    const detail = { code, reason, reconnect, delay };
    this._emit("close", detail);
  }

  _armWatchdog() {
    clearTimeout(this._watchdog);
    const ws = this._ws;
    this._watchdog = setTimeout(() => {
      if (ws && ws === this._ws) this._socketGone(ws, 4000, `no message from the server for ${this.timeout} ms`, true);
    }, this.timeout);
  }

  _wake() {
    if (this._stopped) return;
    if (typeof document !== "undefined" && document.visibilityState === "hidden") return;
    if (this.state === "reconnecting") {
      clearTimeout(this._retryTimer);
      this._open();
    } else if (this._loggedIn) {
      this._send(Command.PING, {}); // a tab back from the background: prove the socket is alive
    }
  }

  /** @param {boolean} on */
  _listenForWake(on) {
    if (!this._wakeOnVisible || on === this._wakeListening) return;
    if (typeof document === "undefined" || typeof window === "undefined") return;
    this._wakeListening = on;
    const method = on ? "addEventListener" : "removeEventListener";
    document[method]("visibilitychange", this._onWake);
    window[method]("online", this._onWake);
  }

  // --- requests ---

  /**
   * @param {number} command
   * @param {object} data
   * @returns {Promise<any>}
   */
  _request(command, data) {
    return new Promise((resolve, reject) => {
      if (this._stopped) {
        reject(new PresenceError(ClientCode.CLOSED, "client is closed"));
        return;
      }
      /** @type {PendingRequest} */
      const req = { command, data, resolve, reject, timer: undefined, done: false };
      const ms = this.requestTimeout;
      req.timer = setTimeout(() => {
        // A sent request keeps its place in the FIFO so the late reply is matched to it and dropped.
        const i = this._queued.indexOf(req);
        if (i >= 0) this._queued.splice(i, 1);
        this._settle(req, new PresenceError(ClientCode.TIMEOUT, `no reply to command ${command} within ${ms} ms`));
      }, ms);
      if (this._loggedIn) this._transmit(req);
      else this._queued.push(req);
    });
  }

  /** @param {PendingRequest} req */
  _transmit(req) {
    const queue = /** @type {PendingRequest[]} */ (this._inflight.get(req.command));
    queue.push(req);
    if (!this._send(req.command, req.data)) {
      queue.pop();
      this._settle(req, new PresenceError(ClientCode.DISCONNECTED, "socket is not open"));
    }
  }

  /**
   * @param {number} command
   * @param {Record<string, any>} envelope the reply's `{code, msg, data}`
   */
  _onReply(command, envelope) {
    const req = /** @type {PendingRequest[]} */ (this._inflight.get(command)).shift();
    if (!req || req.done) return;
    if (envelope.code === 200) this._settle(req, null, envelope.data);
    else this._settle(req, new PresenceError(Number(envelope.code) || 0, String(envelope.msg ?? "request failed")));
  }

  /**
   * @param {PendingRequest} req
   * @param {PresenceError|null} error
   * @param {any} [value]
   */
  _settle(req, error, value) {
    if (req.done) return;
    req.done = true;
    clearTimeout(req.timer);
    if (error) req.reject(error);
    else req.resolve(value);
  }

  /**
   * @param {number} code
   * @param {string} msg
   */
  _failQueued(code, msg) {
    for (const req of this._queued.splice(0)) this._settle(req, new PresenceError(code, msg));
  }

  // --- output ---

  /**
   * @param {number} command
   * @param {object} data
   * @returns {boolean} whether it was handed to the socket
   */
  _send(command, data) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    const { appId, clientType, imei, version } = this;
    ws.send(JSON.stringify({ command, appId, clientType, imei, version, data }));
    return true;
  }

  /**
   * @param {string} type
   * @param {any} detail
   * @param {Record<string, any>|null} [pack]
   */
  _emit(type, detail, pack = null) {
    this.dispatchEvent(new PresenceEvent(type, detail, pack));
  }

  /** @param {ClientState} state */
  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", state);
  }
}

/**
 * "ws://", "wss://", or an http(s) / relative URL resolved against the page and switched to ws(s).
 * @param {string} url
 * @returns {string}
 */
function toWebSocketUrl(url) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u.href;
}

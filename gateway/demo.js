// @ts-check
/**
 * The demo page's logic (dev mode only): sign in as any user, see friends' presence live, set a custom
 * status, add friends, watch a non-friend for N seconds, and see sync events from your other tabs.
 *
 * Push plus pull: every push updates one user in `users`; every login that did not resume re-pulls
 * friends, yourself and live subscriptions ('resync'). Times shown as "N s ago" use the server's
 * clock (Redis TIME, the clock of lastSeen and eventIds), estimated from /v1/dev/config and pushes.
 */
import { PresenceClient, PresenceError, Status } from "./presence-client.js";

const CLIENT_TYPE_NAMES = ["Server", "Web", "iOS", "Android", "Windows", "Mac"];
/** customStatus is app-defined; these are the demo's. */
const MOODS = new Map([
  [0, "Available"],
  [1, "Busy"],
  [2, "Away"],
  [3, "Do not disturb"],
  [4, "In a meeting"],
]);
const LOG_MAX = 50;

/**
 * @typedef {import("./presence-client.js").Session} Session
 * @typedef {import("./presence-client.js").UserOnlineStatus} UserOnlineStatus
 * @typedef {{userId: string, status: number, sessions: Session[], customStatus: number|null,
 *            customText: string|null, lastSeen: number|null}} UserView
 */

const state = {
  /** @type {{appId: number, wsUrl: string, serverTime: number} | null} */
  config: null,
  clockOffset: 0, // server ms - local ms
  /** @type {string|null} */
  me: null,
  /** @type {string|null} */
  sign: null,
  /** @type {PresenceClient|null} */
  client: null,
  /** @type {Map<string, UserView>} */
  users: new Map(),
  /** @type {Set<string>} */
  friends: new Set(),
  /** @type {Map<string, {until: number, expired: boolean}>} until: local ms */
  subs: new Map(),
  /** @type {{customStatus: number, customText: string} | null} */
  pendingCustom: null,
  generation: 0, // bumps on every sign-in, so replies meant for a previous user are dropped
  /** @type {ReturnType<typeof setInterval>|undefined} the "reconnecting in N s" countdown */
  countdown: undefined,
};

// --- small helpers ---

/**
 * @param {string} testId
 * @returns {HTMLElement}
 */
function el(testId) {
  const node = document.querySelector(`[data-testid="${CSS.escape(testId)}"]`);
  if (!node) throw new Error(`missing [data-testid=${testId}]`);
  return /** @type {HTMLElement} */ (node);
}

/**
 * Build an element: h("span", {class: "x", "data-testid": "y"}, "text", child...). Text is never parsed as HTML.
 * @param {string} tag
 * @param {Record<string, string|number|boolean|null|undefined>} [attrs]
 * @param {...(Node|string|null|undefined|false)} children
 */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function serverNow() {
  return Date.now() + state.clockOffset;
}

/** @param {string|null} eventId a stream id "ms-seq": its ms is the server's clock when the event was written */
function noteServerTime(eventId) {
  if (!eventId) return;
  const ms = Number(eventId.split("-")[0]);
  // The event cannot be newer than the server's clock: the offset is at least this.
  if (Number.isFinite(ms) && ms - Date.now() > state.clockOffset) state.clockOffset = ms - Date.now();
}

/** @param {number} ms */
function ago(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** @param {Session[]} sessions */
function devicesText(sessions) {
  /** @type {Map<string, number>} */
  const counts = new Map();
  for (const s of sessions) {
    const name = CLIENT_TYPE_NAMES[s.clientType] ?? `type ${s.clientType}`;
    counts.set(name, (counts.get(name) ?? 0) + 1);
  }
  return Array.from(counts, ([name, n]) => (n > 1 ? `${name} ×${n}` : name)).join(" · ");
}

/** @param {Session} s */
function deviceName(s) {
  return `${CLIENT_TYPE_NAMES[s.clientType] ?? `type ${s.clientType}`} ${s.imei}`;
}

/** @param {number|null} customStatus */
function moodText(customStatus) {
  if (customStatus === null || customStatus === 0) return "";
  return MOODS.get(customStatus) ?? `status ${customStatus}`;
}

/** @param {UserView} u */
function seenText(u) {
  if (u.status === Status.ONLINE) return "online now";
  return u.lastSeen ? `last seen ${ago(serverNow() - u.lastSeen)}` : "never seen";
}

/** @param {unknown} err */
function errorText(err) {
  if (err instanceof PresenceError) return `${err.msg} (${err.code})`;
  return err instanceof Error ? err.message : String(err);
}

/**
 * @param {string} text
 * @param {"error"|"info"} [kind]
 */
function banner(text, kind = "error") {
  const node = el("banner");
  node.textContent = text;
  node.className = kind === "info" ? "banner info" : "banner";
  node.hidden = !text;
}

/**
 * A REST call answered with the {code, msg, data} envelope; resolves with data, rejects with PresenceError.
 * @param {string} path relative to the page, e.g. "v1/dev/config"
 * @param {{method?: string, query?: Record<string, string|number>, body?: unknown}} [options]
 */
async function api(path, { method = "GET", query = {}, body } = {}) {
  const url = new URL(path, location.href);
  url.search = "";
  for (const [k, v] of Object.entries(query)) url.searchParams.set(k, String(v));
  /** @type {RequestInit} */
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(body);
  }
  const res = await fetch(url, init);
  let envelope = null;
  try {
    envelope = await res.json();
  } catch {
    // not JSON: reported below
  }
  if (!envelope || typeof envelope.code !== "number") {
    throw new PresenceError(res.status, `${method} ${url.pathname}: HTTP ${res.status}`);
  }
  if (envelope.code !== 200) throw new PresenceError(envelope.code, envelope.msg);
  return envelope.data;
}

function authQuery() {
  const { config, me, sign } = state;
  if (!config || !me || !sign) throw new PresenceError(-3, "not signed in");
  return { appId: config.appId, identifier: me, userSign: sign };
}

/** @param {string} userId */
async function fetchSign(userId) {
  const data = await api("v1/dev/userSign", { query: { userId } });
  if (state.me === userId) state.sign = data.userSign;
  return /** @type {string} */ (data.userSign);
}

/**
 * The client's userSign provider: the sign fetched at sign-in for the first login, a fresh one for every
 * later one (so an expired sign heals on the next reconnect).
 * @param {string} userId
 */
function freshSign(userId) {
  let first = true;
  return async () => {
    if (first && state.sign) {
      first = false;
      return state.sign;
    }
    return fetchSign(userId);
  };
}

/** One device id per tab (kept across reloads of the tab); ?imei= overrides it. */
function tabImei() {
  const fromUrl = new URLSearchParams(location.search).get("imei");
  if (fromUrl) return fromUrl;
  const key = "presence-demo-imei";
  try {
    let imei = sessionStorage.getItem(key);
    if (!imei) {
      imei = `tab-${crypto.getRandomValues(new Uint32Array(1))[0].toString(36)}`;
      sessionStorage.setItem(key, imei);
    }
    return imei;
  } catch {
    return `tab-${crypto.getRandomValues(new Uint32Array(1))[0].toString(36)}`;
  }
}

// --- the user store ---

/** @param {string} userId */
function user(userId) {
  let u = state.users.get(userId);
  if (!u) {
    u = { userId, status: Status.OFFLINE, sessions: [], customStatus: null, customText: null, lastSeen: null };
    state.users.set(userId, u);
  }
  return u;
}

/** @param {Record<string, UserOnlineStatus>} result */
function applyQuery(result) {
  for (const [userId, st] of Object.entries(result)) {
    const u = user(userId);
    u.status = st.status;
    u.sessions = st.session ?? [];
    u.customStatus = st.customStatus ?? null;
    u.customText = st.customText ?? null;
    u.lastSeen = st.lastSeen ?? u.lastSeen;
  }
}

// --- rendering ---

/**
 * @param {UserView} u
 * @param {"friend"|"sub"} kind
 */
function personItem(u, kind) {
  const p = kind === "friend" ? "" : "sub-";
  const id = u.userId;
  const online = u.status === Status.ONLINE;
  const sub = kind === "sub" ? state.subs.get(id) : undefined;
  const li = h("li", {
    class: "person",
    "data-testid": `${kind}-${id}`,
    "data-user": id,
    "data-status": online ? "online" : "offline",
    "data-expired": sub ? String(sub.expired) : null,
  });
  li.append(
    h("span", { class: "dot", role: "img", "aria-label": online ? "online" : "offline", title: online ? "online" : "offline" }),
    h(
      "div",
      { class: "who" },
      h("div", { class: "name" }, id, " ", h("span", { class: "mood", "data-testid": `${p}mood-${id}` }, moodText(u.customStatus))),
      h("div", { class: "custom", "data-testid": `${p}custom-${id}` }, u.customText ?? ""),
      h(
        "div",
        { class: "meta" },
        h("span", { class: "seen", "data-testid": `${p}lastseen-${id}`, "data-user": id }, seenText(u)),
        h("span", { class: "devs", "data-testid": `${p}devices-${id}` }, online ? devicesText(u.sessions) : ""),
        sub && h("span", { class: "countdown", "data-testid": `countdown-${id}`, "data-user": id }, countdownText(sub)),
        sub && sub.expired && h("button", { type: "button", class: "link", "data-renew": id }, "watch again"),
      ),
    ),
  );
  return li;
}

/** @param {{until: number, expired: boolean}} sub */
function countdownText(sub) {
  if (sub.expired) return "expired";
  return `${Math.max(0, Math.ceil((sub.until - Date.now()) / 1000))} s left`;
}

function renderFriends() {
  const list = el("friends");
  const ids = Array.from(state.friends).sort();
  list.replaceChildren(...ids.map((id) => personItem(user(id), "friend")));
  el("friends-empty").hidden = ids.length > 0;
  const online = ids.filter((id) => user(id).status === Status.ONLINE).length;
  el("friends-count").textContent = ids.length ? `${online}/${ids.length} online` : "";
}

function renderSubs() {
  const ids = Array.from(state.subs.keys()).sort();
  el("subs").replaceChildren(...ids.map((id) => personItem(user(id), "sub")));
}

function renderMe() {
  const { me, client } = state;
  if (!me || !client) return;
  const u = user(me);
  el("me-name").textContent = me;
  el("me-imei").textContent = client.imei;
  // Grey while the socket is down: this tab is not online, whatever the last push said.
  el("me-dot").dataset.status = u.status === Status.ONLINE && client.state === "open" ? "online" : "offline";
  el("me-mood").textContent = moodText(u.customStatus);
  el("me-custom").textContent = u.customText ?? "";
  showCustomForm(u);
  el("my-devices").replaceChildren(
    ...u.sessions.map((s) => {
      const self = s.imei === client.imei && s.clientType === client.clientType;
      return h(
        "li",
        { "data-testid": `device-${s.imei}` },
        deviceName(s),
        self ? h("span", { class: "this" }, "this tab") : null,
      );
    }),
  );
}

/**
 * The status form shows the current mood and text, unless the user is editing it.
 * @param {UserView} u
 */
function showCustomForm(u) {
  const form = el("custom-form");
  if (form.contains(document.activeElement) && document.activeElement !== document.body) return;
  const select = /** @type {HTMLSelectElement} */ (el("custom-status-input"));
  const value = String(u.customStatus ?? 0);
  if (!Array.from(select.options).some((o) => o.value === value)) {
    select.append(h("option", { value }, moodText(u.customStatus) || `status ${value}`));
  }
  select.value = value;
  /** @type {HTMLInputElement} */ (el("custom-text-input")).value = u.customText ?? "";
}

/** Re-render whatever shows this user. @param {string} userId */
function renderUser(userId) {
  if (userId === state.me) renderMe();
  if (state.friends.has(userId)) renderFriends();
  if (state.subs.has(userId)) renderSubs();
}

function renderAll() {
  renderMe();
  renderFriends();
  renderSubs();
}

/** @param {string} text */
function logSync(text) {
  const list = el("sync-log");
  const now = new Date();
  list.prepend(
    h("li", { "data-testid": "sync-event" }, h("time", { datetime: now.toISOString() }, now.toLocaleTimeString()), h("span", {}, text)),
  );
  while (list.children.length > LOG_MAX) list.lastElementChild?.remove();
  el("sync-empty").hidden = true;
}

/** @param {string} clientState @param {string} [text] */
function renderConn(clientState, text) {
  const badge = el("conn-state");
  badge.dataset.state = clientState;
  const labels = /** @type {Record<string, string>} */ ({
    idle: "not connected",
    connecting: "connecting…",
    open: "online",
    reconnecting: "reconnecting…",
    closed: "offline",
  });
  badge.textContent = text ?? labels[clientState] ?? clientState;
  el("app").dataset.live = String(clientState === "open");
}

/** Every second: "N s ago" and countdowns move; subscriptions expire. */
function tick() {
  for (const node of document.querySelectorAll(".seen[data-user]")) {
    const u = state.users.get(/** @type {HTMLElement} */ (node).dataset.user ?? "");
    if (u) node.textContent = seenText(u);
  }
  let expired = false;
  for (const sub of state.subs.values()) {
    if (!sub.expired && sub.until <= Date.now()) {
      sub.expired = true; // the server stops pushing at the same moment (its clock, same duration)
      expired = true;
    }
  }
  if (expired) renderSubs();
  for (const node of document.querySelectorAll(".countdown[data-user]")) {
    const sub = state.subs.get(/** @type {HTMLElement} */ (node).dataset.user ?? "");
    if (sub) node.textContent = countdownText(sub);
  }
}

// --- the connection ---

/** Re-pull everything shown: friends, yourself, live subscriptions. */
async function resync() {
  const { client, me, generation } = state;
  if (!client || !me) return;
  try {
    const [friends, mine] = await Promise.all([client.pull(), client.pull([me])]);
    const live = Array.from(state.subs).filter(([, s]) => !s.expired).map(([id]) => id);
    const watched = live.length ? await client.pull(live) : {};
    if (generation !== state.generation) return;
    state.friends = new Set(Object.keys(friends));
    applyQuery(friends);
    applyQuery(mine);
    applyQuery(watched);
    renderAll();
  } catch (err) {
    if (generation === state.generation) banner(`Could not load presence: ${errorText(err)}`);
  }
}

/** @param {string} userId */
async function signIn(userId) {
  const config = state.config;
  if (!config) return;
  state.client?.close();
  state.generation += 1;
  Object.assign(state, { me: userId, sign: null, client: null, pendingCustom: null });
  state.users.clear();
  state.friends.clear();
  state.subs.clear();
  el("sync-log").replaceChildren();
  el("sync-empty").hidden = false;
  banner("");
  const params = new URLSearchParams(location.search);
  params.set("user", userId);
  history.replaceState(null, "", `?${params}`);
  document.title = `${userId} · Presence demo`;
  try {
    await fetchSign(userId); // fails fast on a bad user id, before a socket is opened
  } catch (err) {
    banner(`Cannot sign in as ${userId}: ${errorText(err)}`);
    return;
  }
  const client = new PresenceClient({
    url: config.wsUrl,
    appId: config.appId,
    userId,
    userSign: freshSign(userId),
    imei: tabImei(),
    autoConnect: false,
  });
  state.client = client;
  el("app").hidden = false;
  el("login").dataset.signedIn = "true";
  wire(client);
  renderAll();
  client.connect();
  Object.assign(window, { presenceDemo: { client, state } }); // for the console
}

/** @param {PresenceClient} client */
function wire(client) {
  const me = /** @type {string} */ (state.me);
  const mine = () => state.client === client;
  client.on("state", (s) => {
    if (!mine()) return;
    if (s !== "reconnecting") clearInterval(state.countdown);
    renderConn(s);
    renderMe();
  });
  client.on("open", () => {
    if (!mine()) return;
    banner("");
    user(me).status = Status.ONLINE;
    renderMe();
  });
  client.on("resync", () => mine() && resync());
  client.on("close", (detail) => {
    if (!mine()) return;
    renderMe(); // own dot grey
    if (!detail.reconnect) return;
    const until = Date.now() + (detail.delay ?? 0);
    const show = () => {
      if (!mine() || client.state !== "reconnecting") {
        clearInterval(state.countdown);
        return;
      }
      renderConn("reconnecting", `reconnecting in ${Math.max(0, Math.ceil((until - Date.now()) / 1000))} s`);
    };
    clearInterval(state.countdown);
    show();
    state.countdown = setInterval(show, 250);
  });
  client.on("friendship", (data) => {
    if (!mine()) return;
    const friends = data.friends ?? {};
    for (const id of Object.keys(friends)) {
      if (data.action === "delete") state.friends.delete(id);
      else state.friends.add(id);
    }
    applyQuery(friends);
    renderFriends();
    renderSubs();
  });
  client.on("message", (_pack, event) => noteServerTime(event.eventId));
  client.on("status", (data, event) => {
    if (!mine()) return;
    const u = user(data.userId);
    u.status = data.status;
    u.sessions = data.client ?? [];
    if (data.status === Status.OFFLINE) u.lastSeen = event.eventId ? Number(event.eventId.split("-")[0]) : serverNow();
    // A push from someone we neither befriended nor watch: they made us friends from their side.
    if (!state.friends.has(data.userId) && !state.subs.has(data.userId)) state.friends.add(data.userId);
    renderUser(data.userId);
  });
  client.on("sync", (data) => {
    if (!mine()) return;
    const u = user(me);
    const before = new Map(u.sessions.map((s) => [`${s.clientType}:${s.imei}`, s]));
    const after = new Map((data.client ?? []).map((/** @type {Session} */ s) => [`${s.clientType}:${s.imei}`, s]));
    u.sessions = Array.from(after.values());
    u.status = data.status;
    for (const [key, s] of after) if (!before.has(key)) logSync(`${deviceName(s)} came online`);
    for (const [key, s] of before) if (!after.has(key)) logSync(`${deviceName(s)} went offline`);
    renderMe();
  });
  client.on("custom", (data) => {
    if (!mine()) return;
    const u = user(data.userId);
    u.customStatus = data.customStatus;
    u.customText = data.customText;
    if (data.userId === me) {
      const pending = state.pendingCustom;
      const here = pending && pending.customStatus === data.customStatus && pending.customText === data.customText;
      if (here) state.pendingCustom = null;
      const mood = moodText(data.customStatus);
      const what = data.customText ? `"${data.customText}"` : "cleared";
      logSync(`Custom status ${what}${mood ? ` (${mood})` : ""} set ${here ? "in this tab" : "on another device"}`);
    } else if (!state.friends.has(data.userId) && !state.subs.has(data.userId)) {
      // Someone new (a friend added elsewhere) whose custom status came first: pull their presence too.
      state.friends.add(data.userId);
      client
        .pull([data.userId])
        .then((result) => {
          if (!mine()) return;
          applyQuery(result);
          renderUser(data.userId);
        })
        .catch(() => {}); // the next resync pulls it
    }
    renderUser(data.userId);
  });
  client.on("kicked", (data) => {
    if (!mine()) return;
    const by = CLIENT_TYPE_NAMES[data.clientType] ?? `type ${data.clientType}`;
    banner(`Signed out here: ${me} logged in on another ${by} device (${data.imei}). Connect to come back.`);
    renderConn("closed", "kicked");
  });
  client.on("error", (data) => mine() && banner(`Gateway error: ${data.msg} (${data.code})`));
}

// --- forms ---

/**
 * @param {string} testId
 * @param {(form: HTMLFormElement) => Promise<void>} handler
 */
function onSubmit(testId, handler) {
  const form = /** @type {HTMLFormElement} */ (el(testId));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const buttons = form.querySelectorAll("button");
    buttons.forEach((b) => (b.disabled = true));
    try {
      await handler(form);
    } catch (err) {
      banner(errorText(err));
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
  });
}

/** @param {string} testId */
function inputValue(testId) {
  return /** @type {HTMLInputElement} */ (el(testId)).value.trim();
}

/**
 * @param {string} target
 * @param {number} seconds
 */
async function watch(target, seconds) {
  const client = /** @type {PresenceClient} */ (state.client);
  const ms = Math.round(seconds * 1000);
  await client.subscribe([target], ms);
  state.subs.set(target, { until: Date.now() + ms, expired: false });
  applyQuery(await client.pull([target]));
  renderSubs();
}

function setupForms() {
  const select = /** @type {HTMLSelectElement} */ (el("custom-status-input"));
  for (const [value, label] of MOODS) select.append(h("option", { value }, label));

  onSubmit("login-form", async () => {
    const userId = inputValue("user-input");
    if (!userId) {
      banner("Enter a user id to connect as (1 to 64 characters, without | { or }).");
      el("user-input").focus();
      return;
    }
    await signIn(userId);
  });

  onSubmit("custom-form", async () => {
    const customStatus = Number(select.value);
    const customText = inputValue("custom-text-input");
    state.pendingCustom = { customStatus, customText };
    await api("v1/user/setUserCustomerStatus", { method: "POST", query: authQuery(), body: { customStatus, customText } });
    const u = user(/** @type {string} */ (state.me));
    u.customStatus = customStatus;
    u.customText = customText;
    renderMe();
  });

  onSubmit("add-friend-form", async (form) => {
    const friendId = inputValue("add-friend-input");
    if (!friendId || !state.me || !state.client) return;
    await api("v1/dev/friends", { method: "POST", query: { userId: state.me, friendId } });
    state.friends.add(friendId);
    applyQuery(await state.client.pull([friendId]));
    renderFriends();
    form.reset();
  });

  onSubmit("subscribe-form", async () => {
    const target = inputValue("subscribe-input");
    const seconds = Number(inputValue("subscribe-seconds")) || 60;
    if (!target || !state.client) return;
    await watch(target, seconds);
    /** @type {HTMLInputElement} */ (el("subscribe-input")).value = "";
  });

  el("subs").addEventListener("click", async (event) => {
    const button = /** @type {HTMLElement} */ (event.target).closest("button[data-renew]");
    if (!button) return;
    const target = /** @type {HTMLElement} */ (button).dataset.renew ?? "";
    try {
      await watch(target, Number(inputValue("subscribe-seconds")) || 60);
    } catch (err) {
      banner(errorText(err));
    }
  });
}

async function main() {
  setupForms();
  renderConn("idle");
  const input = /** @type {HTMLInputElement} */ (el("user-input"));
  const fromUrl = new URLSearchParams(location.search).get("user") ?? "";
  input.value = fromUrl;
  try {
    const started = Date.now();
    state.config = await api("v1/dev/config");
    const config = /** @type {{appId: number, wsUrl: string, serverTime: number}} */ (state.config);
    state.clockOffset = config.serverTime - (started + Date.now()) / 2;
  } catch (err) {
    banner(`This page needs a presence server in dev mode (GET v1/dev/config failed: ${errorText(err)})`);
    return;
  }
  setInterval(tick, 1000);
  if (fromUrl) await signIn(fromUrl);
  else input.focus();
}

main();

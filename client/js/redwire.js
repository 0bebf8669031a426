/**
 * Redwire browser client: publish and subscribe over one WebSocket (docs/protocol.md).
 *
 * A plain ES module: no dependencies, no build step; every worker serves it at `/redwire.js`.
 * It speaks the JSON encoding (`redwire.json`, text frames) only.
 *
 *     import { connect } from "/redwire.js";
 *     const client = connect();                     // same host as the page, ws: or wss:
 *     const sub = client.subscribe("chat.lobby", (data, meta) => show(meta.topic, data));
 *     await sub.ready;                              // the server acknowledged it
 *     await client.publish("chat.lobby", { text: "hi" });   // resolves on the server's ack
 *     const off = client.on("disconnected", ({ code, willReconnect }) => ...);
 *     sub.unsubscribe(); client.close();
 *
 *     // Topics with history (docs/protocol.md, "History, recovery and presence"):
 *     const feed = client.subscribe("feed.news", (data, { offset, epoch }) => show(data), {
 *       since: JSON.parse(localStorage.getItem("feed.news") ?? "null") ?? undefined,
 *       onGap: ({ reason }) => reloadFromTheSourceOfTruth(),   // messages may be missing
 *       onPresence: ({ type, client, info }) => ...,           // "join" / "leave"
 *     });
 *     localStorage.setItem("feed.news", JSON.stringify(client.position("feed.news")));
 *     const here = await client.presence("feed.news");         // {clientId: info, ...}
 *
 * Theory of operation
 *
 *   state        "connecting" ──welcome──▶ "open" ──socket lost──▶ "connecting" (backoff)
 *                      │                      │
 *                      └──── close() or a close code that forbids reconnecting ──▶ "closed"
 *
 * - The topic table (`topic → TopicState`) is the source of truth for subscriptions: every
 *   topic in it is subscribed after each `welcome`, so a reconnect resubscribes everything.
 *   Several local subscriptions to one topic share one subscription on the wire.
 * - Every request carries an integer `id`; `pending` maps it to what waits for the reply
 *   (`ack` or `error`). When the socket goes, subscriptions stay in the table; a publish in
 *   flight without a `key` is rejected with `outcome_unknown` (the server may or may not have
 *   published it: resending could duplicate); one with a `key` goes back to the front of the
 *   queue and is sent again, with the same key, after the next `welcome`.
 * - Publish outcomes: a rejection's `.code` is the wire code. `unavailable`: NOT published,
 *   a retry is safe; `outcome_unknown`: it may have been published, retry only with the same
 *   `key`. Nothing is retried without a key; a publish with a key is retried (same key) after
 *   `unavailable` / `outcome_unknown` with backoff, at most `maxPublishRetries` times.
 * - Publishes made while not open are queued (up to `maxQueuedPublishes`, then rejected with
 *   `queue_full`) and sent after the resubscriptions, once `welcome` arrives: they were never
 *   written, so sending them later cannot duplicate.
 * - Reconnect delay: "full jitter", random(0, min(maxDelayMs, minDelayMs * 2^attempt)); the
 *   attempt count resets once a connection has stayed open for `healthyAfterMs`. What a close
 *   code means is one table, `CLOSE_CODE_POLICY` (docs/protocol.md, "Close codes"; the Python
 *   client exports the same): 1001 (the worker is draining) reconnects at once; 1000, 1002,
 *   1003, 1007, 1008, 1009 and 1010 never reconnect (a retry cannot help); 4001 (the token
 *   expired) reconnects at once with a new token from the token function (never with a
 *   fixed token); anything else (1011, 1012, 1013, 1006, ...) backs off.
 * - Heartbeat: browsers cannot send protocol pings, so after `welcome` the client sends
 *   `{"op":"ping"}` every `heartbeat.interval` s; if no frame at all arrives within
 *   `heartbeat.timeout` s after a ping, the socket is abandoned and a reconnect follows. A
 *   socket that does not deliver `welcome` within `connectTimeoutMs` is abandoned the same way.
 * - In a page, `pagehide` closes the socket; `pageshow` from the back/forward cache reopens it.
 * - Connection token (docs/protocol.md, "Authentication"): `token` is a string or a function
 *   returning one (or a promise of one). A function is asked before every connection
 *   attempt, and again whenever the server sends `{"op":"refresh"}` (its token nears `exp`):
 *   the client answers `{"op":"refresh","token":...}` by itself. The token travels as the
 *   `token` query parameter (`tokenTransport: "query"`, the default) or as a
 *   `redwire.token.<jwt>` subprotocol entry (`"protocol"`: kept out of URLs and their logs).
 *   Close 4001 (the token expired without a refresh) reconnects at once with a fresh token
 *   from the function; with a fixed string it ends the client, as "never" codes do.
 *
 * Recovery (topics with history; others have no offsets and none of this applies)
 *
 * - Each TopicState keeps `position`, `{offset, epoch}`: every subscribe ack sets it (the
 *   ack says where the subscription starts from), every `message` moves it, a `gap` frame with
 *   `to` moves it to `{offset: to, epoch}`; a gap without `to` leaves it (the messages that
 *   follow carry the new epoch). A subscription may start from a stored position (`since` in
 *   the subscribe options; it only counts when it creates the topic's wire subscription).
 * - Every (re)subscription of a topic with a known position carries `"since": position`. The
 *   server replays what was missed and acks `recovered: true` with the position asked for, or
 *   acks `recovered: false` (another epoch, or history no longer reaches back).
 * - Every break is surfaced: after a reconnect, a topic without history (its ack has no
 *   position), and any topic whose resubscription (or `since`) was not recovered exactly from
 *   its position, reports a gap with reason "not_recovered", before any message that follows.
 * - A `message` whose offset is <= the position's in the same epoch was seen already: it is
 *   dropped and counted (`client.stats.duplicatesDropped`); the server should never send one.
 *   Nothing above the position is ever dropped. A message in another epoch starts the topic
 *   over at its offset.
 * - A `gap` frame (missing messages the server could not fill: `{topic, epoch, from, to}`, or
 *   just `{topic}` on a topic without history) is reported with reason "server" and its
 *   `epoch`/`from`/`to` (null when not given).
 * - Gaps and presence changes (`join` / `leave` frames) go to the `onGap` / `onPresence` of
 *   every local subscription of the topic, then to the "gap" / "presence" events. Frames for a
 *   topic not in the table (left over after an unsubscribe) are ignored, like messages.
 * - `presence(topic)` asks who is subscribed; it waits in the publish queue while not open and
 *   fails with `connection_lost` if the socket goes before the answer (asking again is safe).
 *
 * Events (`client.on(name, fn)` returns a function that removes the listener):
 *   "state"        (state)                                  every state change
 *   "welcome"      (frame)                                  the server's welcome frame
 *   "connected"    ({worker, clientId, reconnected})        after each welcome
 *   "disconnected" ({code, reason, willReconnect, delayMs}) a socket closed or failed to
 *                  open (1006 when the client gave up on a silent one); delayMs: until the
 *                  next attempt
 *   "error"        (RedwireError)  server errors no promise receives (an error frame without a
 *                  known id, a failed (re)subscription: `.topic` is set), unreadable frames, and
 *                  a close that stops reconnecting (`.code` "closed", `.closeCode` set)
 *   "gap"          ({topic, reason, epoch?, from?, to?})  messages of `topic` may be missing:
 *                  reason "not_recovered" (a reconnect on a topic without history, or a
 *                  resubscription that could not replay them) or "server" (a `gap` frame;
 *                  `epoch`/`from`/`to` say which offsets, null when not given; no `to`: the
 *                  epoch ended)
 *   "presence"     ({type, topic, client, info})  `type` "join" or "leave", on topics with
 *                  `join_leave`
 * A listener that throws is reported (`reportError`) and does not disturb the others.
 */

/** Options that `connect` fills in when they are not given. */
export const DEFAULTS = Object.freeze({
  path: "/ws",
  protocols: Object.freeze(["redwire.json"]),
  minDelayMs: 500,
  maxDelayMs: 30_000,
  healthyAfterMs: 5_000,
  connectTimeoutMs: 10_000,
  maxQueuedPublishes: 1000,
  maxPublishRetries: 5,
  tokenTransport: "query",
});

/**
 * What the client does after the server closed with a code (docs/protocol.md, "Close
 * codes"; client/pubsub.py `CLOSE_CODE_POLICY` is the same table): "never" reconnect,
 * reconnect "now", or after a "backoff"; "refresh": get a new token from the token function,
 * then reconnect (with a fixed token: as "never"). Codes not listed (1006, 1005, other
 * 4xxx...) back off.
 * @type {Readonly<Record<number, "never" | "now" | "backoff" | "refresh">>}
 */
export const CLOSE_CODE_POLICY = Object.freeze({
  1000: "never", // normal closure
  1001: "now", // the server drains or restarts: another worker takes us at once
  1002: "never", // we broke RFC 6455
  1003: "never", // we sent data it cannot accept
  1007: "never", // invalid UTF-8
  1008: "never", // policy: too many bad requests, or the application refused
  1009: "never", // a message over the limit
  1010: "never", // a mandatory extension missing
  1011: "backoff", // server error
  1012: "backoff", // service restart
  1013: "backoff", // slow consumer / try again later
  4001: "refresh", // the token expired: get a new one, then reconnect
});

/** Close codes after which reconnecting cannot help (derived from `CLOSE_CODE_POLICY`). */
export const NO_RECONNECT_CLOSE_CODES = Object.freeze(
  Object.entries(CLOSE_CODE_POLICY)
    .filter(([, policy]) => policy === "never")
    .map(([code]) => Number(code)),
);
/** The worker is shutting down or restarting: another one takes the connection at once. */
export const CLOSE_GOING_AWAY = 1001;
/** What the client reports when it abandons a socket that went silent (like the browser). */
export const CLOSE_ABNORMAL = 1006;
/** The server closed: the connection token expired without a refresh (get a new token). */
export const CLOSE_TOKEN_EXPIRED = 4001;
/** The close code the client sends on a socket it abandons (RFC 6455 7.4.2: private use). */
const CLOSE_CLIENT_TIMEOUT = 4000;

const EVENTS = new Set([
  "state",
  "welcome",
  "connected",
  "disconnected",
  "error",
  "gap",
  "presence",
]);

/**
 * @typedef {"connecting" | "open" | "closed"} ClientState
 * @typedef {{topic: string, offset?: number, epoch?: string}} MessageMeta
 *   offset/epoch: on topics with history
 * @typedef {(data: unknown, meta: MessageMeta) => void} MessageHandler
 * @typedef {{offset: number, epoch: string}} Position  a place in a topic's history
 * @typedef {{topic: string, reason: "not_recovered" | "server", epoch?: string | null,
 *   from?: number | null, to?: number | null}} GapInfo  epoch/from/to: only for "server"
 * @typedef {{type: "join" | "leave", topic: string, client: string, info: unknown}}
 *   PresenceEvent
 *
 * @typedef {object} SubscribeOptions
 * @property {(gap: GapInfo) => void} [onGap]  messages may be missing: resync the topic
 * @property {(event: PresenceEvent) => void} [onPresence]  join/leave of the topic
 * @property {Position} [since]  start after this position (e.g. one stored by a previous
 *   page): what was published since is replayed, or a "not_recovered" gap is reported
 * @typedef {{interval: number, timeout: number}} Heartbeat
 * @typedef {{
 *   op: "welcome", version: number, client: string, worker: string, heartbeat?: Heartbeat
 * }} WelcomeFrame
 * @typedef {{code: number, reason: string, willReconnect: boolean, delayMs: number | null}}
 *   DisconnectInfo
 * @typedef {{worker: string, clientId: string, reconnected: boolean}} ConnectInfo
 *
 * @typedef {() => string | Promise<string>} TokenProvider
 *
 * @typedef {object} ReconnectOptions
 * @property {number} [minDelayMs]      base of the exponential backoff (default 500)
 * @property {number} [maxDelayMs]      cap of the backoff (default 30000)
 * @property {number} [healthyAfterMs]  open this long: the next failure starts from attempt 0
 *
 * @typedef {object} ConnectOptions
 * @property {string | TokenProvider} [token] a connection token, or a function returning a
 *   fresh one (asked before each attempt and when the server asks for a refresh)
 * @property {"query" | "protocol"} [tokenTransport] the `token` query parameter (default)
 *   or a `redwire.token.<jwt>` subprotocol entry
 * @property {string[]} [protocols]        WebSocket subprotocols (default ["redwire.json"])
 * @property {ReconnectOptions} [reconnect]
 * @property {number} [maxQueuedPublishes] publishes held while disconnected (default 1000)
 * @property {number} [maxPublishRetries]  resends of a publish with a `key` (default 5)
 * @property {number} [connectTimeoutMs]   no welcome this long after opening: retry (10000)
 * @property {typeof WebSocket} [WebSocketImpl] a WebSocket class (default: the global one)
 *
 * @typedef {object} PublishOptions
 * @property {string} [key] an idempotency key (1..64 characters): the publish lands once,
 *   and the client may resend it (same key) when its outcome is unknown
 *
 * @typedef {{topic: string, subs: Set<Subscription>, waiting: Set<Subscription>,
 *   acked: boolean, retries: number, retryTimer: ReturnType<typeof setTimeout> | null,
 *   position: Position | null}} TopicState
 * @typedef {{kind: "publish", item: QueuedRequest & {kind: "publish"}}
 *   | {kind: "subscribe", state: TopicState, since: Position | null, resubscribe: boolean}
 *   | {kind: "unsubscribe", resolve: () => void, reject: (err: RedwireError) => void}
 *   | {kind: "refresh", resolve: () => void, reject: (err: RedwireError) => void}
 *   | {kind: "presence", resolve: (clients: Record<string, unknown>) => void,
 *      reject: (err: RedwireError) => void}}
 *   Pending
 * @typedef {{kind: "publish", topic: string, json: string, key: string | undefined,
 *   sent: boolean, attempts: number, resolve: () => void,
 *   reject: (err: RedwireError) => void}
 *   | {kind: "presence", topic: string, resolve: (clients: Record<string, unknown>) => void,
 *      reject: (err: RedwireError) => void}} QueuedRequest
 */

/**
 * An error from the server (`code` and `reason` of its error frame: `unavailable` = not
 * published, `outcome_unknown` = may have been published, ...) or from the client itself:
 * `outcome_unknown` (a publish sent on a connection that closed before its answer),
 * `queue_full`, `connection_lost` (a presence request), `closed`, `bad_request` (data that
 * is not JSON, a bad key), `bad_frame` (the server sent something unreadable).
 */
export class RedwireError extends Error {
  /**
   * @param {string} code
   * @param {string} reason
   * @param {{topic?: string, closeCode?: number}} [extra]
   */
  constructor(code, reason, extra = {}) {
    super(`${code}: ${reason}`);
    this.name = "RedwireError";
    /** @type {string} */
    this.code = code;
    /** @type {string} */
    this.reason = reason;
    /** @type {string | undefined} the topic of a failed subscription */
    this.topic = extra.topic;
    /** @type {number | undefined} the WebSocket close code that ended the client */
    this.closeCode = extra.closeCode;
  }
}

/**
 * Reconnect delay with full jitter: random(0, min(maxDelayMs, minDelayMs * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 * @param {number} minDelayMs
 * @param {number} maxDelayMs
 * @param {() => number} [random] uniform in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, minDelayMs, maxDelayMs, random = Math.random) {
  const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(attempt, 52));
  return Math.floor(random() * ceiling);
}

/**
 * What to do after the socket closed with `code` (docs/protocol.md, "Close codes").
 * @param {number} code
 * @returns {"never" | "now" | "backoff" | "refresh"}
 */
export function reconnectPolicy(code) {
  return Object.hasOwn(CLOSE_CODE_POLICY, code) ? CLOSE_CODE_POLICY[code] : "backoff";
}

/**
 * The WebSocket URL: `url` resolved against the page (`base`), http(s) turned into ws(s),
 * the token added as a query parameter.
 * @param {string | URL | undefined} url
 * @param {string | undefined} token
 * @param {{href: string} | undefined} [base] the page's location, if any
 * @returns {string}
 */
export function resolveUrl(url, token, base = globalThis.location) {
  let target;
  if (base && typeof base.href === "string") {
    target = new URL(url ?? DEFAULTS.path, base.href);
  } else if (url !== undefined) {
    target = new URL(url);
  } else {
    throw new TypeError("redwire: connect() needs a url outside a web page");
  }
  if (target.protocol === "http:") target.protocol = "ws:";
  else if (target.protocol === "https:") target.protocol = "wss:";
  else if (target.protocol !== "ws:" && target.protocol !== "wss:") {
    throw new TypeError(`redwire: unsupported URL scheme ${target.protocol}`);
  }
  if (token !== undefined && token !== null) target.searchParams.set("token", String(token));
  target.hash = "";
  return target.href;
}

/**
 * Open a client; it connects (and reconnects) by itself until `close()`.
 * @param {string | URL} [url] default: `/ws` on the page's host
 * @param {ConnectOptions} [options]
 * @returns {Client}
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/** One local subscription; several may share a topic. */
export class Subscription {
  /**
   * @param {Client} client
   * @param {string} topic
   * @param {MessageHandler} onMessage
   * @param {SubscribeOptions} options
   */
  constructor(client, topic, onMessage, options) {
    /** @readonly */
    this.topic = topic;
    /** @type {MessageHandler} */
    this._onMessage = onMessage;
    /** @type {((gap: GapInfo) => void) | null} */
    this._onGap = options.onGap ?? null;
    /** @type {((event: PresenceEvent) => void) | null} */
    this._onPresence = options.onPresence ?? null;
    this._client = client;
    this._active = true;
    /** @type {(() => void) | null} */
    this._resolve = null;
    /** @type {((err: RedwireError) => void) | null} */
    this._reject = null;
    /**
     * Resolves when the server acknowledged the subscription; rejects with the server's
     * error (or `closed`). Already marked as handled: failures also reach the "error" event.
     * @type {Promise<void>}
     */
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.ready.catch(ignore);
  }

  /** False once unsubscribed, refused by the server, or the client closed. */
  get active() {
    return this._active;
  }

  /**
   * Stop receiving this topic's messages here. Resolves when the server acknowledged (at
   * once when other local subscriptions keep the topic, or when not connected).
   * @returns {Promise<void>}
   */
  unsubscribe() {
    return this._client._unsubscribe(this);
  }

  _settle() {
    this._resolve?.();
    this._resolve = this._reject = null;
  }

  /** @param {RedwireError} err */
  _fail(err) {
    this._active = false;
    this._reject?.(err);
    this._resolve = this._reject = null;
  }
}

/** A connection to a Redwire broker that survives reconnects; made by `connect`. */
export class Client {
  /**
   * @param {string | URL | undefined} url
   * @param {ConnectOptions} options
   */
  constructor(url, options) {
    const rc = options.reconnect ?? {};
    const token = options.token;
    if (token !== undefined && typeof token !== "string" && typeof token !== "function") {
      throw new TypeError("redwire: token must be a string or a function returning one");
    }
    const transport = options.tokenTransport ?? DEFAULTS.tokenTransport;
    if (transport !== "query" && transport !== "protocol") {
      throw new TypeError('redwire: tokenTransport must be "query" or "protocol"');
    }
    /** @type {string | TokenProvider | undefined} */
    this._token = token;
    this._tokenTransport = transport;
    /** the resolved WebSocket URL (with a fixed token sent as the query parameter: with it) */
    this.url = resolveUrl(url, typeof token === "string" && transport === "query" ? token : undefined);
    this._baseUrl = resolveUrl(url, undefined);
    this._openSeq = 0; // the current connection attempt (a token fetch may outlive it)
    this._refreshing = false; // a refresh request is being answered
    this._protocols = options.protocols ?? [...DEFAULTS.protocols];
    this._minDelayMs = nonNegative("reconnect.minDelayMs", rc.minDelayMs, DEFAULTS.minDelayMs);
    this._maxDelayMs = nonNegative("reconnect.maxDelayMs", rc.maxDelayMs, DEFAULTS.maxDelayMs);
    this._healthyAfterMs = nonNegative(
      "reconnect.healthyAfterMs",
      rc.healthyAfterMs,
      DEFAULTS.healthyAfterMs,
    );
    this._connectTimeoutMs = nonNegative(
      "connectTimeoutMs",
      options.connectTimeoutMs,
      DEFAULTS.connectTimeoutMs,
    );
    this._maxQueued = nonNegative(
      "maxQueuedPublishes",
      options.maxQueuedPublishes,
      DEFAULTS.maxQueuedPublishes,
    );
    this._maxPublishRetries = nonNegative(
      "maxPublishRetries",
      options.maxPublishRetries,
      DEFAULTS.maxPublishRetries,
    );
    const impl = options.WebSocketImpl ?? globalThis.WebSocket;
    if (typeof impl !== "function") throw new TypeError("redwire: no WebSocket implementation");
    this._WebSocket = impl;

    /** @type {ClientState} */
    this._state = "connecting";
    /** @type {WebSocket | null} */
    this._ws = null;
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /** @type {Map<string, TopicState>} */
    this._topics = new Map();
    /** @type {Map<number, Pending>} */
    this._pending = new Map();
    /** @type {QueuedRequest[]} publishes (and presence requests) waiting for `open` */
    this._queue = [];
    /** @type {Map<ReturnType<typeof setTimeout>, QueuedRequest>} keyed publishes to retry */
    this._retries = new Map();
    this._nextId = 1;
    this._attempt = 0;
    this._welcomeAt = 0;
    this._everConnected = false;
    this._closed = false; // close() or a close code that forbids reconnecting: final
    this._suspended = false; // the page is hidden (pagehide) and may come back
    /** @type {Record<"reconnect" | "connect" | "heartbeat" | "dead", any>} */
    this._timers = { reconnect: null, connect: null, heartbeat: null, dead: null };

    /** @type {string | null} the worker this connection is on (from welcome) */
    this.worker = null;
    /** @type {string | null} this connection's id (from welcome) */
    this.clientId = null;
    /** @type {Heartbeat | null} */
    this.heartbeat = null;
    /** Counters for the curious (and the tests). */
    this.stats = {
      /** messages dropped because their offset was seen already (should stay 0) */
      duplicatesDropped: 0,
      /** new tokens sent in answer to the server's refresh requests */
      tokenRefreshes: 0,
    };

    this._onPageHide = () => this._suspend();
    /** @param {PageTransitionEvent} event */
    this._onPageShow = (event) => {
      if (event.persisted) this._resume();
    };
    this._inPage =
      typeof globalThis.addEventListener === "function" && "onpagehide" in globalThis;
    if (this._inPage) {
      globalThis.addEventListener("pagehide", this._onPageHide);
      globalThis.addEventListener("pageshow", this._onPageShow);
    }
    this._open();
  }

  /** @returns {ClientState} */
  get state() {
    return this._state;
  }

  /** Publishes waiting for a connection. */
  get queuedPublishes() {
    return this._queue.filter((item) => item.kind === "publish").length;
  }

  // --- events ------------------------------------------------------------------------------

  /**
   * @param {"state" | "welcome" | "connected" | "disconnected" | "error" | "gap" | "presence"}
   *   event
   * @param {Function} fn
   * @returns {() => void} removes the listener
   */
  on(event, fn) {
    if (!EVENTS.has(event)) throw new TypeError(`redwire: unknown event ${event}`);
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  /**
   * @param {string} event
   * @param {Function} fn
   */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  /**
   * @param {string} event
   * @param {unknown} arg
   */
  _emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) safeCall(fn, arg);
  }

  /** @param {ClientState} state */
  _setState(state) {
    if (state === this._state) return;
    this._state = state;
    this._emit("state", state);
  }

  // --- public API --------------------------------------------------------------------------

  /**
   * Receive the messages published to `topic` from now on (or after `options.since`).
   * @param {string} topic
   * @param {MessageHandler} onMessage called as onMessage(data, {topic, offset?, epoch?})
   * @param {SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(topic, onMessage, options = {}) {
    if (typeof onMessage !== "function") {
      throw new TypeError("redwire: subscribe(topic, onMessage) needs a function");
    }
    for (const name of /** @type {const} */ (["onGap", "onPresence"])) {
      if (options[name] !== undefined && typeof options[name] !== "function") {
        throw new TypeError(`redwire: subscribe option ${name} must be a function`);
      }
    }
    if (options.since !== undefined && !isPosition(options.since)) {
      throw new TypeError("redwire: subscribe option since must be {offset, epoch}");
    }
    const sub = new Subscription(this, topic, onMessage, options);
    if (this._closed) {
      sub._fail(closedError());
      return sub;
    }
    let state = this._topics.get(topic);
    if (!state) {
      state = {
        topic,
        subs: new Set(),
        waiting: new Set(),
        acked: false,
        retries: 0,
        retryTimer: null,
        position: options.since
          ? { offset: options.since.offset, epoch: options.since.epoch }
          : null,
      };
      this._topics.set(topic, state);
      if (this._state === "open") this._sendSubscribe(state);
    }
    state.subs.add(sub);
    if (state.acked) sub._settle();
    else state.waiting.add(sub);
    return sub;
  }

  /**
   * Publish `data` (any JSON value) to `topic`. Resolves when the server accepted it;
   * rejects with a RedwireError (`.code`, `.reason`): the server's error (`unavailable`:
   * not published, a retry is safe), `outcome_unknown` (sent, no answer: it may have been
   * published; retry only with the same key), `queue_full`, `closed` or `bad_request`.
   * With `options.key` the client itself resends it (same key) when the outcome is unknown.
   * @param {string} topic
   * @param {unknown} data
   * @param {PublishOptions} [options]
   * @returns {Promise<void>}
   */
  publish(topic, data, options = {}) {
    if (this._closed) return Promise.reject(closedError());
    const key = options.key;
    if (key !== undefined && (typeof key !== "string" || key.length < 1 || key.length > 64)) {
      return Promise.reject(new RedwireError("bad_request", "key must be 1..64 characters"));
    }
    let json;
    try {
      json = JSON.stringify(data);
    } catch (err) {
      return Promise.reject(new RedwireError("bad_request", `data is not JSON: ${errorText(err)}`));
    }
    if (json === undefined) {
      return Promise.reject(new RedwireError("bad_request", "data must be a JSON value"));
    }
    return new Promise((resolve, reject) => {
      const item = { kind: "publish", topic, json, key, sent: false, attempts: 0 };
      this._request(/** @type {QueuedRequest} */ ({ ...item, resolve, reject }));
    });
  }

  /**
   * Who is subscribed to `topic` (a topic with `presence`): resolves with the server's map
   * `{clientId: {identity, worker, ...}}`; rejects with a RedwireError (`not_enabled` for a
   * topic without presence, `connection_lost`, `queue_full`, `closed`).
   * @param {string} topic
   * @returns {Promise<Record<string, unknown>>}
   */
  presence(topic) {
    if (this._closed) return Promise.reject(closedError());
    return new Promise((resolve, reject) => {
      this._request({ kind: "presence", topic, resolve, reject });
    });
  }

  /**
   * The last position seen on `topic` ({offset, epoch}), to store and pass back as `since`;
   * null when the topic has no history, nothing was seen yet, or it is not subscribed.
   * @param {string} topic
   * @returns {Position | null}
   */
  position(topic) {
    const position = this._topics.get(topic)?.position;
    return position ? { offset: position.offset, epoch: position.epoch } : null;
  }

  /**
   * Send a request now, or queue it until `open` (bounded by `maxQueuedPublishes`).
   * @param {QueuedRequest} item
   */
  _request(item) {
    if (this._state === "open") {
      this._sendQueued(item);
    } else if (this._queue.length >= this._maxQueued) {
      item.reject(
        new RedwireError(
          "queue_full",
          `not connected and ${this._queue.length} requests already wait (maxQueuedPublishes)`,
        ),
      );
    } else {
      this._queue.push(item);
    }
  }

  /** Close for good: no reconnect; waiting publishes and subscriptions fail with `closed`. */
  close() {
    if (this._closed) return;
    this._closed = true;
    const hadSocket = this._ws !== null;
    this._dropSocket(1000, "client closed");
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    this._failEverything(closedError());
    this._setState("closed");
    if (hadSocket) {
      this._emit("disconnected", {
        code: 1000,
        reason: "client closed",
        willReconnect: false,
        delayMs: null,
      });
    }
  }

  // --- the socket --------------------------------------------------------------------------

  _open() {
    this._timers.reconnect = null;
    this._setState("connecting");
    const seq = ++this._openSeq;
    if (typeof this._token !== "function") {
      this._openSocket(this._token);
      return;
    }
    this._fetchToken().then(
      (token) => {
        if (seq === this._openSeq && !this._closed && !this._suspended) this._openSocket(token);
      },
      (err) => {
        if (seq !== this._openSeq || this._closed || this._suspended) return;
        this._emit("error", new RedwireError("token_unavailable", errorText(err)));
        this._afterSocket(CLOSE_ABNORMAL, `the token function failed: ${errorText(err)}`);
      },
    );
  }

  /**
   * A fresh token from the token function.
   * @returns {Promise<string>}
   */
  async _fetchToken() {
    const token = await /** @type {TokenProvider} */ (this._token)();
    if (typeof token !== "string" || token === "") {
      throw new TypeError("the token function must return a non-empty string");
    }
    return token;
  }

  /** @param {string | undefined} token */
  _openSocket(token) {
    let url = this.url;
    let protocols = this._protocols;
    if (token !== undefined && this._tokenTransport === "protocol") {
      url = this._baseUrl;
      protocols = [...protocols, `redwire.token.${token}`];
    } else if (token !== undefined) {
      url = resolveUrl(this._baseUrl, token);
    }
    let ws;
    try {
      ws = new this._WebSocket(url, protocols);
    } catch (err) {
      // e.g. a SecurityError: report it once listeners can see it, then back off.
      queueMicrotask(() =>
        this._emit("error", new RedwireError("connect_failed", errorText(err))),
      );
      this._afterSocket(CLOSE_ABNORMAL, errorText(err));
      return;
    }
    this._ws = ws;
    ws.onmessage = (event) => {
      if (ws === this._ws) this._onRaw(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._onSocketGone(event.code, event.reason);
    };
    ws.onerror = ignore; // a close event follows and says more
    if (this._connectTimeoutMs > 0) {
      this._timers.connect = setTimeout(
        () => this._abandon("no welcome within connectTimeoutMs"),
        this._connectTimeoutMs,
      );
    }
  }

  /**
   * Give up on a silent socket: close it without waiting for its closing handshake.
   * @param {string} why
   */
  _abandon(why) {
    if (this._ws === null) return;
    this._dropSocket(CLOSE_CLIENT_TIMEOUT, why);
    this._onSocketGone(CLOSE_ABNORMAL, why);
  }

  /**
   * Detach and close the current socket and stop its timers.
   * @param {number} code
   * @param {string} reason
   */
  _dropSocket(code, reason) {
    const ws = this._ws;
    this._ws = null;
    for (const name of /** @type {const} */ (["connect", "heartbeat", "dead"])) {
      clearTimeout(this._timers[name]);
      clearInterval(this._timers[name]);
      this._timers[name] = null;
    }
    for (const state of this._topics.values()) {
      clearTimeout(state.retryTimer);
      state.retryTimer = null;
    }
    if (ws === null) return;
    ws.onmessage = ws.onclose = null;
    ws.onerror = ignore; // some implementations (node's ws) throw on an unheard error
    try {
      ws.close(code, reason);
    } catch {
      // already closing
    }
  }

  /**
   * The socket is gone (closed by the server, the network, or abandoned by us).
   * @param {number} code
   * @param {string} reason
   */
  _onSocketGone(code, reason) {
    this._dropSocket(code, reason);
    this.worker = this.clientId = null;
    this.heartbeat = null;
    const unknown = new RedwireError(
      "outcome_unknown",
      "the connection closed before the server answered; the publish may or may not have happened",
    );
    const lost = new RedwireError("connection_lost", "the connection closed before the answer");
    const pending = [...this._pending.values()];
    this._pending.clear();
    /** @type {QueuedRequest[]} */
    const resend = [];
    for (const p of pending) {
      if (p.kind === "publish") {
        // With a key, sending it again is safe: it goes first once connected again.
        if (p.item.key !== undefined && p.item.attempts < this._maxPublishRetries) {
          p.item.attempts++;
          resend.push(p.item);
        } else p.item.reject(unknown);
      } else if (p.kind === "presence") p.reject(lost);
      else if (p.kind === "unsubscribe") p.resolve(); // the subscription went with the socket
    }
    this._queue.unshift(...resend);
    this._afterSocket(code, reason);
  }

  /**
   * Decide what follows a lost socket: reconnect (now or later), or stop for good.
   * @param {number} code
   * @param {string} reason
   */
  _afterSocket(code, reason) {
    if (this._welcomeAt && Date.now() - this._welcomeAt >= this._healthyAfterMs) {
      this._attempt = 0;
    }
    this._welcomeAt = 0;
    if (this._suspended) {
      this._setState("closed");
      this._emit("disconnected", { code, reason, willReconnect: false, delayMs: null });
      return;
    }
    let policy = reconnectPolicy(code);
    if (policy === "refresh" && typeof this._token !== "function") policy = "never";
    if (policy === "never") {
      this._closed = true;
      const err = new RedwireError("closed", reason || `closed by the server (${code})`, {
        closeCode: code,
      });
      this._failEverything(err);
      this._setState("closed");
      this._emit("error", err);
      this._emit("disconnected", { code, reason, willReconnect: false, delayMs: null });
      return;
    }
    // "refresh": at once with a new token (the attempt count backs it off if it recurs).
    const immediate = policy === "now" || (policy === "refresh" && this._attempt === 0);
    const delayMs = immediate
      ? 0
      : backoffDelay(this._attempt++, this._minDelayMs, this._maxDelayMs);
    if (policy === "refresh" && immediate) this._attempt++;
    this._setState("connecting");
    this._timers.reconnect = setTimeout(() => this._open(), delayMs);
    this._emit("disconnected", { code, reason, willReconnect: true, delayMs });
  }

  /** @param {RedwireError} err */
  _failEverything(err) {
    for (const [timer, item] of this._retries) {
      clearTimeout(timer);
      item.reject(new RedwireError("outcome_unknown", `sent, then ${err.reason}`, err));
    }
    this._retries.clear();
    for (const item of this._queue.splice(0)) {
      if (item.kind === "publish" && item.sent) {
        item.reject(new RedwireError("outcome_unknown", `sent, then ${err.reason}`, err));
      } else item.reject(err);
    }
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      // A publish on the wire and not answered: it may have been published.
      if (p.kind === "publish") {
        p.item.reject(new RedwireError("outcome_unknown", `sent, then ${err.reason}`, err));
      } else if (p.kind !== "subscribe") p.reject(err);
    }
    for (const state of this._topics.values()) {
      clearTimeout(state.retryTimer);
      for (const sub of state.subs) sub._fail(err);
      for (const sub of state.waiting) sub._fail(err);
    }
    this._topics.clear();
    if (this._inPage) {
      globalThis.removeEventListener("pagehide", this._onPageHide);
      globalThis.removeEventListener("pageshow", this._onPageShow);
      this._inPage = false;
    }
  }

  _suspend() {
    if (this._closed || this._suspended) return;
    this._suspended = true;
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    if (this._ws !== null) {
      this._dropSocket(1000, "page hidden");
      this._onSocketGone(1000, "page hidden");
    } else {
      this._setState("closed");
    }
  }

  _resume() {
    if (this._closed || !this._suspended) return;
    this._suspended = false;
    this._open();
  }

  // --- frames in ---------------------------------------------------------------------------

  /** @param {unknown} raw */
  _onRaw(raw) {
    clearTimeout(this._timers.dead); // any frame at all proves the connection alive
    this._timers.dead = null;
    if (typeof raw !== "string") {
      this._emit("error", new RedwireError("bad_frame", "binary frame on a JSON connection"));
      return;
    }
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (err) {
      this._emit("error", new RedwireError("bad_frame", `invalid JSON: ${errorText(err)}`));
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
      this._emit("error", new RedwireError("bad_frame", "a frame must be a JSON object"));
      return;
    }
    this._onFrame(frame);
  }

  /**
   * One server frame, by op (docs/protocol.md, "Server → client"). Unknown ops are ignored
   * so that a newer server can add some.
   * @param {Record<string, any>} frame
   */
  _onFrame(frame) {
    switch (frame.op) {
      case "message":
        this._onMessage(frame);
        break;
      case "ack":
        this._onAck(frame);
        break;
      case "error":
        this._onError(frame);
        break;
      case "welcome":
        this._onWelcome(/** @type {WelcomeFrame} */ (frame));
        break;
      case "gap":
        this._onGap(frame);
        break;
      case "join":
      case "leave":
        this._onPresence(frame);
        break;
      case "refresh":
        this._onRefreshRequest();
        break;
      case "pong":
        break; // its arrival already reset the heartbeat deadline
      default:
        break;
    }
  }

  /** @param {WelcomeFrame} frame */
  _onWelcome(frame) {
    clearTimeout(this._timers.connect);
    this._timers.connect = null;
    this.worker = String(frame.worker);
    this.clientId = String(frame.client);
    this.heartbeat = frame.heartbeat ?? null;
    this._welcomeAt = Date.now();
    const reconnected = this._everConnected;
    this._everConnected = true;
    this._startHeartbeat(frame.heartbeat);
    // Subscriptions first, then queued publishes, then anything listeners send: requests
    // are handled in order, so a client publishing to a topic it subscribes to receives
    // its own message.
    for (const state of this._topics.values()) this._sendSubscribe(state);
    for (const item of this._queue.splice(0)) this._sendQueued(item);
    this._setState("open");
    this._emit("welcome", frame);
    this._emit("connected", { worker: this.worker, clientId: this.clientId, reconnected });
  }

  /**
   * A published message: on a topic with history, one already seen is dropped, any other
   * moves the topic's position.
   * @param {Record<string, any>} frame
   */
  _onMessage(frame) {
    const state = this._topics.get(frame.topic);
    if (!state) return;
    const seen = framePosition(frame);
    if (seen) {
      const last = state.position;
      if (last && last.epoch === seen.epoch && seen.offset <= last.offset) {
        this.stats.duplicatesDropped++;
        return;
      }
      state.position = seen;
    }
    const meta = messageMeta(frame);
    for (const sub of [...state.subs]) safeCall(sub._onMessage, frame.data, meta);
  }

  /** @param {Record<string, any>} frame */
  _onAck(frame) {
    const p = this._takePending(frame.id);
    if (!p) return;
    if (p.kind === "subscribe") {
      const state = p.state;
      state.retries = 0;
      const current = this._topics.get(state.topic) === state;
      if (current) state.acked = true;
      for (const sub of state.waiting) sub._settle();
      state.waiting.clear();
      if (current) this._subscribed(state, p, frame);
    } else if (p.kind === "presence") {
      p.resolve(frame.clients ?? {});
    } else if (p.kind === "publish") {
      p.item.resolve();
    } else {
      p.resolve();
    }
  }

  /**
   * A subscribe ack: the position the subscription starts from (docs/protocol.md, "History,
   * recovery and presence"); it arrives before any message it covers. A resubscription, or
   * one with `since`, that did not recover exactly from where it asked is a break: a gap.
   * @param {TopicState} state
   * @param {{since: Position | null, resubscribe: boolean}} request what was asked
   * @param {Record<string, any>} ack
   */
  _subscribed(state, { since, resubscribe }, ack) {
    const now = framePosition(ack);
    state.position = now;
    if (since === null && !resubscribe) return; // a first subscription: nothing was missed
    const recovered =
      since !== null &&
      ack.recovered === true &&
      now !== null &&
      now.epoch === since.epoch &&
      now.offset === since.offset;
    if (!recovered) this._gap(state, { topic: state.topic, reason: "not_recovered" });
  }

  /** @param {Record<string, any>} frame */
  _onGap(frame) {
    const state = this._topics.get(frame.topic);
    if (!state) return;
    const from = Number.isSafeInteger(frame.from) ? frame.from : null;
    const to = Number.isSafeInteger(frame.to) ? frame.to : null;
    const last = state.position;
    const epoch = typeof frame.epoch === "string" ? frame.epoch : (last?.epoch ?? null);
    // What follows continues at to + 1 (never moved backwards within an epoch). Without
    // `to` the position stays: the epoch ended and the next messages carry the new one.
    if (to !== null && epoch !== null && !(last && last.epoch === epoch && to <= last.offset)) {
      state.position = { offset: to, epoch };
    }
    this._gap(state, { topic: state.topic, reason: "server", epoch, from, to });
  }

  /**
   * @param {TopicState} state
   * @param {GapInfo} gap
   */
  _gap(state, gap) {
    for (const sub of [...state.subs]) if (sub._onGap) safeCall(sub._onGap, { ...gap });
    this._emit("gap", gap);
  }

  /** The server asks for a new token (its current one nears `exp`): send one, if we can. */
  _onRefreshRequest() {
    if (typeof this._token !== "function" || this._refreshing) return;
    const ws = this._ws;
    this._refreshing = true;
    const fail = (/** @type {unknown} */ err) => {
      if (!this._closed) this._emit("error", new RedwireError("token_unavailable", errorText(err)));
    };
    this._fetchToken()
      .then((token) => {
        if (ws === null || ws !== this._ws || this._closed) return;
        const id = this._id();
        this._pending.set(id, {
          kind: "refresh",
          resolve: () => this.stats.tokenRefreshes++,
          reject: (err) => {
            if (err.code !== "closed") this._emit("error", err);
          },
        });
        this._send(JSON.stringify({ op: "refresh", token, id }));
      }, fail)
      .finally(() => {
        this._refreshing = false;
      });
  }

  /** @param {Record<string, any>} frame */
  _onPresence(frame) {
    const state = this._topics.get(frame.topic);
    if (!state) return;
    /** @type {PresenceEvent} */
    const event = {
      type: frame.op,
      topic: frame.topic,
      client: String(frame.client),
      info: frame.info ?? null,
    };
    for (const sub of [...state.subs]) {
      if (sub._onPresence) safeCall(sub._onPresence, { ...event });
    }
    this._emit("presence", event);
  }

  /** @param {Record<string, any>} frame */
  _onError(frame) {
    const err = new RedwireError(String(frame.code), String(frame.reason ?? ""));
    const p = frame.id === undefined || frame.id === null ? undefined : this._takePending(frame.id);
    if (!p) {
      this._emit("error", err);
    } else if (p.kind === "subscribe") {
      this._subscribeFailed(p.state, err);
    } else if (p.kind === "publish") {
      this._publishFailed(p.item, err);
    } else {
      p.reject(err);
    }
  }

  /**
   * A publish refused by the server. With a key, a bus error (`unavailable`: not published;
   * `outcome_unknown`: may have been) is retried with the same key after a backoff.
   * @param {QueuedRequest & {kind: "publish"}} item
   * @param {RedwireError} err
   */
  _publishFailed(item, err) {
    const retryable = err.code === "unavailable" || err.code === "outcome_unknown";
    if (item.key === undefined || !retryable || item.attempts >= this._maxPublishRetries) {
      item.reject(err);
      return;
    }
    const delay = backoffDelay(item.attempts++, this._minDelayMs, this._maxDelayMs);
    const timer = setTimeout(() => {
      this._retries.delete(timer);
      if (this._closed) item.reject(closedError());
      else if (this._state === "open") this._sendQueued(item);
      else this._queue.unshift(item); // never over the bound: it was accepted already
    }, delay);
    this._retries.set(timer, item);
  }

  /**
   * The server refused a (re)subscription. A resubscription that fails for a passing reason
   * (`unavailable`: the bus is down) is retried with backoff; anything else drops the topic.
   * @param {TopicState} state
   * @param {RedwireError} err
   */
  _subscribeFailed(state, err) {
    err.topic = state.topic;
    const current = this._topics.get(state.topic) === state;
    if (current && err.code === "unavailable" && state.waiting.size === 0) {
      const delay = backoffDelay(state.retries++, this._minDelayMs, this._maxDelayMs);
      state.retryTimer = setTimeout(() => {
        state.retryTimer = null;
        if (this._state === "open" && this._topics.get(state.topic) === state) {
          this._sendSubscribe(state);
        }
      }, delay);
      this._emit("error", err);
      return;
    }
    if (current) this._topics.delete(state.topic);
    for (const sub of state.subs) sub._fail(err);
    for (const sub of state.waiting) sub._fail(err);
    state.waiting.clear();
    this._emit("error", err);
  }

  /** @param {unknown} id */
  _takePending(id) {
    if (typeof id !== "number") return undefined;
    const p = this._pending.get(id);
    this._pending.delete(id);
    return p;
  }

  // --- frames out --------------------------------------------------------------------------

  /** @param {string} text */
  _send(text) {
    this._ws?.send(text);
  }

  _id() {
    return this._nextId++;
  }

  /** @param {TopicState} state */
  _sendSubscribe(state) {
    const id = this._id();
    const since = state.position && { ...state.position };
    // Acked on an earlier connection: this is a resubscription, after a break.
    this._pending.set(id, { kind: "subscribe", state, since, resubscribe: state.acked });
    this._send(JSON.stringify(subscribeRequest(state.topic, id, since)));
  }

  /** @param {QueuedRequest} item */
  _sendQueued(item) {
    const id = this._id();
    const topic = JSON.stringify(item.topic);
    if (item.kind === "presence") {
      this._pending.set(id, { kind: "presence", resolve: item.resolve, reject: item.reject });
      this._send(`{"op":"presence","id":${id},"topic":${topic}}`);
      return;
    }
    this._pending.set(id, { kind: "publish", item });
    item.sent = true;
    const key = item.key === undefined ? "" : `,"key":${JSON.stringify(item.key)}`;
    // `data` was serialised once, at publish() time.
    this._send(`{"op":"publish","id":${id},"topic":${topic}${key},"data":${item.json}}`);
  }

  /**
   * @param {Subscription} sub
   * @returns {Promise<void>}
   */
  _unsubscribe(sub) {
    if (!sub._active) return Promise.resolve();
    sub._active = false;
    const state = this._topics.get(sub.topic);
    if (!state || !state.subs.delete(sub) || state.subs.size > 0) return Promise.resolve();
    this._topics.delete(sub.topic);
    clearTimeout(state.retryTimer);
    if (this._state !== "open") return Promise.resolve();
    return new Promise((resolve, reject) => {
      const id = this._id();
      this._pending.set(id, { kind: "unsubscribe", resolve, reject });
      this._send(JSON.stringify({ op: "unsubscribe", topic: sub.topic, id }));
    });
  }

  /** @param {Heartbeat | undefined} heartbeat */
  _startHeartbeat(heartbeat) {
    const intervalMs = Number(heartbeat?.interval) * 1000;
    const timeoutMs = Number(heartbeat?.timeout) * 1000;
    if (!(intervalMs > 0 && timeoutMs > 0)) return;
    this._timers.heartbeat = setInterval(() => {
      this._send(JSON.stringify({ op: "ping", id: this._id() }));
      if (this._timers.dead === null) {
        this._timers.dead = setTimeout(
          () => this._abandon("no frame within heartbeat.timeout after a ping"),
          timeoutMs,
        );
      }
    }, intervalMs);
  }
}

/**
 * The subscribe request for a topic, resuming after `since` when a position is known.
 * @param {string} topic
 * @param {number} id
 * @param {Position | null} since
 */
function subscribeRequest(topic, id, since) {
  return since ? { op: "subscribe", topic, id, since } : { op: "subscribe", topic, id };
}

/**
 * What a message handler learns besides the data.
 * @param {Record<string, any>} frame
 * @returns {MessageMeta}
 */
function messageMeta(frame) {
  if (frame.offset === undefined) return { topic: frame.topic };
  return { topic: frame.topic, offset: frame.offset, epoch: frame.epoch };
}

/**
 * @param {unknown} value
 * @returns {value is Position}
 */
function isPosition(value) {
  if (value === null || typeof value !== "object") return false;
  const { offset, epoch } = /** @type {Record<string, unknown>} */ (value);
  return (
    Number.isSafeInteger(offset) && /** @type {number} */ (offset) >= 0 && typeof epoch === "string"
  );
}

/**
 * The `{offset, epoch}` a message frame or subscribe ack carries, if any.
 * @param {Record<string, any>} frame
 * @returns {Position | null}
 */
function framePosition(frame) {
  return isPosition(frame) ? { offset: frame.offset, epoch: frame.epoch } : null;
}

function ignore() {}

function closedError() {
  return new RedwireError("closed", "the client is closed");
}

/**
 * @param {string} name
 * @param {unknown} value
 * @param {number} fallback
 */
function nonNegative(name, value, fallback) {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== "number" || !(value >= 0)) {
    throw new TypeError(`redwire: ${name} must be a number >= 0, got ${value}`);
  }
  return value;
}

/** @param {unknown} err */
function errorText(err) {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Call a listener or handler; what it throws is reported, not propagated.
 * @param {Function} fn
 * @param {...unknown} args
 */
function safeCall(fn, ...args) {
  try {
    fn(...args);
  } catch (err) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(err);
    else console.error(err);
  }
}

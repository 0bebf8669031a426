/**
 * Type declarations for redwire.js, the Redwire browser client (docs/protocol.md).
 *
 * They declare exactly what redwire.js exports, no more: the module's header comment is the
 * reference for what each part does. Names starting with `_` in redwire.js are internal and
 * are not declared. `URL` and the WebSocket types come from the DOM library (a browser app's
 * `"lib": ["DOM", ...]`) or from `@types/node`.
 *
 *     import { connect, type GapInfo } from "redwire";
 *     const client = connect("wss://example.com/ws");
 *     client.subscribe("chat.lobby", (data, { offset }) => show(offset, data));
 */

// --- plain data ------------------------------------------------------------------------------

/** `"connecting"` ──welcome──▶ `"open"` ──socket lost──▶ `"connecting"`; `"closed"` is final
 * (or, after `pagehide`, until `pageshow` from the back/forward cache). */
export type ClientState = "connecting" | "open" | "closed";

/** What the client does after the socket closed with a code (`CLOSE_CODE_POLICY`);
 * "refresh": a new token from the token function, then reconnect (a fixed token: "never"). */
export type ReconnectPolicy = "never" | "now" | "backoff" | "refresh";

/** Returns a fresh connection token (e.g. from the application's login endpoint). */
export type TokenProvider = () => string | Promise<string>;

/** A place in a topic's history: store it and pass it back as `since`. */
export interface Position {
  offset: number;
  epoch: string;
}

/** What a message handler learns besides the data: `offset`/`epoch` on topics with history. */
export interface MessageMeta {
  topic: string;
  offset?: number;
  epoch?: string;
}

/** Called with each message's `data` (any JSON value) and its `MessageMeta`. */
export type MessageHandler = (data: unknown, meta: MessageMeta) => void;

/**
 * Messages of `topic` may be missing. `"not_recovered"`: a reconnect on a topic without
 * history, or a (re)subscription that could not replay from its position. `"server"`: a `gap`
 * frame; `epoch`/`from`/`to` say which offsets (null when the frame did not give them; no
 * `to`: the epoch ended). `epoch`/`from`/`to` are present only for `"server"`.
 */
export interface GapInfo {
  topic: string;
  reason: "not_recovered" | "server";
  epoch?: string | null;
  from?: number | null;
  to?: number | null;
}

/** A `join` or `leave` on a topic with `join_leave`. */
export interface PresenceEvent {
  type: "join" | "leave";
  topic: string;
  client: string;
  info: unknown;
}

/** The server's heartbeat, in seconds (from `welcome`). */
export interface Heartbeat {
  interval: number;
  timeout: number;
}

/** The server's first frame on each connection. */
export interface WelcomeFrame {
  op: "welcome";
  version: number;
  client: string;
  worker: string;
  heartbeat?: Heartbeat;
}

/** The `"connected"` event: after each `welcome`; `reconnected` on every one but the first. */
export interface ConnectInfo {
  worker: string;
  clientId: string;
  reconnected: boolean;
}

/** The `"disconnected"` event: a socket closed or failed to open (1006 when the client gave
 * up on a silent one); `delayMs` until the next attempt, null when none follows. */
export interface DisconnectInfo {
  code: number;
  reason: string;
  willReconnect: boolean;
  delayMs: number | null;
}

// --- options ---------------------------------------------------------------------------------

/** The part of a WebSocket the client uses: the browser's, Node's `ws`, or a test double. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onmessage: ((event: any) => unknown) | null;
  onclose: ((event: any) => unknown) | null;
  onerror: ((event: any) => unknown) | null;
}

/** A WebSocket class: `new WebSocketImpl(url, protocols)`. */
export type WebSocketConstructor = new (url: string, protocols: string[]) => WebSocketLike;

export interface ReconnectOptions {
  /** base of the exponential backoff, ms (default 500) */
  minDelayMs?: number | undefined;
  /** cap of the backoff, ms (default 30000) */
  maxDelayMs?: number | undefined;
  /** open this long (ms): the next failure starts from attempt 0 (default 5000) */
  healthyAfterMs?: number | undefined;
}

export interface ConnectOptions {
  /** a connection token, or a function returning a fresh one: asked before every connection
   * attempt and whenever the server asks for a refresh (the client answers by itself) */
  token?: string | TokenProvider | undefined;
  /** where the token travels: the `token` query parameter (default) or a
   * `redwire.token.<jwt>` subprotocol entry (kept out of URLs and their logs) */
  tokenTransport?: "query" | "protocol" | undefined;
  /** WebSocket subprotocols (default `["redwire.json"]`) */
  protocols?: string[] | undefined;
  reconnect?: ReconnectOptions | undefined;
  /** publishes (and presence requests) held while disconnected (default 1000) */
  maxQueuedPublishes?: number | undefined;
  /** resends of a publish with a `key` (default 5) */
  maxPublishRetries?: number | undefined;
  /** no welcome this long (ms) after opening: abandon and retry (default 10000; 0: never) */
  connectTimeoutMs?: number | undefined;
  /** a WebSocket class (default: the global `WebSocket`) */
  WebSocketImpl?: WebSocketConstructor | undefined;
}

export interface SubscribeOptions {
  /** messages may be missing: resync the topic */
  onGap?: ((gap: GapInfo) => void) | undefined;
  /** join/leave of the topic (topics with `join_leave`) */
  onPresence?: ((event: PresenceEvent) => void) | undefined;
  /** start after this position (e.g. one stored by a previous page); it only counts when it
   * creates the topic's wire subscription */
  since?: Position | undefined;
}

export interface PublishOptions {
  /** an idempotency key (1..64 characters): the publish lands once, and the client resends
   * it (same key) when its outcome is unknown */
  key?: string | undefined;
}

/** Each event's argument (`client.on(name, fn)`). */
export interface ClientEvents {
  state: ClientState;
  welcome: WelcomeFrame;
  connected: ConnectInfo;
  disconnected: DisconnectInfo;
  error: RedwireError;
  gap: GapInfo;
  presence: PresenceEvent;
}

export type ClientEventName = keyof ClientEvents;

// --- errors ----------------------------------------------------------------------------------

/** Codes of the server's error frames (docs/protocol.md, "Errors"). */
export type ServerErrorCode =
  | "bad_request"
  | "unknown_op"
  | "bad_topic"
  | "too_large"
  | "forbidden"
  | "unavailable"
  | "outcome_unknown"
  | "too_many_subscriptions"
  | "not_enabled"
  | "rate_limited"
  | "unauthorized"
  | "internal";

/** Codes the client itself raises. */
export type ClientErrorCode =
  | "outcome_unknown"
  | "queue_full"
  | "connection_lost"
  | "closed"
  | "bad_request"
  | "bad_frame"
  | "connect_failed"
  | "token_unavailable";

/** Any of the above; a newer server may send other codes. */
export type RedwireErrorCode = ServerErrorCode | ClientErrorCode | (string & {});

/**
 * An error from the server (`code`, `reason` of its error frame) or from the client.
 * `unavailable`: NOT published, a retry is safe; `outcome_unknown`: it may have been
 * published, retry only with the same `key`.
 */
export class RedwireError extends Error {
  constructor(code: string, reason: string, extra?: { topic?: string; closeCode?: number });
  name: "RedwireError";
  code: RedwireErrorCode;
  reason: string;
  /** the topic of a failed subscription */
  topic: string | undefined;
  /** the WebSocket close code that ended the client */
  closeCode: number | undefined;
}

// --- constants and helpers -------------------------------------------------------------------

/** Options that `connect` fills in when they are not given. */
export const DEFAULTS: Readonly<{
  path: string;
  protocols: readonly string[];
  minDelayMs: number;
  maxDelayMs: number;
  healthyAfterMs: number;
  connectTimeoutMs: number;
  maxQueuedPublishes: number;
  maxPublishRetries: number;
  tokenTransport: "query" | "protocol";
}>;

/** Close code → what the client does (docs/protocol.md, "Close codes"); codes not listed
 * (1006, 1005, 4xxx, ...) back off. */
export const CLOSE_CODE_POLICY: Readonly<Record<number, ReconnectPolicy>>;

/** Close codes after which reconnecting cannot help (the "never" ones). */
export const NO_RECONNECT_CLOSE_CODES: readonly number[];

/** The worker is shutting down or restarting: another one takes the connection at once. */
export const CLOSE_GOING_AWAY: 1001;

/** What the client reports when it abandons a socket that went silent. */
export const CLOSE_ABNORMAL: 1006;

/** The server closed: the connection token expired without a refresh (get a new token). */
export const CLOSE_TOKEN_EXPIRED: 4001;

/** Full jitter: random(0, min(maxDelayMs, minDelayMs * 2^attempt)) milliseconds. */
export function backoffDelay(
  attempt: number,
  minDelayMs: number,
  maxDelayMs: number,
  random?: () => number,
): number;

/** What to do after the socket closed with `code`. */
export function reconnectPolicy(code: number): ReconnectPolicy;

/** The WebSocket URL: `url` resolved against the page (`base`), http(s) → ws(s), the token
 * added as a query parameter. Outside a page, `url` is required. */
export function resolveUrl(
  url: string | URL | undefined,
  token: string | null | undefined,
  base?: { href: string },
): string;

/** Open a client; it connects (and reconnects) by itself until `close()`.
 * `url` defaults to `/ws` on the page's host. */
export function connect(url?: string | URL, options?: ConnectOptions): Client;

// --- the client ------------------------------------------------------------------------------

/** One local subscription (made by `Client.subscribe`); several may share a topic. */
export class Subscription {
  /** @internal made by `Client.subscribe` */
  constructor(
    client: Client,
    topic: string,
    onMessage: MessageHandler,
    options: SubscribeOptions,
  );
  readonly topic: string;
  /** Resolves when the server acknowledged; rejects with the server's error (or `closed`).
   * Already marked as handled: failures also reach the "error" event. */
  readonly ready: Promise<void>;
  /** False once unsubscribed, refused by the server, or the client closed. */
  readonly active: boolean;
  /** Resolves when the server acknowledged (at once when other local subscriptions keep the
   * topic, or when not connected). */
  unsubscribe(): Promise<void>;
}

/** A connection to a Redwire broker that survives reconnects; made by `connect`. */
export class Client {
  constructor(url: string | URL | undefined, options: ConnectOptions);
  /** the resolved WebSocket URL (with a fixed token sent as the query parameter: with it) */
  readonly url: string;
  /** the worker this connection is on (from welcome), null while not connected */
  worker: string | null;
  /** this connection's id (from welcome), null while not connected */
  clientId: string | null;
  heartbeat: Heartbeat | null;
  /** counters for the curious */
  readonly stats: {
    /** messages dropped because their offset was seen already (should stay 0) */
    duplicatesDropped: number;
    /** new tokens sent in answer to the server's refresh requests */
    tokenRefreshes: number;
  };
  readonly state: ClientState;
  /** publishes waiting for a connection */
  readonly queuedPublishes: number;

  /** Add a listener; returns a function that removes it. */
  on<E extends ClientEventName>(event: E, fn: (arg: ClientEvents[E]) => void): () => void;
  off<E extends ClientEventName>(event: E, fn: (arg: ClientEvents[E]) => void): void;

  /** Receive the messages published to `topic` from now on (or after `options.since`). */
  subscribe(topic: string, onMessage: MessageHandler, options?: SubscribeOptions): Subscription;
  /** Resolves when the server accepted it; rejects with a `RedwireError`. */
  publish(topic: string, data: unknown, options?: PublishOptions): Promise<void>;
  /** Who is subscribed: `{clientId: {identity, worker, ...}}` (topics with presence). */
  presence(topic: string): Promise<Record<string, unknown>>;
  /** The last position seen on `topic`, or null (no history, nothing seen, not subscribed). */
  position(topic: string): Position | null;
  /** Close for good: no reconnect; waiting publishes and subscriptions fail with `closed`. */
  close(): void;
}

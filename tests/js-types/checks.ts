/**
 * What redwire.d.ts must accept and refuse (tests/unit/test_js_package.py runs tsc on it).
 * Each `@ts-expect-error` fails the check if the line it covers compiles: the declarations
 * are not allowed to be looser than redwire.js.
 */

import * as rw from "redwire";

const client: rw.Client = rw.connect();
rw.connect(new URL("ws://127.0.0.1:8765/ws"), { token: "t", connectTimeoutMs: 0 });
// A token function, sync or async; the token as a subprotocol entry.
rw.connect("ws://127.0.0.1:1/ws", { token: async () => "t", tokenTransport: "protocol" });
rw.connect("ws://127.0.0.1:1/ws", { token: () => "t" });
// @ts-expect-error: a token function returns a string
rw.connect("ws://127.0.0.1:1/ws", { token: async () => 1 });
// @ts-expect-error: the token travels in the query or a subprotocol entry only
rw.connect("ws://127.0.0.1:1/ws", { token: "t", tokenTransport: "header" });
const expired: 4001 = rw.CLOSE_TOKEN_EXPIRED;
const refresh: rw.ReconnectPolicy = rw.reconnectPolicy(expired);
void [refresh, client.stats.tokenRefreshes];
// The browser's WebSocket class fits the `WebSocketImpl` option; so does a small fake.
rw.connect("ws://127.0.0.1:1/ws", { WebSocketImpl: WebSocket });
class FakeSocket implements rw.WebSocketLike {
  onmessage: ((event: { data: string }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  constructor(readonly url: string, readonly protocols: string[]) {}
  send(_data: string): void {}
  close(_code?: number, _reason?: string): void {}
}
rw.connect("ws://127.0.0.1:1/ws", { WebSocketImpl: FakeSocket });

// Events carry typed arguments.
client.on("gap", (gap) => {
  const reason: "not_recovered" | "server" = gap.reason;
  const epoch: string | null | undefined = gap.epoch;
  const range: [number | null | undefined, number | null | undefined] = [gap.from, gap.to];
  void [reason, epoch, range];
});
client.on("disconnected", ({ code, reason, willReconnect, delayMs }) => {
  const next: number | null = delayMs;
  void [code.toFixed(), reason.trim(), willReconnect === true, next];
});
const off: () => void = client.on("welcome", (frame) => frame.heartbeat?.interval);
off();
// @ts-expect-error: not an event of the client
client.on("message", () => {});
// @ts-expect-error: a gap has no `offset`
client.on("gap", (gap) => gap.offset);

// Error codes: the wire ones, the client's own, and any future one.
const codes: rw.RedwireErrorCode[] = ["outcome_unknown", "unavailable", "queue_full", "new"];
const err = new rw.RedwireError("closed", "bye", { closeCode: 1000 });
const closeCode: number | undefined = err.closeCode;
void [codes, closeCode, err.topic, err instanceof Error];

// Constants and helpers.
const policy: rw.ReconnectPolicy = rw.reconnectPolicy(rw.CLOSE_GOING_AWAY);
const table: rw.ReconnectPolicy | undefined = rw.CLOSE_CODE_POLICY[1013];
const never: readonly number[] = rw.NO_RECONNECT_CLOSE_CODES;
const abnormal: 1006 = rw.CLOSE_ABNORMAL;
const delay: number = rw.backoffDelay(3, rw.DEFAULTS.minDelayMs, rw.DEFAULTS.maxDelayMs, () => 0.5);
const url: string = rw.resolveUrl("/ws", undefined, { href: "https://example.com/app" });
const protocols: readonly string[] = rw.DEFAULTS.protocols;
void [policy, table, never, abnormal, delay, url, protocols];
// @ts-expect-error: DEFAULTS is frozen
rw.DEFAULTS.minDelayMs = 1;
// @ts-expect-error: policies are "never" | "now" | "backoff"
const wrong: "retry" = rw.reconnectPolicy(1000);
void wrong;

// Subscriptions and publishing.
const sub = client.subscribe("t", (data, meta) => void [data, meta.topic, meta.offset, meta.epoch], {
  since: { offset: 3, epoch: "e" },
});
const ready: Promise<void> = sub.ready;
const active: boolean = sub.active;
void [ready, active, sub.topic, client.state, client.queuedPublishes, client.url];
// @ts-expect-error: `since` needs an epoch
client.subscribe("t", () => {}, { since: { offset: 3 } });
// @ts-expect-error: the handler is required
client.subscribe("t");
// @ts-expect-error: a key is a string
void client.publish("t", 1, { key: 1 });
// @ts-expect-error: state is read-only
client.state = "open";
const done: Promise<void> = client.publish("t", { any: ["json"] }, { key: "k" });
const here: Promise<Record<string, unknown>> = client.presence("t");
const position: rw.Position | null = client.position("t");
void [done, here, position];

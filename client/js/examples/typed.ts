/**
 * A small typed use of the Redwire browser client: a chat feed that keeps its place.
 *
 * Checked in CI with `tsc --noEmit --strict` (tests/unit/test_js_package.py), once against
 * the source tree and once as a scratch project that installed the packed package.
 */

import {
  CLOSE_CODE_POLICY,
  connect,
  DEFAULTS,
  type GapInfo,
  type MessageMeta,
  type Position,
  reconnectPolicy,
  RedwireError,
  type Subscription,
} from "redwire";

interface ChatMessage {
  from: string;
  text: string;
}

/** Message data is any JSON value: narrow it before use. */
function isChatMessage(data: unknown): data is ChatMessage {
  if (typeof data !== "object" || data === null) return false;
  const { from, text } = data as Record<string, unknown>;
  return typeof from === "string" && typeof text === "string";
}

const TOPIC = "chat.lobby";
const stored = localStorage.getItem(TOPIC);
const since: Position | undefined = stored ? (JSON.parse(stored) as Position) : undefined;

const client = connect("/ws", {
  reconnect: { minDelayMs: DEFAULTS.minDelayMs, maxDelayMs: 10_000 },
  maxQueuedPublishes: 100,
});

client.on("state", (state) => {
  document.body.dataset.state = state; // "connecting" | "open" | "closed"
});
client.on("connected", ({ worker, clientId, reconnected }) => {
  console.log(`${reconnected ? "re" : ""}connected to worker ${worker} as ${clientId}`);
});
client.on("disconnected", ({ code, willReconnect, delayMs }) => {
  const policy = reconnectPolicy(code); // "never" | "now" | "backoff"
  console.log(`closed ${code} (${policy}, table says ${CLOSE_CODE_POLICY[code] ?? "backoff"})`,
    willReconnect ? `retry in ${delayMs ?? 0} ms` : "for good");
});
client.on("error", (err: RedwireError) => {
  console.warn(err.topic ? `${err.topic}: ${err.code}` : err.code, err.reason);
});

function onGap(gap: GapInfo): void {
  if (gap.reason === "server" && gap.from !== null && gap.from !== undefined) {
    console.warn(`${gap.topic}: offsets ${gap.from}..${gap.to ?? "end of epoch"} are gone`);
  } else {
    console.warn(`${gap.topic}: messages may be missing (${gap.reason}): reload`);
  }
}

const feed: Subscription = client.subscribe(
  TOPIC,
  (data: unknown, meta: MessageMeta) => {
    if (!isChatMessage(data)) return;
    console.log(meta.offset ?? "-", `${data.from}: ${data.text}`);
    const here = client.position(meta.topic);
    if (here) localStorage.setItem(meta.topic, JSON.stringify(here));
  },
  { since, onGap, onPresence: ({ type, client: who }) => console.log(who, type) },
);

async function say(text: string): Promise<void> {
  const message: ChatMessage = { from: client.clientId ?? "me", text };
  try {
    // With a key, the client itself resends after `outcome_unknown`: it lands once.
    await client.publish(TOPIC, message, { key: crypto.randomUUID() });
  } catch (err) {
    if (!(err instanceof RedwireError)) throw err;
    if (err.code === "unavailable") console.warn("not published; safe to try again");
    else if (err.code === "outcome_unknown") console.warn("may have been published");
    else console.error(err.code, err.reason);
  }
}

async function main(): Promise<void> {
  await feed.ready;
  await say("hello");
  const who: Record<string, unknown> = await client.presence(TOPIC).catch(() => ({}));
  console.log(Object.keys(who).length, "here;", client.stats.duplicatesDropped, "dropped");
  if (feed.active) await feed.unsubscribe();
  client.close();
}

void main();

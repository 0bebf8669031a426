/**
 * The live dashboard at `/dashboard`: every worker's `$sys.stats` snapshot (worker/dashboard.py
 * documents its fields), received over the broker's own WebSocket with /redwire.js.
 *
 * The page holds no key: `/dashboard?key=...` set an HttpOnly cookie that the WebSocket
 * upgrade carries, and that is what lets this connection subscribe to `$sys.stats`.
 *
 * Each worker of each replica on the Redis sends one snapshot a second. `workers` keeps the
 * latest per (instance, worker); once a second `tick` adds up the fresh ones (seen within
 * STALE_MS) into one sample of each series (5 minutes at 1 s), writes the numbers and draws
 * the charts on <canvas> by hand (no library). A worker silent for STALE_MS is shown grey
 * and left out of the sums; after FORGET_MS it is dropped. `globalThis.redwireDashboard`
 * exposes the client and the state for the browser console.
 */

import { connect } from "/redwire.js";

const TOPIC = "$sys.stats";
const SECONDS = 300; // chart span: 5 minutes, one point a second
const STALE_MS = 3_000;
const FORGET_MS = 60_000;
const TOP_TOPICS = 20;

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

/**
 * @typedef {{v: number, instance: string, worker: string, pid: number, t: number,
 *   interval_s: number | null, connections: number, subscriptions: number, topics: number,
 *   top_topics: [string, number][], totals: Record<string, number>,
 *   rates: Record<string, number>,
 *   redis: {healthy: boolean, rtt_ms: number | null, probe_rtt_ms: number | null,
 *     reconnects: number, gaps: number}}} Snapshot
 */

/** @type {Map<string, {snap: Snapshot, seenAt: number}>} */
const workers = new Map();

/** One ring of SECONDS values per series; null: no value that second. */
const series = {
  publishes: /** @type {(number | null)[]} */ ([]),
  deliveries: /** @type {(number | null)[]} */ ([]),
  connections: /** @type {(number | null)[]} */ ([]),
  redisMs: /** @type {(number | null)[]} */ ([]),
  gaps: /** @type {(number | null)[]} */ ([]),
  slow: /** @type {(number | null)[]} */ ([]),
};

const client = connect();
globalThis.redwireDashboard = { client, workers, series };

// --- connection ------------------------------------------------------------------------------

/**
 * @param {string} text
 * @param {boolean} [isError]
 */
function note(text, isError = false) {
  const line = $("note");
  line.textContent = text;
  line.classList.toggle("error", isError);
}

/** @param {string} state */
function showState(state) {
  $("state").textContent = state;
  $("state").dataset.state = state;
}
showState(client.state);
client.on("state", showState);
client.on("connected", ({ worker }) => {
  $("via-worker").textContent = worker;
  if (!$("note").classList.contains("error")) note("");
});
client.on("disconnected", ({ code, willReconnect }) => {
  $("via-worker").textContent = "–";
  note(willReconnect ? `connection lost (${code}); reconnecting…` : `closed (${code})`, true);
});
client.on("error", (err) => {
  if (err.code === "forbidden") {
    note("Not allowed to read $sys.stats: open /dashboard?key=<API key> again.", true);
  }
});

const sub = client.subscribe(TOPIC, onSnapshot);
sub.ready.then(() => note(""), (err) => note(`not subscribed: ${err.code} ${err.message}`, true));

/** @param {unknown} data */
function onSnapshot(data) {
  const snap = /** @type {Snapshot} */ (data);
  if (!snap || snap.v !== 1 || typeof snap.worker !== "string") return;
  const first = workers.size === 0;
  workers.set(`${snap.instance}/${snap.worker}`, { snap, seenAt: Date.now() });
  if (first) tick(); // show something at once, not up to a second later
}

// --- one sample a second ---------------------------------------------------------------------

/** @param {(number | null)[]} ring @param {number | null} value */
function push(ring, value) {
  ring.push(value);
  if (ring.length > SECONDS) ring.splice(0, ring.length - SECONDS);
}

/** @param {Snapshot[]} snaps @param {(s: Snapshot) => number} pick */
function sum(snaps, pick) {
  return snaps.reduce((total, s) => total + (Number(pick(s)) || 0), 0);
}

function tick() {
  const now = Date.now();
  const fresh = [];
  for (const [key, entry] of workers) {
    if (now - entry.seenAt > FORGET_MS) workers.delete(key);
    else if (now - entry.seenAt <= STALE_MS) fresh.push(entry.snap);
  }
  const rtts = fresh.map((s) => s.redis.rtt_ms).filter((ms) => typeof ms === "number");
  const sample = {
    publishes: sum(fresh, (s) => s.rates.publishes),
    deliveries: sum(fresh, (s) => s.rates.deliveries),
    connections: sum(fresh, (s) => s.connections),
    redisMs: rtts.length ? Math.max(...rtts) : null,
    gaps: sum(fresh, (s) => s.rates.bus_gaps + s.rates.gaps_announced),
    slow: sum(fresh, (s) => s.rates.slow_consumer_closes),
  };
  const live = fresh.length > 0;
  for (const [name, ring] of Object.entries(series)) {
    push(ring, live ? sample[/** @type {keyof typeof sample} */ (name)] : null);
  }
  showNumbers(fresh, sample);
  showWorkers(now);
  showTopics(fresh);
  drawAll();
}
setInterval(tick, 1000);

// --- numbers and tables ----------------------------------------------------------------------

/** @param {number} value */
function fmt(value) {
  if (!Number.isFinite(value)) return "–";
  if (Math.abs(value) < 10 && !Number.isInteger(value)) return value.toFixed(1);
  return Math.round(value).toLocaleString("en");
}

/** @param {string} id @param {string} text */
function put(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

/** @param {Snapshot[]} fresh @param {Record<string, number | null>} sample */
function showNumbers(fresh, sample) {
  const replicas = new Set(fresh.map((s) => s.instance));
  put("worker-count", String(fresh.length));
  put("replica-count", `${replicas.size} ${replicas.size === 1 ? "replica" : "replicas"}`);
  put("connections", fmt(sample.connections ?? 0));
  put("subscriptions", fmt(sum(fresh, (s) => s.subscriptions)));
  put("publish-rate", fmt(sample.publishes ?? 0));
  put("delivery-rate", fmt(sample.deliveries ?? 0));
  put("publishes", fmt(sum(fresh, (s) => s.totals.publishes)));
  put("deliveries", fmt(sum(fresh, (s) => s.totals.deliveries)));
  put("gaps", fmt(sum(fresh, (s) => s.totals.bus_gaps)));
  put("gap-frames", fmt(sum(fresh, (s) => s.totals.gaps_announced)));
  put("slow-closes", fmt(sum(fresh, (s) => s.totals.slow_consumer_closes)));
  const status = $("redis-status");
  if (fresh.length === 0) {
    put("redis-status", "no data");
    status.dataset.healthy = "unknown";
  } else {
    const down = fresh.filter((s) => !s.redis.healthy).length;
    put("redis-status", down === 0 ? "healthy" : `down on ${down} of ${fresh.length}`);
    status.dataset.healthy = String(down === 0);
  }
  put("redis-rtt", sample.redisMs === null ? "–" : sample.redisMs.toFixed(2));
  put("updated", fresh.length ? new Date().toLocaleTimeString("en-GB") : "never");
}

/**
 * A table row of plain text cells (textContent only: topic names are data, never markup).
 * @param {(string | number)[]} cells
 * @param {Record<string, string>} [classes] cell index -> class
 */
function row(cells, classes = {}) {
  const tr = document.createElement("tr");
  cells.forEach((cell, i) => {
    const td = document.createElement("td");
    td.textContent = String(cell);
    if (classes[i]) td.className = classes[i];
    tr.append(td);
  });
  return tr;
}

/** @param {number} now */
function showWorkers(now) {
  const entries = [...workers.values()].sort(
    (a, b) =>
      a.snap.instance.localeCompare(b.snap.instance) ||
      a.snap.worker.localeCompare(b.snap.worker, "en", { numeric: true }),
  );
  const rows = entries.map(({ snap: s, seenAt }) => {
    const healthy = s.redis.healthy;
    const tr = row(
      [
        s.instance || "–",
        s.worker,
        s.pid,
        fmt(s.connections),
        fmt(s.subscriptions),
        fmt(s.topics),
        fmt(s.rates.publishes),
        fmt(s.rates.deliveries),
        fmt(s.totals.bus_gaps + s.totals.gaps_announced),
        fmt(s.totals.slow_consumer_closes),
        healthy ? "ok" : "down",
        s.redis.rtt_ms === null ? "–" : s.redis.rtt_ms.toFixed(2),
        `${Math.round((now - seenAt) / 1000)} s ago`,
      ],
      { 10: healthy ? "up" : "down" },
    );
    tr.dataset.worker = s.worker;
    tr.dataset.instance = s.instance;
    tr.dataset.connections = String(s.connections);
    tr.dataset.stale = String(now - seenAt > STALE_MS);
    return tr;
  });
  $("workers").replaceChildren(...rows);
}

/** @param {Snapshot[]} fresh */
function showTopics(fresh) {
  /** @type {Map<string, {subscribers: number, workers: number}>} */
  const topics = new Map();
  let partial = false;
  for (const s of fresh) {
    partial ||= s.topics > s.top_topics.length;
    for (const [name, count] of s.top_topics) {
      const t = topics.get(name) ?? { subscribers: 0, workers: 0 };
      t.subscribers += count;
      t.workers += 1;
      topics.set(name, t);
    }
  }
  const ranked = [...topics.entries()]
    .sort((a, b) => b[1].subscribers - a[1].subscribers || a[0].localeCompare(b[0]))
    .slice(0, TOP_TOPICS);
  $("topics").replaceChildren(
    ...ranked.map(([name, t]) => {
      const tr = row([name, fmt(t.subscribers), t.workers]);
      tr.dataset.topic = name;
      tr.dataset.subscribers = String(t.subscribers);
      return tr;
    }),
  );
  put("topic-count", `${topics.size}${partial ? "+" : ""}`);
}

// --- charts ----------------------------------------------------------------------------------

const css = getComputedStyle(document.documentElement);
/** @param {string} name */
const color = (name) => css.getPropertyValue(name).trim();

function drawAll() {
  chart("chart-rates", [
    { ring: series.publishes, color: color("--pub") },
    { ring: series.deliveries, color: color("--del") },
  ]);
  chart("chart-connections", [{ ring: series.connections, color: color("--conn") }]);
  chart("chart-redis", [{ ring: series.redisMs, color: color("--redis") }]);
  chart("chart-trouble", [
    { ring: series.gaps, color: color("--gap") },
    { ring: series.slow, color: color("--slow") },
  ]);
}

/** A round number at or above `value`, for the y axis. @param {number} value */
function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

/**
 * Lines over the last SECONDS seconds, newest at the right; a null leaves a hole.
 * `canvas.dataset.colors` lists the series colours (for tests and the curious).
 * @param {string} id
 * @param {{ring: (number | null)[], color: string}[]} lines
 */
function chart(id, lines) {
  const canvas = /** @type {HTMLCanvasElement} */ ($(id));
  const ratio = globalThis.devicePixelRatio || 1;
  const w = Math.round((canvas.clientWidth || 300) * ratio);
  const h = Math.round((canvas.clientHeight || 140) * ratio);
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  canvas.dataset.colors = lines.map((l) => l.color).join(",");
  const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d"));
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const width = w / ratio;
  const height = h / ratio;
  const left = 44;
  const bottom = height - 16;
  const top = 6;
  ctx.fillStyle = color("--chart-bg");
  ctx.fillRect(0, 0, width, height);

  let max = 0;
  for (const { ring } of lines) for (const v of ring) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const step = max / 4; // one grid line each, labelled with as many decimals as it needs
  let decimals = 0;
  const fraction = (/** @type {number} */ d) =>
    Math.abs(step * 10 ** d - Math.round(step * 10 ** d));
  while (decimals < 3 && fraction(decimals) > 1e-6) decimals++;
  const x = (/** @type {number} */ i, /** @type {number} */ n) =>
    width - 4 - ((n - 1 - i) * (width - 4 - left)) / (SECONDS - 1);
  const y = (/** @type {number} */ v) => bottom - (v / max) * (bottom - top);

  // Grid: 4 horizontal lines with values, a vertical line each minute.
  ctx.strokeStyle = color("--grid");
  ctx.lineWidth = 1;
  ctx.fillStyle = color("--text");
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    const gy = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(left, gy);
    ctx.lineTo(width - 4, gy);
    ctx.stroke();
    ctx.fillText(v.toFixed(decimals), left - 4, gy);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let minute = 0; minute <= SECONDS / 60; minute++) {
    const gx = Math.round(x(Math.max(0, SECONDS - 1 - minute * 60), SECONDS)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(gx, top);
    ctx.lineTo(gx, bottom);
    ctx.stroke();
    const last = minute === SECONDS / 60;
    ctx.textAlign = minute === 0 ? "right" : last ? "left" : "center";
    ctx.fillText(minute === 0 ? "now" : `-${minute} min`, last ? left : gx, bottom + 3);
  }

  // The series: a 2 px line each, in its colour.
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  for (const { ring, color: stroke } of lines) {
    ctx.strokeStyle = stroke;
    ctx.beginPath();
    let drawing = false;
    ring.forEach((v, i) => {
      if (v === null) {
        drawing = false;
        return;
      }
      const px = x(i, ring.length);
      const py = y(v);
      if (drawing) ctx.lineTo(px, py);
      else ctx.moveTo(px, py);
      drawing = true;
    });
    ctx.stroke();
    const lastValue = ring.at(-1);
    if (lastValue !== null && lastValue !== undefined) {
      ctx.fillStyle = stroke;
      ctx.beginPath();
      ctx.arc(x(ring.length - 1, ring.length), y(lastValue), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
}

drawAll();
globalThis.addEventListener("resize", drawAll);

/**
 * The demo page at `/`: subscribe, publish, watch messages and traffic.
 *
 * Message data is shown with `textContent` only: a message is data, never markup. The page's
 * Content-Security-Policy allows no inline script or style, hence this file and demo.css.
 * `globalThis.redwireDemo` is the page's client, for the browser console.
 *
 * The message list also shows what the client reports about the connection: a marker row
 * for each lost connection and each reconnect ("disconnected" / "connected" events) and for
 * each gap (the "gap" event: messages of that topic may be missing). On topics with history
 * each message shows its offset. A message this page published is marked "you": messages
 * carry no publisher, so the page remembers what it published (topic and JSON) until that
 * message comes back; an identical message from someone else at the same moment could take
 * the mark instead.
 */

import { connect } from "/redwire.js";

const MAX_MESSAGES = 200;
const CHART_SECONDS = 60;
const RATE_WINDOW_S = 10; // the legend's rate: messages per second over this many seconds
const MAX_OWN_PENDING = 100; // own publishes remembered until they come back

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const el = {
  state: $("state"),
  worker: $("worker"),
  clientId: $("client-id"),
  connectionNote: $("connection-note"),
  subscribeForm: /** @type {HTMLFormElement} */ ($("subscribe-form")),
  topic: /** @type {HTMLInputElement} */ ($("topic")),
  subscribeStatus: $("subscribe-status"),
  subscriptions: $("subscriptions"),
  publishForm: /** @type {HTMLFormElement} */ ($("publish-form")),
  publishTopic: /** @type {HTMLInputElement} */ ($("publish-topic")),
  message: /** @type {HTMLInputElement} */ ($("message")),
  asJson: /** @type {HTMLInputElement} */ ($("as-json")),
  publishStatus: $("publish-status"),
  chart: /** @type {HTMLCanvasElement} */ ($("rate-chart")),
  rateLegend: $("rate-legend"),
  rateIn: $("rate-in"),
  rateOut: $("rate-out"),
  messages: $("messages"),
};

const client = connect();
globalThis.redwireDemo = client;

/**
 * A status line: text only, marked as an error or not.
 * @param {HTMLElement} line
 * @param {string} text
 * @param {boolean} [isError]
 */
function note(line, text, isError = false) {
  line.textContent = text;
  line.classList.toggle("error", isError);
}

// --- connection ----------------------------------------------------------------------------

/** @param {string} state */
function showState(state) {
  el.state.textContent = state;
  el.state.dataset.state = state;
}
showState(client.state);
client.on("state", showState);
let wasOpen = false; // one marker per lost connection, not one per failed attempt after it
client.on("connected", ({ worker, clientId, reconnected }) => {
  wasOpen = true;
  el.worker.textContent = worker;
  el.clientId.textContent = clientId;
  note(el.connectionNote, "");
  if (reconnected) addMarker("reconnect", `reconnected: worker ${worker}, client ${clientId}`);
});
client.on("disconnected", ({ code, reason, willReconnect, delayMs }) => {
  el.worker.textContent = "–";
  el.clientId.textContent = "–";
  el.state.title = `last close: ${code}${reason ? ` ${reason}` : ""}`;
  const lost = wasOpen;
  wasOpen = false;
  if (willReconnect) {
    note(el.connectionNote, `connection lost (${code}); next attempt in ${delayMs ?? 0} ms`);
    if (lost) addMarker("disconnect", `connection lost (${code}); reconnecting`);
  } else {
    note(el.connectionNote, `disconnected (${code}), not reconnecting`, true);
    addMarker("disconnect", `disconnected (${code}), not reconnecting`);
  }
});
client.on("error", (err) => {
  if (err.topic === undefined) {
    note(el.connectionNote, `${err.code}: ${err.reason}`, true);
    return;
  }
  // A subscription the server refused (or a resubscription that failed).
  note(el.subscribeStatus, `${err.topic}: ${err.code}: ${err.reason}`, true);
  const sub = subscriptions.get(err.topic);
  if (sub && !sub.active) dropChip(err.topic);
});
client.on("gap", ({ topic, reason, from, to }) => {
  const range =
    from === null || from === undefined ? "" : `, offsets ${from} to ${to ?? "the end of the epoch"}`;
  const why = reason === "server" ? "history no longer has them" : "not recovered after a break";
  addMarker("gap", `gap on ${topic}: messages may be missing (${why}${range})`, topic);
});

// --- subscriptions -------------------------------------------------------------------------

/** @type {Map<string, {active: boolean, unsubscribe(): Promise<void>}>} */
const subscriptions = new Map();

/** @param {string} topic */
function chipOf(topic) {
  for (const item of el.subscriptions.children) {
    if (/** @type {HTMLElement} */ (item).dataset.topic === topic) return item;
  }
  return null;
}

/** @param {string} topic */
function dropChip(topic) {
  subscriptions.delete(topic);
  chipOf(topic)?.remove();
}

el.subscribeForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const topic = el.topic.value.trim();
  if (!topic) return;
  if (subscriptions.has(topic)) {
    note(el.subscribeStatus, `already subscribed to ${topic}`);
    return;
  }
  note(el.subscribeStatus, `subscribing to ${topic}…`);
  const item = document.createElement("li");
  item.dataset.topic = topic;
  item.dataset.ready = "false";
  const name = document.createElement("span");
  name.textContent = topic;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "×";
  remove.title = `unsubscribe from ${topic}`;
  item.append(name, remove);
  el.subscriptions.append(item);

  const sub = client.subscribe(topic, onMessage);
  subscriptions.set(topic, sub);
  sub.ready.then(
    () => {
      item.dataset.ready = "true";
      note(el.subscribeStatus, `subscribed to ${topic}`);
      // Only an accepted topic is offered for publishing.
      el.publishTopic.value = topic;
    },
    () => {
      // The "error" listener says why, in this panel.
      if (subscriptions.get(topic) === sub) subscriptions.delete(topic);
      item.remove();
    },
  );
  remove.addEventListener("click", () => {
    subscriptions.delete(topic);
    item.dataset.ready = "false";
    remove.disabled = true;
    sub.unsubscribe().finally(() => item.remove()); // gone once the server acknowledged
  });
});

// --- the message list ----------------------------------------------------------------------

/** Own publishes not seen back yet: `topic\n` + the JSON sent. */
const ownPending = /** @type {string[]} */ ([]);

/** @param {string} topic @param {string} json */
const ownKey = (topic, json) => `${topic}\n${json}`;

/**
 * A row of the message list, newest first.
 * @param {HTMLElement} item
 */
function addRow(item) {
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString();
  item.prepend(time);
  el.messages.prepend(item);
  while (el.messages.childElementCount > MAX_MESSAGES) el.messages.lastElementChild?.remove();
}

/**
 * A marker row: something happened to the connection or to a topic.
 * @param {"reconnect" | "disconnect" | "gap"} kind
 * @param {string} text
 * @param {string} [topic]
 */
function addMarker(kind, text, topic) {
  const item = document.createElement("li");
  item.className = `marker ${kind}`;
  item.dataset.kind = kind;
  if (topic !== undefined) item.dataset.topic = topic;
  const body = document.createElement("span");
  body.className = "note-text";
  body.textContent = text;
  item.append(body);
  addRow(item);
}

/**
 * @param {unknown} data
 * @param {{topic: string, offset?: number, epoch?: string}} meta
 */
function onMessage(data, meta) {
  counts.in += 1;
  const json = JSON.stringify(data);
  const mine = ownPending.indexOf(ownKey(meta.topic, json));
  if (mine >= 0) ownPending.splice(mine, 1);

  const item = document.createElement("li");
  item.dataset.testid = "message";
  item.dataset.topic = meta.topic;
  const topic = document.createElement("span");
  topic.className = "topic";
  topic.textContent = meta.topic;
  item.append(topic);
  if (meta.offset !== undefined) {
    item.dataset.offset = String(meta.offset);
    const offset = document.createElement("span");
    offset.className = "offset";
    offset.textContent = `#${meta.offset}`;
    offset.title = `offset ${meta.offset}, epoch ${meta.epoch}`;
    item.append(offset);
  }
  if (mine >= 0) {
    item.classList.add("own");
    item.dataset.own = "true";
    const you = document.createElement("span");
    you.className = "own-mark";
    you.textContent = "you";
    item.append(you);
  }
  const body = document.createElement("span");
  body.className = "data";
  body.textContent = typeof data === "string" && data !== "" ? data : json; // "" shows as ""
  item.append(body);
  addRow(item);
}

// --- publishing ----------------------------------------------------------------------------

el.publishForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const topic = el.publishTopic.value.trim();
  /** @type {unknown} */
  let data = el.message.value;
  if (el.message.value.trim() === "") {
    note(el.publishStatus, "nothing to publish: the message is empty", true);
    el.message.focus();
    return;
  }
  if (el.asJson.checked) {
    try {
      data = JSON.parse(el.message.value);
    } catch (err) {
      note(el.publishStatus, `not JSON: ${err instanceof Error ? err.message : err}`, true);
      return;
    }
  }
  const key = ownKey(topic, JSON.stringify(data));
  ownPending.push(key);
  if (ownPending.length > MAX_OWN_PENDING) ownPending.shift();
  const forget = () => {
    const at = ownPending.indexOf(key);
    if (at >= 0) ownPending.splice(at, 1);
  };
  note(el.publishStatus, client.state === "open" ? "publishing…" : "queued until connected…");
  client.publish(topic, data).then(
    () => {
      counts.out += 1;
      note(el.publishStatus, `published to ${topic}`);
      if (!subscriptions.has(topic)) forget(); // it will not come back here
    },
    (err) => {
      forget();
      note(el.publishStatus, `${err.code}: ${err.reason}`, true);
    },
  );
});

// --- traffic chart -------------------------------------------------------------------------

const counts = { in: 0, out: 0 };
/** @type {{in: number[], out: number[]}} */
const history = {
  in: new Array(CHART_SECONDS).fill(0),
  out: new Array(CHART_SECONDS).fill(0),
};

/** @param {number[]} values per second, oldest first */
function rate(values) {
  const recent = values.slice(-RATE_WINDOW_S);
  const perSecond = recent.reduce((a, b) => a + b, 0) / RATE_WINDOW_S;
  return perSecond === 0 ? "0" : perSecond.toFixed(1);
}

setInterval(() => {
  for (const key of /** @type {const} */ (["in", "out"])) {
    history[key].push(counts[key]);
    history[key].shift();
    counts[key] = 0;
  }
  el.rateIn.textContent = rate(history.in);
  el.rateOut.textContent = rate(history.out);
  el.rateLegend.dataset.lastSecondIn = String(history.in.at(-1));
  el.rateLegend.dataset.lastSecondOut = String(history.out.at(-1));
  drawChart();
}, 1000);

function drawChart() {
  const canvas = el.chart;
  const ratio = globalThis.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const top = Math.max(1, ...history.in, ...history.out);
  const style = getComputedStyle(canvas);
  /**
   * @param {number[]} values
   * @param {string} color
   */
  const line = (values, color) => {
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = (i / (CHART_SECONDS - 1)) * (width - 2) + 1;
      const y = height - 2 - (v / top) * (height - 4);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.stroke();
  };
  line(history.out, style.getPropertyValue("--out").trim() || "#d9822b");
  line(history.in, style.getPropertyValue("--in").trim() || "#2b7bd9");
  ctx.fillStyle = style.color;
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(`${top}/s`, 4, 11);
}
drawChart();

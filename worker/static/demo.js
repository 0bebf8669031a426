/**
 * The demo page at `/`: subscribe, publish, watch messages and traffic.
 *
 * Message data is shown with `textContent` only: a message is data, never markup. The page's
 * Content-Security-Policy allows no inline script or style, hence this file and demo.css.
 * `globalThis.redwireDemo` is the page's client, for the browser console.
 */

import { connect } from "/redwire.js";

const MAX_MESSAGES = 200;
const CHART_SECONDS = 60;

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const el = {
  state: $("state"),
  worker: $("worker"),
  clientId: $("client-id"),
  subscribeForm: /** @type {HTMLFormElement} */ ($("subscribe-form")),
  topic: /** @type {HTMLInputElement} */ ($("topic")),
  subscriptions: $("subscriptions"),
  publishForm: /** @type {HTMLFormElement} */ ($("publish-form")),
  publishTopic: /** @type {HTMLInputElement} */ ($("publish-topic")),
  message: /** @type {HTMLInputElement} */ ($("message")),
  asJson: /** @type {HTMLInputElement} */ ($("as-json")),
  publishStatus: $("publish-status"),
  chart: /** @type {HTMLCanvasElement} */ ($("rate-chart")),
  rateIn: $("rate-in"),
  rateOut: $("rate-out"),
  messages: $("messages"),
};

const client = connect();
globalThis.redwireDemo = client;

// --- connection ----------------------------------------------------------------------------

/** @param {string} state */
function showState(state) {
  el.state.textContent = state;
  el.state.dataset.state = state;
}
showState(client.state);
client.on("state", showState);
client.on("connected", ({ worker, clientId }) => {
  el.worker.textContent = worker;
  el.clientId.textContent = clientId;
});
client.on("disconnected", ({ code, reason, willReconnect }) => {
  el.worker.textContent = "–";
  el.clientId.textContent = "–";
  el.state.title = `last close: ${code}${reason ? ` ${reason}` : ""}`;
  if (!willReconnect) setStatus(`disconnected (${code}), not reconnecting`, true);
});
client.on("error", (err) => setStatus(`${err.code}: ${err.reason}`, true));

/**
 * @param {string} text
 * @param {boolean} [isError]
 */
function setStatus(text, isError = false) {
  el.publishStatus.textContent = text;
  el.publishStatus.classList.toggle("error", isError);
}

// --- subscriptions -------------------------------------------------------------------------

/** @type {Map<string, {unsubscribe(): Promise<void>}>} */
const subscriptions = new Map();

el.subscribeForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const topic = el.topic.value.trim();
  if (!topic || subscriptions.has(topic)) return;
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
    },
    () => {
      subscriptions.delete(topic);
      item.remove(); // the "error" listener shows why
    },
  );
  remove.addEventListener("click", () => {
    subscriptions.delete(topic);
    item.dataset.ready = "false";
    remove.disabled = true;
    sub.unsubscribe().finally(() => item.remove()); // gone once the server acknowledged
  });
  el.publishTopic.value = topic;
});

/**
 * @param {unknown} data
 * @param {{topic: string}} meta
 */
function onMessage(data, meta) {
  counts.in += 1;
  const item = document.createElement("li");
  item.dataset.testid = "message";
  item.dataset.topic = meta.topic;
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString();
  const topic = document.createElement("span");
  topic.className = "topic";
  topic.textContent = meta.topic;
  const body = document.createElement("span");
  body.className = "data";
  body.textContent = typeof data === "string" ? data : JSON.stringify(data);
  item.append(time, topic, body);
  el.messages.prepend(item);
  while (el.messages.childElementCount > MAX_MESSAGES) el.messages.lastElementChild?.remove();
}

// --- publishing ----------------------------------------------------------------------------

el.publishForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const topic = el.publishTopic.value.trim();
  let data = el.message.value;
  if (el.asJson.checked) {
    try {
      data = JSON.parse(data);
    } catch (err) {
      setStatus(`not JSON: ${err instanceof Error ? err.message : err}`, true);
      return;
    }
  }
  setStatus(client.state === "open" ? "publishing…" : "queued until connected…");
  client.publish(topic, data).then(
    () => {
      counts.out += 1;
      setStatus(`published to ${topic}`);
    },
    (err) => setStatus(`${err.code}: ${err.reason}`, true),
  );
});

// --- traffic chart -------------------------------------------------------------------------

const counts = { in: 0, out: 0 };
/** @type {{in: number[], out: number[]}} */
const history = {
  in: new Array(CHART_SECONDS).fill(0),
  out: new Array(CHART_SECONDS).fill(0),
};

setInterval(() => {
  for (const key of /** @type {const} */ (["in", "out"])) {
    history[key].push(counts[key]);
    history[key].shift();
    counts[key] = 0;
  }
  el.rateIn.textContent = String(history.in.at(-1));
  el.rateOut.textContent = String(history.out.at(-1));
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

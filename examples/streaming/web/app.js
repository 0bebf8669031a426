// The browser side of the streaming example: draw `telemetry`, send `commands`.
import { connect } from "/redwire.js";

const $ = (id) => document.getElementById(id);
const client = connect();
const values = [];
let count = 0;

client.on("state", (state) => { $("state").textContent = state; });
client.on("connected", ({ worker }) => { $("worker").textContent = String(worker); });

client.subscribe("telemetry", (data) => {
  if (data && data.kind === "reading") {
    count += 1;
    values.push(Number(data.value));
    if (values.length > 200) values.shift();
    $("count").textContent = String(count);
    $("last").textContent = `#${data.seq}: ${data.value}`;
    draw();
  } else if (data && (data.kind === "ack" || data.kind === "error")) {
    // Text only: a message is data, never markup.
    $("service").textContent = JSON.stringify(data);
  }
});

function draw() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (values.length < 2) return;
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / (values.length - 1)) * canvas.width;
    const y = canvas.height - ((v - lo) / span) * (canvas.height - 10) - 5;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

async function command(body) {
  try {
    await client.publish("commands", body);
  } catch (err) {
    $("service").textContent = `not sent: ${err.code || err.message}`;
  }
}

$("rate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  command({ cmd: "rate", hz: Number($("hz").value) });
});
$("pause").addEventListener("click", () => command({ cmd: "pause" }));
$("resume").addEventListener("click", () => command({ cmd: "resume" }));

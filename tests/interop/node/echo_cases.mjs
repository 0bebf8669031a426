// Drives a Redwire echo server with Node's `ws` client and prints one JSON object of results.
// Usage: node echo_cases.mjs ws://127.0.0.1:PORT [deflate|plain]
import WebSocket from "ws";

const url = process.argv[2];
const compression = process.argv[3] === "deflate";

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: compression, maxPayload: 64 * 1024 * 1024 });
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

function nextMessage(ws) {
  return new Promise((resolve) => ws.once("message", (data, isBinary) => resolve({ data, isBinary })));
}

function closed(ws) {
  return new Promise((resolve) => ws.once("close", (code, reason) => resolve({ code, reason: reason.toString() })));
}

const results = {};
const ws = await open();
results.extensions = ws.extensions;

for (const size of [0, 125, 126, 65535, 65536]) {
  const text = "a".repeat(size);
  const wait = nextMessage(ws);
  ws.send(text);
  const got = await wait;
  results[`text_${size}`] = !got.isBinary && got.data.toString() === text;

  const bin = Buffer.alloc(size, 7);
  const waitBin = nextMessage(ws);
  ws.send(bin);
  const gotBin = await waitBin;
  results[`binary_${size}`] = gotBin.isBinary && Buffer.compare(gotBin.data, bin) === 0;
}

// A fragmented text message: three frames, the last one final.
{
  const wait = nextMessage(ws);
  ws.send("frag-", { fin: false });
  ws.send("ment-", { fin: false });
  ws.send("ed", { fin: true });
  const got = await wait;
  results.fragmented = got.data.toString() === "frag-ment-ed";
}

// Ping: the server must answer with a pong carrying the same payload.
{
  const pong = new Promise((resolve) => ws.once("pong", (data) => resolve(data.toString())));
  ws.ping("are-you-there");
  results.ping = (await pong) === "are-you-there";
}

// Close with an application code: the server echoes it.
{
  const done = closed(ws);
  ws.close(4321, "bye");
  const info = await done;
  results.close_code = info.code;
}

// Over the limit: 8 MiB against the default 1 MiB maximum -> close 1009.
{
  const big = await open();
  const done = closed(big);
  big.send(Buffer.alloc(8 * 1024 * 1024, 1));
  const info = await done;
  results.too_big_code = info.code;
}

console.log(JSON.stringify(results));
process.exit(0);

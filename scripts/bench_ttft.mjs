#!/usr/bin/env node
// Time to first streamed token: from sending a streamed request to epd (or any OpenAI-style
// server) to the arrival of the first SSE chunk that carries text, for /v1/completions and
// /v1/chat/completions, sequential requests on an idle server. Needs node >= 18 (fetch).
// Usage: node scripts/bench_ttft.mjs BASE_URL [runs=50] [prompt]
// Prints min / median / p90 / max in milliseconds for each endpoint.
const [base, runsArg, promptArg] = process.argv.slice(2);
if (!base) {
  console.error("usage: bench_ttft.mjs BASE_URL [runs] [prompt]");
  process.exit(2);
}
const runs = Number(runsArg || 50);
const prompt = promptArg || "The quick brown fox jumps over the lazy dog. Tell me a story about it.";

async function ttft(path, body) {
  const t0 = performance.now();
  const r = await fetch(base + path, { method: "POST", headers: { "content-type": "application/json" },
                                       body: JSON.stringify({ ...body, stream: true, max_tokens: 8, temperature: 0 }) });
  if (r.status !== 200) throw new Error(`${path}: HTTP ${r.status}: ${await r.text()}`);
  const dec = new TextDecoder();
  let buf = "", first = null;
  for await (const part of r.body) {
    buf += dec.decode(part, { stream: true });
    let i;
    while (first === null && (i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i).replace(/^data: /, "");
      buf = buf.slice(i + 2);
      if (ev === "[DONE]") continue;
      const ch = JSON.parse(ev).choices[0];
      const text = ch ? (ch.text ?? (ch.delta && ch.delta.content)) : "";
      if (text) first = performance.now() - t0;
    }
  }
  return first;
}

function stats(xs) {
  const s = xs.filter((x) => x !== null).sort((a, b) => a - b);
  const q = (p) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
  return `n=${s.length} min ${s[0].toFixed(2)} median ${q(0.5).toFixed(2)} p90 ${q(0.9).toFixed(2)} max ${s[s.length - 1].toFixed(2)} ms`;
}

for (const [path, body] of [["/v1/completions", { prompt }],
                            ["/v1/chat/completions", { messages: [{ role: "user", content: prompt }] }]]) {
  await ttft(path, body); // warm-up
  const xs = [];
  for (let i = 0; i < runs; i++) xs.push(await ttft(path, body));
  console.log(`${path}: time to first streamed token: ${stats(xs)}`);
}

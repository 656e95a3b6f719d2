// Renders the chat cases with Qwen3's real chat_template through @huggingface/jinja (the Jinja
// engine of transformers.js), as a second, independent reference for the native renderer.
// usage: node ref_chat.mjs <tokenizer_config.json> <chat_cases.json> <out.json>
// out.json: an array of rendered strings, one per case, in order.
import fs from "fs";
import path from "path";
import { createRequire } from "module";

const [cfgPath, casesPath, outPath] = process.argv.slice(2);
const req = createRequire(path.join(process.cwd(), "package.json"));
const { Template } = req("@huggingface/jinja");
const cfg = JSON.parse(fs.readFileSync(cfgPath, "utf8"));
const tmpl = new Template(cfg.chat_template);
const cases = JSON.parse(fs.readFileSync(casesPath, "utf8")).cases;
const out = cases.map((c) => {
  // tool calls in the OpenAI shape that the template unwraps (tool_call.function)
  const messages = c.messages.map((m) => {
    const o = { ...m };
    if (o.tool_calls)
      o.tool_calls = o.tool_calls.map((t) => ({ type: "function", function: { name: t.name, arguments: t.arguments } }));
    return o;
  });
  const vars = { messages, add_generation_prompt: c.add_generation_prompt };
  if ("enable_thinking" in c) vars.enable_thinking = c.enable_thinking;
  return tmpl.render(vars);
});
fs.writeFileSync(outPath, JSON.stringify(out));
console.log(`ref_chat: ${out.length} renderings -> ${outPath}`);

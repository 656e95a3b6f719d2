// The official openai npm client against epd's text API on the qwen3vocab checkpoint:
// completions and chat, plain and streamed, must give transformers' greedy text
// (qwen3vocab/expected.json).
// Usage: node openai_text.mjs BASE_URL EXPECTED_JSON MODEL_ID
import OpenAI from 'openai';
import { readFileSync } from 'node:fs';

const [base, expectedPath, model] = process.argv.slice(2);
const exp = JSON.parse(readFileSync(expectedPath, 'utf8'));
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'not-checked', maxRetries: 0, timeout: 20000 });
const N = exp.new_tokens;
function fail(msg) {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
}

for (const [i, c] of exp.text_cases.entries()) {
  const res = await client.completions.create({ model, prompt: c.prompt, max_tokens: N, temperature: 0 });
  if (res.choices[0].text !== c.text) fail(`completion ${i}: ${JSON.stringify(res.choices[0].text)} != ${JSON.stringify(c.text)}`);
  if (res.choices[0].finish_reason !== 'length') fail(`completion ${i}: finish ${res.choices[0].finish_reason}`);
  if (res.usage.prompt_tokens !== c.prompt_ids.length || res.usage.completion_tokens !== N)
    fail(`completion ${i}: usage ${JSON.stringify(res.usage)}`);
  const stream = await client.completions.create({ model, prompt: c.prompt, max_tokens: N, temperature: 0, stream: true });
  let text = '', finish = null;
  for await (const chunk of stream)
    for (const ch of chunk.choices) {
      text += ch.text;
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  if (text !== c.text) fail(`completion ${i} streamed: ${JSON.stringify(text)} != ${JSON.stringify(c.text)}`);
  if (finish !== 'length') fail(`completion ${i} streamed: finish ${finish}`);
}

for (const [i, c] of exp.chat_cases.entries()) {
  const body = { model, messages: c.messages, max_tokens: N, temperature: 0 };
  if ('enable_thinking' in c) body.chat_template_kwargs = { enable_thinking: c.enable_thinking };
  const res = await client.chat.completions.create(body);
  const m = res.choices[0].message;
  if (res.object !== 'chat.completion' || !res.id.startsWith('chatcmpl-')) fail(`chat ${i}: ${JSON.stringify(res)}`);
  if (m.role !== 'assistant' || m.content !== c.text) fail(`chat ${i}: ${JSON.stringify(m)} != ${JSON.stringify(c.text)}`);
  if (res.usage.prompt_tokens !== c.prompt_ids.length) fail(`chat ${i}: usage ${JSON.stringify(res.usage)}`);
  const stream = await client.chat.completions.create({ ...body, stream: true, stream_options: { include_usage: true } });
  let text = '', role = null, finish = null, usage = null;
  for await (const chunk of stream) {
    for (const ch of chunk.choices) {
      if (ch.delta.role) role = ch.delta.role;
      if (ch.delta.content) text += ch.delta.content;
      if (ch.finish_reason) finish = ch.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  if (role !== 'assistant' || text !== c.text) fail(`chat ${i} streamed: ${role} ${JSON.stringify(text)} != ${JSON.stringify(c.text)}`);
  if (finish !== 'length' || !usage || usage.completion_tokens !== N) fail(`chat ${i} streamed: ${finish} ${JSON.stringify(usage)}`);
}

try {
  await client.chat.completions.create({ model, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] });
  fail('an image part was accepted');
} catch (e) {
  if (!(e instanceof OpenAI.BadRequestError) || !/messages\[0\]\.content\[0\]/.test(e.message)) fail(`image part: ${e}`);
}
console.log(`openai client: ${exp.text_cases.length} completions and ${exp.chat_cases.length} chats ok, plain and streamed`);

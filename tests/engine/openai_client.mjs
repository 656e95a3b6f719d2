// The official openai npm client against epd: completions.create with token-id prompts,
// plain and streamed, must give transformers' greedy tokens (expected.json); a bad request
// surfaces as the client's BadRequestError with epd's message; models.list names the model.
// Usage: node openai_client.mjs BASE_URL EXPECTED_JSON
import OpenAI from 'openai';
import { readFileSync } from 'node:fs';

const [base, expectedPath] = process.argv.slice(2);
const expected = JSON.parse(readFileSync(expectedPath, 'utf8'));
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'not-checked', maxRetries: 0, timeout: 20000 });

function same(a, b) {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}
function fail(msg) {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
}

const models = await client.models.list();
if (!models.data.some((m) => m.id === 'oracle')) fail(`models.list: ${JSON.stringify(models.data)}`);

for (const [i, c] of expected.cases.entries()) {
  const n = c.tokens.length;
  const res = await client.completions.create({ model: 'oracle', prompt: c.prompt, max_tokens: n, temperature: 0 });
  if (res.object !== 'text_completion' || !res.id.startsWith('cmpl-')) fail(`case ${i}: ${JSON.stringify(res)}`);
  const got = res.choices[0].token_ids;
  if (!same(got, c.tokens)) fail(`case ${i}: got ${got}, transformers ${c.tokens}`);
  if (res.choices[0].finish_reason !== 'length') fail(`case ${i}: finish_reason ${res.choices[0].finish_reason}`);
  if (res.usage.prompt_tokens !== c.prompt.length || res.usage.completion_tokens !== n ||
      res.usage.total_tokens !== c.prompt.length + n)
    fail(`case ${i}: usage ${JSON.stringify(res.usage)}`);

  const stream = await client.completions.create({
    model: 'oracle', prompt: c.prompt, max_tokens: n, temperature: 0, stream: true,
    stream_options: { include_usage: true },
  });
  const toks = [];
  let finish = null, usage = null;
  for await (const chunk of stream) {
    for (const ch of chunk.choices) {
      toks.push(...ch.token_ids);
      if (ch.finish_reason) finish = ch.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  if (!same(toks, c.tokens)) fail(`case ${i} stream: got ${toks}, transformers ${c.tokens}`);
  if (finish !== 'length') fail(`case ${i} stream: finish_reason ${finish}`);
  if (!usage || usage.completion_tokens !== n) fail(`case ${i} stream: usage ${JSON.stringify(usage)}`);
}

try {
  await client.completions.create({ model: 'oracle', prompt: [1, 2, 400], max_tokens: 2 });
  fail('an id outside the vocabulary was accepted');
} catch (e) {
  if (!(e instanceof OpenAI.BadRequestError)) fail(`expected BadRequestError, got ${e}`);
  if (!/prompt\[2\]: token id 400 is outside the vocabulary/.test(e.message)) fail(`message: ${e.message}`);
  if (e.param !== 'prompt' || e.type !== 'invalid_request_error') fail(`error fields: ${e.param} ${e.type}`);
}
console.log(`openai client: ${expected.cases.length} cases ok, plain and streamed`);

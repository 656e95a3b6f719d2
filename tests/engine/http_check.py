#!/usr/bin/env python3
"""epd's OpenAI-style HTTP API against a transformers oracle, Python standard library only
(for machines without node, such as the GPU device machine; openai_e2e.sh and text_check.mjs
are the node versions that CI runs).

  python3 tests/engine/http_check.py BASE_URL EXPECTED_JSON [--ranks N] [--no-text]

EXPECTED_JSON is either
  tests/model/oracle/expected.json      "cases": [{prompt: [ids], tokens: [greedy ids]}]
  tests/text/qwen3vocab/expected.json   "text_cases" (prompt text, prompt_ids, tokens, text) and
                                        "chat_cases" (messages, prompt_ids, tokens, text)

Checks, each case with max_tokens = the oracle's token count and temperature 0:
  - /v1/completions with the prompt as token ids: the greedy ids, finish_reason "length",
    object/id shape, usage; the same streamed (SSE, stream_options.include_usage): the ids
    concatenate to the oracle's, the stream ends with [DONE], the usage chunk adds up
  - one request carrying all the cases' id prompts: one choice per prompt, in order
  - when the server has a tokenizer (/v1/status: tokenizer.state "loaded") and the file has
    text: text completions (text and ids, plain and streamed) and chat completions (content,
    usage, streamed deltas)
  - /v1/models names the served model; an id outside the vocabulary is a 400 naming 'prompt'
On a mismatch it prints the first differing position and the oracle's margin there (the logit
gap between the best and second-best token: a small margin is where a bf16 model may
legitimately differ from the fp32 oracle). Exit status 0 when every check passes, 1 otherwise.
"""
import argparse
import http.client
import json
import sys
import urllib.parse

failures = 0
checks = 0


def check(cond, what, got=None, want=None, note=""):
    global failures, checks
    checks += 1
    if not cond:
        failures += 1
        print(f"FAIL {what}{(' (' + note + ')') if note else ''}")
        if got is not None or want is not None:
            print(f"  got:  {json.dumps(got, ensure_ascii=False)[:600]}")
            print(f"  want: {json.dumps(want, ensure_ascii=False)[:600]}")
    return cond


class Client:
    def __init__(self, base, timeout):
        u = urllib.parse.urlsplit(base if "://" in base else "http://" + base)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout

    def _req(self, method, path, body=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            c.request(method, self.prefix + path, body=data, headers=hdrs)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def get(self, path):
        st, raw = self._req("GET", path)
        try:
            return st, json.loads(raw)
        except ValueError:
            return st, None

    def post(self, path, body):
        st, raw = self._req("POST", path, body)
        try:
            return st, json.loads(raw), raw
        except ValueError:
            return st, None, raw

    def stream(self, path, body):
        """Returns (status, chunks, done, utf8_ok, raw_error)."""
        st, raw = self._req("POST", path, body)
        if st != 200:
            return st, [], False, True, raw[:500]
        try:
            text = raw.decode("utf-8")
            utf8 = True
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "replace")
            utf8 = False
        chunks, done = [], False
        for ev in text.split("\n\n"):
            ev = ev.strip()
            if not ev:
                continue
            if not ev.startswith("data: "):
                check(False, f"{path} stream: an event that is not 'data: '", ev[:100], "data: ...")
                continue
            payload = ev[6:]
            if payload == "[DONE]":
                done = True
                continue
            check(not done, f"{path} stream: data after [DONE]", payload[:100], None)
            try:
                chunks.append(json.loads(payload))
            except ValueError:
                check(False, f"{path} stream: a data line that is not JSON", payload[:200], None)
        return st, chunks, done, utf8, None


def first_diff(got, want, margins):
    for i in range(min(len(got), len(want))):
        if got[i] != want[i]:
            m = margins[i] if margins and i < len(margins) else None
            return f"first difference at token {i}" + (f", oracle margin {m:.4g}" if m is not None else "")
    if len(got) != len(want):
        return f"lengths {len(got)} vs {len(want)}"
    return ""


def ids_case(cl, tag, prompt, tokens, margins, model_id):
    n = len(tokens)
    st, js, raw = cl.post("/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0})
    if not check(st == 200 and js and js.get("choices"), f"{tag}: status", raw[:300].decode("utf-8", "replace"), 200):
        return
    ch = js["choices"][0]
    check(js.get("object") == "text_completion" and str(js.get("id", "")).startswith("cmpl-"),
          f"{tag}: object and id", {"object": js.get("object"), "id": js.get("id")}, "text_completion/cmpl-")
    check(js.get("model") == model_id, f"{tag}: model", js.get("model"), model_id)
    got = ch.get("token_ids")
    check(got == tokens, f"{tag}: greedy ids", got, tokens, first_diff(got or [], tokens, margins))
    check(ch.get("finish_reason") == "length", f"{tag}: finish_reason", ch.get("finish_reason"), "length")
    want_usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
    check(js.get("usage") == want_usage, f"{tag}: usage", js.get("usage"), want_usage)

    st, chunks, done, utf8, err = cl.stream("/v1/completions", {
        "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    if not check(st == 200, f"{tag} stream: status", err, 200):
        return
    check(done and utf8, f"{tag} stream: [DONE] and UTF-8", {"done": done, "utf8": utf8}, True)
    ids, fin, usage = [], None, None
    for k in chunks:
        for c in k.get("choices") or []:
            ids += c.get("token_ids") or []
            fin = c.get("finish_reason") or fin
        if k.get("usage"):
            usage = k["usage"]
    check(ids == tokens, f"{tag} stream: greedy ids", ids, tokens, first_diff(ids, tokens, margins))
    check(fin == "length", f"{tag} stream: finish_reason", fin, "length")
    check(usage == want_usage, f"{tag} stream: usage", usage, want_usage)
    check(all(k.get("object") == "text_completion" for k in chunks), f"{tag} stream: chunk object",
          [k.get("object") for k in chunks][:3], "text_completion")


def batch_case(cl, cases):
    n = max(len(t) for _, t, _ in cases)
    # one max_tokens for all: compare each choice's prefix of the oracle's length
    st, js, raw = cl.post("/v1/completions", {"prompt": [p for p, _, _ in cases], "max_tokens": n,
                                              "temperature": 0})
    if not check(st == 200 and js, "batch of id prompts: status", raw[:300].decode("utf-8", "replace"), 200):
        return
    chs = sorted(js.get("choices") or [], key=lambda c: c.get("index", 0))
    check(len(chs) == len(cases), "batch of id prompts: one choice per prompt", len(chs), len(cases))
    for i, (ch, (p, t, m)) in enumerate(zip(chs, cases)):
        got = (ch.get("token_ids") or [])[: len(t)]
        check(ch.get("index") == i and got == t, f"batch of id prompts: choice {i}", got, t,
              first_diff(got, t, m))


def text_checks(cl, exp):
    for i, c in enumerate(exp.get("text_cases") or []):
        n, tag = len(c["tokens"]), f"text case {i}"
        st, js, raw = cl.post("/v1/completions", {"prompt": c["prompt"], "max_tokens": n, "temperature": 0})
        if not check(st == 200 and js and js.get("choices"), f"{tag}: status", raw[:300].decode("utf-8", "replace"), 200):
            continue
        ch = js["choices"][0]
        check(ch.get("text") == c["text"], f"{tag}: text", ch.get("text"), c["text"],
              first_diff(ch.get("token_ids") or [], c["tokens"], c.get("margins")))
        check(ch.get("token_ids") == c["tokens"], f"{tag}: ids", ch.get("token_ids"), c["tokens"])
        check((js.get("usage") or {}).get("prompt_tokens") == len(c["prompt_ids"]), f"{tag}: prompt tokens",
              js.get("usage"), len(c["prompt_ids"]))
        st, chunks, done, utf8, err = cl.stream("/v1/completions", {
            "prompt": c["prompt"], "max_tokens": n, "temperature": 0, "stream": True})
        deltas = [k["choices"][0] for k in chunks if k.get("choices")]
        joined = "".join(d.get("text") or "" for d in deltas)
        check(st == 200 and done and utf8, f"{tag} stream: status, [DONE], UTF-8", err, 200)
        check(joined == c["text"], f"{tag} stream: text", joined, c["text"])
    for i, c in enumerate(exp.get("chat_cases") or []):
        n, tag = len(c["tokens"]), f"chat case {i}"
        body = {"messages": c["messages"], "max_tokens": n, "temperature": 0}
        if "enable_thinking" in c:
            body["chat_template_kwargs"] = {"enable_thinking": c["enable_thinking"]}
        st, js, raw = cl.post("/v1/chat/completions", body)
        if not check(st == 200 and js and js.get("choices"), f"{tag}: status", raw[:300].decode("utf-8", "replace"), 200):
            continue
        ch = js["choices"][0]
        msg = ch.get("message") or {}
        check(js.get("object") == "chat.completion", f"{tag}: object", js.get("object"), "chat.completion")
        check(msg.get("role") == "assistant" and msg.get("content") == c["text"], f"{tag}: message",
              msg, c["text"])
        check(ch.get("finish_reason") == "length", f"{tag}: finish_reason", ch.get("finish_reason"), "length")
        u = js.get("usage") or {}
        check(u.get("prompt_tokens") == len(c["prompt_ids"]) and u.get("completion_tokens") == n,
              f"{tag}: usage", u, {"prompt_tokens": len(c["prompt_ids"]), "completion_tokens": n})
        st, chunks, done, utf8, err = cl.stream("/v1/chat/completions", {**body, "stream": True})
        dl = [k["choices"][0] for k in chunks if k.get("choices")]
        check(st == 200 and done and utf8 and all(k.get("object") == "chat.completion.chunk" for k in chunks),
              f"{tag} stream: chunks", err, "chat.completion.chunk ... [DONE]")
        check(bool(dl) and (dl[0].get("delta") or {}).get("role") == "assistant", f"{tag} stream: role first",
              dl[0] if dl else None, "assistant")
        joined = "".join((d.get("delta") or {}).get("content") or "" for d in dl)
        check(joined == c["text"], f"{tag} stream: content", joined, c["text"])
        check(bool(dl) and dl[-1].get("finish_reason") == "length", f"{tag} stream: finish_reason",
              dl[-1] if dl else None, "length")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_url")
    ap.add_argument("expected_json")
    ap.add_argument("--no-text", action="store_true", help="token-id checks only")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request (s)")
    a = ap.parse_args()
    with open(a.expected_json, encoding="utf-8") as f:
        exp = json.load(f)
    cl = Client(a.base_url, a.timeout)

    st, status = cl.get("/v1/status")
    check(st == 200 and status, "/v1/status", st, 200)
    status = status or {}
    engine = status.get("engine") or {}
    model = engine.get("model") or {}
    model_id = model.get("id")
    vocab = model.get("vocab_size")
    st, models = cl.get("/v1/models")
    ids = [m.get("id") for m in (models or {}).get("data") or []]
    check(st == 200 and model_id in ids, "/v1/models names the served model", ids, model_id)

    # (prompt ids, greedy tokens, margins) from either file
    cases = []
    for c in exp.get("cases") or []:
        cases.append((c["prompt"], c["tokens"], c.get("margins")))
    for key in ("text_cases", "chat_cases"):
        for c in exp.get(key) or []:
            cases.append((c["prompt_ids"], c["tokens"], c.get("margins")))
    if not cases:
        sys.exit(f"http_check: no cases in {a.expected_json}")
    for i, (p, t, m) in enumerate(cases):
        ids_case(cl, f"id case {i}", p, t, m, model_id)
    batch_case(cl, cases)

    tok = status.get("tokenizer") or {}
    has_text = bool(exp.get("text_cases") or exp.get("chat_cases"))
    text_run = has_text and not a.no_text and tok.get("state") == "loaded"
    if text_run:
        text_checks(cl, exp)

    if vocab:
        st, js, raw = cl.post("/v1/completions", {"prompt": [1, 2, vocab], "max_tokens": 2})
        err = (js or {}).get("error") or {}
        check(st == 400 and err.get("param") == "prompt" and err.get("type") == "invalid_request_error"
              and "prompt[2]" in (err.get("message") or ""), "an id outside the vocabulary: 400", js, 400)

    what = f"{len(cases)} id cases (plain, streamed, batched)"
    if text_run:
        what += f", {len(exp.get('text_cases') or [])} text and {len(exp.get('chat_cases') or [])} chat cases"
    elif has_text:
        what += ", text/chat skipped (" + ("--no-text" if a.no_text else
                                          f"tokenizer {tok.get('state', 'absent')}") + ")"
    print(f"http_check: {what}: {checks} checks, {failures} failed; model {model_id}, "
          f"{engine.get('placement', {}).get('ranks', '?')} rank(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

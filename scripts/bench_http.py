#!/usr/bin/env python3
"""End-to-end HTTP benchmark of epd (or any OpenAI-style server), Python standard library only.

N concurrent clients (threads), each sending R streamed requests one after the other to
/v1/completions ("stream": true, server-sent events) with a prompt of P token ids (a list of
ids, which epd accepts; --text sends a text prompt instead) and max_tokens M. Measures:

  output tokens/s   all generated tokens / wall time from the first request sent to the last
                    stream ended
  TTFT              time to first token: request sent -> first SSE chunk carrying a token
  TPOT              time per output token of a request: (last token - first token) / (n - 1)
  ITL               inter-token latency: the gaps between consecutive token-carrying chunks
                    (a chunk carrying k tokens counts as k gaps of gap/k)
  errors            HTTP status other than 200, a stream without [DONE], an error event,
                    a connection failure or timeout

Prints a table and one JSON line (prefixed "JSON ") for docs/benchmarks.md.

  python3 scripts/bench_http.py --url http://127.0.0.1:8080 --clients 4 --requests 3 \
      --prompt-tokens 128 --max-tokens 64

Prompt ids are random (seeded; different for every request, so no two requests share a
prefix) in [--min-id, min(vocab, --max-id)), avoiding the model's EOS ids; the vocabulary and
the EOS ids come from /v1/status when the server is epd, else --vocab.
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse


def percentile(xs, p):
    """Linear interpolation between closest ranks; None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Target:
    def __init__(self, url, timeout):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https"):
            raise SystemExit(f"bench_http: unsupported URL scheme {u.scheme!r}")
        self.https = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.https else 80)
        self.base = u.path.rstrip("/")
        self.timeout = timeout

    def conn(self):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def get_json(self, path):
        c = self.conn()
        try:
            c.request("GET", self.base + path)
            r = c.getresponse()
            body = r.read()
            if r.status != 200:
                return None
            return json.loads(body)
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            c.close()


def one_request(target, body):
    """Sends one streamed completion; returns a dict of timings and counts (or an error)."""
    res = {"ok": False, "tokens": 0, "ttft": None, "tpot": None, "gaps": [], "error": None,
           "finish": None}
    data = json.dumps(body).encode()
    c = target.conn()
    t0 = time.perf_counter()
    first = last = None
    done = False
    usage_tokens = None
    n = 0
    try:
        c.request("POST", target.base + "/v1/completions", body=data,
                  headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        r = c.getresponse()
        if r.status != 200:
            msg = r.read(2000).decode("utf-8", "replace")
            try:
                msg = json.loads(msg)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            res["error"] = f"HTTP {r.status}: {msg}"[:300]
            return res
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ..."), other fields
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            now = time.perf_counter()
            try:
                ev = json.loads(payload)
            except ValueError:
                res["error"] = f"bad SSE data: {payload[:200]!r}"
                return res
            if "error" in ev:
                res["error"] = f"error event: {json.dumps(ev['error'])[:300]}"
                return res
            k = 0
            for ch in ev.get("choices") or []:
                ids = ch.get("token_ids")
                if ids is not None:
                    k += len(ids)
                elif ch.get("text"):
                    k += 1  # a server without token_ids: one chunk per token
                if ch.get("finish_reason"):
                    res["finish"] = ch["finish_reason"]
            if ev.get("usage"):
                usage_tokens = ev["usage"].get("completion_tokens")
            if k == 0:
                continue
            if first is None:
                first = now
                res["ttft"] = now - t0
                res["gaps"].extend([0.0] * (k - 1))  # tokens of one chunk arrive together
            else:
                res["gaps"].extend([(now - last) / k] * k)
            last = now
            n += k
        if not done:
            res["error"] = "stream ended without [DONE]"
            return res
    except (OSError, http.client.HTTPException) as e:
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    finally:
        c.close()
    if usage_tokens is not None and usage_tokens != n:
        res["error"] = f"usage.completion_tokens {usage_tokens} != {n} streamed tokens"
        return res
    res["tokens"] = n
    if n >= 2:
        res["tpot"] = (last - first) / (n - 1)
    res["ok"] = True
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one at a time")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--text", action="store_true",
                    help="send a text prompt (a repeated sentence, about --prompt-tokens tokens; "
                         "the server needs a tokenizer) instead of token ids")
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size for random ids (default: /v1/status's)")
    ap.add_argument("--min-id", type=int, default=100)
    ap.add_argument("--max-id", type=int, default=151643,
                    help="exclusive upper bound of prompt ids (Qwen3's special ids start here)")
    ap.add_argument("--model", default=None, help="the request's 'model' field (default: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="socket timeout per request (s)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="sequential requests sent (and not measured) before the run")
    a = ap.parse_args()
    if min(a.clients, a.requests, a.prompt_tokens, a.max_tokens) < 1:
        ap.error("--clients, --requests, --prompt-tokens and --max-tokens must be >= 1")

    target = Target(a.url, a.timeout)
    status = target.get_json("/v1/status") or {}
    model = (status.get("engine") or {}).get("model") or status.get("model") or {}
    vocab = a.vocab or model.get("vocab_size")
    eos = set(model.get("eos_token_ids") or [])
    max_seq = model.get("max_seq_len")
    if not a.text and not vocab:
        sys.exit("bench_http: no /v1/status with model.vocab_size at this URL: give --vocab")
    if max_seq and a.prompt_tokens + a.max_tokens > max_seq:
        sys.exit(f"bench_http: prompt {a.prompt_tokens} + max_tokens {a.max_tokens} exceeds the "
                 f"server's max_seq_len {max_seq}")
    hi = min(vocab or a.max_id, a.max_id)
    lo = min(a.min_id, max(hi - 1, 0))
    if not a.text and hi - lo < 2:
        sys.exit(f"bench_http: no id range to draw from ([{lo}, {hi}))")

    def prompt(client, req):
        rnd = random.Random(a.seed * 1000003 + client * 1009 + req)
        if a.text:
            words = "the quick brown fox jumps over the lazy dog while seven wizards quietly".split()
            # about one token per word; the request index first so prefixes differ
            return f"{client} {req} " + " ".join(rnd.choice(words) for _ in range(a.prompt_tokens - 2))
        ids = []
        while len(ids) < a.prompt_tokens:
            t = rnd.randrange(lo, hi)
            if t not in eos:
                ids.append(t)
        return ids

    def body(p):
        b = {"prompt": p, "max_tokens": a.max_tokens, "temperature": a.temperature,
             "stream": True, "stream_options": {"include_usage": True}}
        if a.model:
            b["model"] = a.model
        return b

    for w in range(a.warmup):
        r = one_request(target, body(prompt(-1, w)))
        if not r["ok"]:
            print(f"bench_http: warm-up request failed: {r['error']}", file=sys.stderr)

    results = []
    lock = threading.Lock()
    start = threading.Barrier(a.clients + 1)

    def client(ci):
        start.wait()
        for ri in range(a.requests):
            r = one_request(target, body(prompt(ci, ri)))
            r["client"] = ci
            r["t_end"] = time.perf_counter()
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    for t in threads:
        t.start()
    start.wait()
    t_start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start

    ok = [r for r in results if r["ok"]]
    errs = [r for r in results if not r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    itl = [g for r in ok for g in r["gaps"]]
    short = sum(1 for r in ok if r["tokens"] < a.max_tokens)

    def ms(x):
        return None if x is None else round(x * 1000.0, 3)

    summary = {
        "bench": "http", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "url": a.url,
        "model": model.get("id"), "clients": a.clients, "requests_per_client": a.requests,
        "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
        "temperature": a.temperature, "prompt_kind": "text" if a.text else "ids",
        "requests": len(results), "ok": len(ok), "errors": len(errs),
        "ended_early": short, "output_tokens": tokens, "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
        "tpot_ms_p50": ms(percentile(tpot, 50)), "tpot_ms_p99": ms(percentile(tpot, 99)),
        "itl_ms_p50": ms(percentile(itl, 50)), "itl_ms_p99": ms(percentile(itl, 99)),
    }

    def f(x, unit=""):
        return "-" if x is None else f"{x:.2f}{unit}"

    print(f"bench_http: {a.url}  model {summary['model']}  {a.clients} clients x {a.requests} "
          f"requests, prompt {a.prompt_tokens} tokens ({summary['prompt_kind']}), "
          f"max_tokens {a.max_tokens}, temperature {a.temperature}")
    rows = [
        ("requests ok / errors", f"{len(ok)} / {len(errs)}"
         + (f"  ({short} ended before max_tokens: EOS)" if short else "")),
        ("output tokens", f"{tokens} in {wall:.3f} s"),
        ("output tokens/s", f(summary["output_tok_s"])),
        ("requests/s", f(summary["requests_s"])),
        ("TTFT p50 / p99", f"{f(summary['ttft_ms_p50'])} / {f(summary['ttft_ms_p99'])} ms"),
        ("TPOT p50 / p99", f"{f(summary['tpot_ms_p50'])} / {f(summary['tpot_ms_p99'])} ms"),
        ("ITL p50 / p99", f"{f(summary['itl_ms_p50'])} / {f(summary['itl_ms_p99'])} ms"),
    ]
    for k, v in rows:
        print(f"  {k:<22} {v}")
    seen = set()
    for r in errs:
        if r["error"] not in seen and len(seen) < 5:
            seen.add(r["error"])
            print(f"  error (client {r['client']}): {r['error']}")
    print("JSON " + json.dumps(summary))
    return 1 if errs or not ok else 0


if __name__ == "__main__":
    sys.exit(main())

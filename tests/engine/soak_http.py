#!/usr/bin/env python3
"""A soak of epd's HTTP API, Python standard library only (issue 14, item 7): random arrivals,
cancellations, long and short prompts and an exhausted KV pool; every request answered, the KV
pool whole again afterwards.

  python3 tests/engine/soak_http.py --url http://127.0.0.1:8080 --seconds 60 [--requests N]
      [--rate R] [--concurrency C] [--long-tokens 1500] [--cancel 0.15] [--pairs 6]
      [--timeout 120] [--expect-preemption]

Arrivals are a Poisson process (exponential gaps at --rate per second); at most --concurrency
requests are in flight (an arrival waits for a free slot). Each request is /v1/completions with
the prompt as token ids: short (1-32 ids) or, with probability --long-frac, long (up to
--long-tokens ids, cut to what the server's context and one rank's KV pool can hold, so that
prompts prefill in chunks and a few of them fill a rank's pool); max_tokens 1-200; streamed or
not; greedy (temperature 0) or sampled (temperature, top_k, top_p, seed). A fraction (--cancel)
is cancelled: a stream closed after a random number of tokens, or (a quarter of them) a plain
request abandoned after a random delay. A fraction (--oversize) asks for more KV blocks than a
rank's pool has: those must be refused with 400. --pairs seeded sampled requests (temperature,
top_k, top_p, seed) run alone on the idle server before the soak and again after it, and must
give the same tokens both times; each also runs once during the soak, under load, where a
difference is reported (a failure with --pair-check strict): a step takes the LL or the HT MoE
path by every rank's batch, and the two round differently, so a sampled token near a tie can
change with the load (with model.max_prefill_tokens 0 every step is LL and the cpu engine
gives the same tokens under load too).

Every request must end with a complete 200 (plain: JSON with choices[0].token_ids and usage
that adds up; streamed: token chunks, a finish_reason, the usage chunk when asked for, then
[DONE]) or a clear refusal (429/503 with a JSON error body; 400 only where expected): never a
hang (--timeout per request, a failure), never a connection reset or an error event for a
request that was not cancelled, never another 4xx/5xx. Before and after: /v1/status's per-rank
KV blocks (free/total) and step count, /metrics' preemption and step-failure counters; after
the soak (in-flight requests drained, polled up to --drain-timeout s) every rank must have all
its KV blocks free and no active or queued sequence, and /readyz must answer 200. A status
monitor records the fewest free KV blocks seen per rank during the run.

Prints a summary table and one JSON line (prefixed "JSON "); exit status 0 when every check
passed, 1 otherwise (2: the server could not be reached at the start).
"""
import argparse
import collections
import http.client
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.parse

ERROR_TAIL = 300


class Target:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme != "http":
            raise SystemExit(f"soak_http: only http:// URLs, not {u.scheme!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.base = u.path.rstrip("/")

    def conn(self, timeout):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path, timeout=5.0):
        """(status, body bytes) or (None, error text)."""
        c = self.conn(timeout)
        try:
            c.request("GET", self.base + path)
            r = c.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            return None, f"{type(e).__name__}: {e}"
        finally:
            c.close()

    def get_json(self, path, timeout=5.0):
        st, body = self.get(path, timeout)
        if st != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None


# ---- server state: /v1/status and /metrics --------------------------------------------------

def kv_of(status):
    """[(rank, free, total)] of the ranks on this node."""
    out = []
    eng = (status or {}).get("engine") or {}
    for r in (eng.get("placement") or {}).get("by_rank") or []:
        kv = r.get("kv")
        if r.get("on_this_node") and kv:
            out.append((r.get("rank"), kv.get("blocks_free"), kv.get("blocks_total")))
    return out


def metrics_of(target):
    """A few counters from /metrics (sums over labels); {} when unavailable."""
    st, body = target.get("/metrics")
    if st != 200:
        return {}
    want = ("epd_engine_step_duration_seconds_count", "epd_engine_preemptions_total",
            "epd_engine_step_failures_total", "epd_engine_group_reforms_total",
            "epd_generated_tokens_total", "epd_prompt_tokens_total")
    out = {}
    for line in body.decode("utf-8", "replace").splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) in want:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def snapshot(target):
    st = target.get_json("/v1/status")
    eng = (st or {}).get("engine") or {}
    return {
        "kv": kv_of(st),
        "steps": eng.get("steps"),
        "step_failures": eng.get("step_failures"),
        "group_reforms": eng.get("group_reforms"),
        "active": eng.get("active_sequences"),
        "queued": eng.get("queue_depth"),
        "state": eng.get("state"),
        "preemptions": sum(((r.get("kv") or {}).get("preemptions") or 0)
                           for r in (eng.get("placement") or {}).get("by_rank") or []),
        "metrics": metrics_of(target),
        "ok": st is not None,
    }


# ---- one request ------------------------------------------------------------------------------

class Watchdog:
    """Shuts the socket of a request at its deadline (a hang, or a planned abandonment)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.items = {}  # key -> [deadline, conn, why]
        self.fired = set()
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def arm(self, key, deadline, conn, why):
        with self.lock:
            self.items[key] = [deadline, conn, why]

    def disarm(self, key):
        with self.lock:
            self.items.pop(key, None)
            return key in self.fired

    def why(self, key):
        with self.lock:
            return key in self.fired

    def run(self):
        while not self.stop:
            now = time.monotonic()
            with self.lock:
                for key, (dl, conn, why) in list(self.items.items()):
                    if now >= dl and key not in self.fired:
                        self.fired.add(key)
                        sock = getattr(conn, "sock", None)
                        if sock is not None:
                            try:
                                sock.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
            time.sleep(0.05)


def run_request(target, spec, wd, timeout):
    """Sends one completion; returns the outcome dict."""
    res = {"id": spec["id"], "outcome": None, "error": None, "tokens": [], "status": None,
           "finish": None, "t": None}
    body = {"prompt": spec["prompt"], "max_tokens": spec["max_tokens"],
            "temperature": spec["temperature"], "stream": spec["stream"]}
    for k in ("top_k", "top_p", "seed"):
        if spec.get(k) is not None:
            body[k] = spec[k]
    if spec["stream"] and spec["usage"]:
        body["stream_options"] = {"include_usage": True}
    data = json.dumps(body).encode()
    t0 = time.monotonic()
    c = target.conn(timeout)
    key = spec["id"]
    abandon = spec.get("abandon_s")
    # the abandonment (a plain request the client gives up on) or the hang deadline
    if abandon is not None:
        wd.arm(key, t0 + abandon, c, "abandon")
    else:
        wd.arm(key, t0 + timeout, c, "timeout")
    cancel_at = spec.get("cancel_after")

    def finish(outcome, error=None):
        res["outcome"] = outcome
        if error:
            res["error"] = error[:ERROR_TAIL]
        res["t"] = time.monotonic() - t0
        return res

    try:
        c.request("POST", target.base + "/v1/completions", body=data,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        res["status"] = r.status
        if r.status != 200:
            raw = r.read(4000)
            try:
                err = json.loads(raw)["error"]
                msg = err["message"]
                assert isinstance(msg, str) and msg
            except (ValueError, KeyError, TypeError, AssertionError):
                return finish("fail", f"HTTP {r.status} without a JSON error body: {raw[:200]!r}")
            if r.status == 400 and spec["kind"] == "oversize":
                return finish("refused_expected", f"400: {msg}")
            if r.status in (429, 503):
                return finish("refused", f"{r.status}: {msg}")
            return finish("fail", f"HTTP {r.status}: {msg}")
        if spec["kind"] == "oversize":
            r.read()
            return finish("fail", "an oversize request (more KV blocks than a rank's pool) got 200")
        if not spec["stream"]:
            raw = r.read()
            try:
                doc = json.loads(raw)
                ch = doc["choices"][0]
                toks = ch["token_ids"]
                usage = doc["usage"]
            except (ValueError, KeyError, TypeError, IndexError):
                return finish("fail", f"bad JSON response: {raw[:200]!r}")
            res["tokens"] = toks
            res["finish"] = ch.get("finish_reason")
            if usage.get("completion_tokens") != len(toks):
                return finish("fail", f"usage.completion_tokens {usage.get('completion_tokens')} "
                                      f"!= {len(toks)} ids")
            if usage.get("prompt_tokens") != len(spec["prompt"]):
                return finish("fail", f"usage.prompt_tokens {usage.get('prompt_tokens')} != "
                                      f"{len(spec['prompt'])}")
        else:
            done = False
            usage = None
            toks = []
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                try:
                    ev = json.loads(payload)
                except ValueError:
                    return finish("fail", f"bad SSE data: {payload[:200]!r}")
                if "error" in ev:
                    return finish("fail", f"error event: {json.dumps(ev['error'])}")
                for ch in ev.get("choices") or []:
                    toks.extend(ch.get("token_ids") or [])
                    if ch.get("finish_reason"):
                        if res["finish"]:
                            return finish("fail", "two finish_reason chunks")
                        res["finish"] = ch["finish_reason"]
                if ev.get("usage"):
                    usage = ev["usage"]
                if cancel_at is not None and len(toks) >= cancel_at and not res["finish"]:
                    # the client goes away mid-stream
                    res["tokens"] = toks
                    try:
                        c.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return finish("cancelled")
            res["tokens"] = toks
            if not done:
                return finish("fail", f"stream ended without [DONE] after {len(toks)} ids")
            if not res["finish"]:
                return finish("fail", "stream without a finish_reason")
            if spec["usage"]:
                if not usage or usage.get("completion_tokens") != len(toks):
                    return finish("fail", f"usage chunk {usage} != {len(toks)} streamed ids")
        n = len(res["tokens"])
        if res["finish"] not in ("length", "stop"):
            return finish("fail", f"finish_reason {res['finish']!r}")
        if n > spec["max_tokens"] or (res["finish"] == "length" and n != spec["max_tokens"]):
            return finish("fail", f"{n} ids for max_tokens {spec['max_tokens']}, finish "
                                  f"{res['finish']}")
        if res["finish"] == "stop" and n == 0:
            return finish("fail", "finish stop with no ids")
        return finish("ok")
    except (OSError, http.client.HTTPException) as e:
        fired = wd.why(key)
        if fired and abandon is not None:
            return finish("abandoned")
        if fired:
            return finish("fail", f"timeout: no complete answer in {timeout:.0f} s")
        return finish("fail", f"{type(e).__name__}: {e}")
    finally:
        wd.disarm(key)
        c.close()


# ---- the request mix --------------------------------------------------------------------------

class Mix:
    def __init__(self, a, rnd, vocab, eos, max_seq, pool_tokens, block):
        self.a = a
        self.rnd = rnd
        self.eos = set(eos)
        self.max_seq = max_seq
        self.pool = pool_tokens  # one rank's KV pool, in tokens (None: unknown)
        self.block = block
        hi = min(vocab, a.max_id)
        self.lo, self.hi = min(a.min_id, hi - 2), hi
        self.n = 0
        self.pair_specs, self.pair_slots, self.pairs_sent = [], {}, set()

    def plan_pairs(self, expected):
        """The seeded sampled requests run alone before and after the soak and once under load,
        and the arrival slots of the loaded runs."""
        k = max(self.a.pairs, 0)
        self.pair_specs = []
        for j in range(k):
            spec = self.base("long" if self.rnd.random() < self.a.long_frac else "short")
            self.sampling(spec, True)
            spec.update(id=("pair", j), pair=j, stream=False, usage=False)
            self.pair_specs.append(spec)
        span = max(int(expected * 0.8), k)
        self.pair_slots = dict(zip(sorted(self.rnd.sample(range(span), k)), range(k))) if k else {}
        self.pairs_sent = set()

    def ids(self, n):
        out = []
        while len(out) < n:
            t = self.rnd.randrange(self.lo, self.hi)
            if t not in self.eos:
                out.append(t)
        return out

    def fits(self, plen, mt):
        """prompt + completion within the context and one rank's pool (the last id is not fed)."""
        if plen + mt > self.max_seq:
            return False
        return self.pool is None or plen + mt - 1 <= self.pool

    def base(self, kind):
        a, rnd = self.a, self.rnd
        mt = rnd.randint(1, a.max_tokens_max)
        if kind == "long":
            cap = min(a.long_tokens, self.max_seq - 1, (self.pool or a.long_tokens) - 1)
            lo = min(a.short_max + 1, cap)
            plen = rnd.randint(lo, cap)
            # what the prompt leaves of the context / pool bounds max_tokens (at least 1)
            room = min(self.max_seq - plen, (self.pool + 1 - plen) if self.pool else 1 << 30)
            mt = max(1, min(mt, room))
        elif kind == "oversize":
            # more blocks than a rank's pool, inside the context when the context allows
            plen = min((self.pool or self.max_seq) + rnd.randint(0, 16), self.max_seq - 1)
            mt = max(1, min(mt, self.max_seq - plen))
            if self.fits(plen, mt):  # the pool holds the whole context: no such request
                kind, plen = "short", rnd.randint(1, a.short_max)
        else:
            plen = rnd.randint(1, a.short_max)
            mt = max(1, min(mt, self.max_seq - plen))
        return {"kind": kind, "prompt": self.ids(plen), "max_tokens": mt}

    def sampling(self, spec, sampled):
        rnd = self.rnd
        if sampled:
            spec["temperature"] = round(rnd.uniform(0.5, 1.3), 3)
            spec["top_k"] = rnd.choice([None, 0, 5, 50])
            spec["top_p"] = rnd.choice([None, 1.0, 0.9, 0.5])
            spec["seed"] = rnd.randrange(1 << 31)
        else:
            spec["temperature"] = 0.0
            spec["top_k"] = spec["top_p"] = spec["seed"] = None

    def next(self):
        """The next request's spec."""
        a, rnd = self.a, self.rnd
        i = self.n
        self.n += 1
        if i in self.pair_slots:
            return self.pair_run(self.pair_slots[i], i)
        x = rnd.random()
        kind = "oversize" if x < a.oversize else "long" if x < a.oversize + a.long_frac else "short"
        spec = self.base(kind)
        spec["id"] = i
        spec["stream"] = rnd.random() < a.stream_frac
        spec["usage"] = rnd.random() < 0.5
        self.sampling(spec, rnd.random() < a.sampled_frac)
        if kind != "oversize" and rnd.random() < a.cancel:
            if spec["stream"] or rnd.random() < 0.75:
                spec["stream"] = True
                spec["cancel_after"] = rnd.randint(0, max(spec["max_tokens"] - 1, 0))
            else:
                spec["abandon_s"] = round(rnd.uniform(0.05, 2.0), 3)
        return spec

    def pair_run(self, j, i):
        """Pair j's run under load, as request i (streamed or not at random)."""
        self.pairs_sent.add(j)
        spec = dict(self.pair_specs[j], id=i, stream=self.rnd.random() < 0.5)
        spec["usage"] = spec["stream"] and self.rnd.random() < 0.5
        return spec

    def flush(self):
        """The pairs' runs under load that the arrivals did not reach (the run ended first)."""
        out = []
        for j in range(len(self.pair_specs)):
            if j not in self.pairs_sent:
                out.append(self.pair_run(j, self.n))
                self.n += 1
        return out


# ---- main -------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", default=None)
    ap.add_argument("--url", dest="url_opt", default="http://127.0.0.1:8080")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="arrivals for this long (default 60 without --requests)")
    ap.add_argument("--requests", type=int, default=0, help="at most this many requests (0: no bound)")
    ap.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    ap.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    ap.add_argument("--long-tokens", type=int, default=1500, help="longest long prompt")
    ap.add_argument("--long-frac", type=float, default=0.25, help="share of long prompts")
    ap.add_argument("--short-max", type=int, default=32, help="longest short prompt")
    ap.add_argument("--max-tokens-max", type=int, default=200)
    ap.add_argument("--stream-frac", type=float, default=0.5)
    ap.add_argument("--sampled-frac", type=float, default=0.5)
    ap.add_argument("--cancel", type=float, default=0.15, help="share cancelled by the client")
    ap.add_argument("--oversize", type=float, default=0.02,
                    help="share asking for more KV blocks than a rank has (must be 400)")
    ap.add_argument("--pairs", type=int, default=6, help="seeded sampled requests run alone before and after the soak, and once in it")
    ap.add_argument("--pair-check", choices=("strict", "report"), default="report",
                    help="strict: a pair's run under load must equal its runs alone too (report: printed)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per request (s): a failure")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="after the last answer, wait this long for the KV pool to be free")
    ap.add_argument("--expect-preemption", action="store_true",
                    help="fail unless the KV pool ran out (some request was preempted)")
    ap.add_argument("--min-id", type=int, default=100)
    ap.add_argument("--max-id", type=int, default=151643)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    url = a.url or a.url_opt
    if a.seconds <= 0 and a.requests <= 0:
        a.seconds = 60.0
    target = Target(url)
    rnd = random.Random(a.seed)

    status = target.get_json("/v1/status")
    if not status:
        print(f"soak_http: no /v1/status at {url}", file=sys.stderr)
        return 2
    model = (status.get("engine") or {}).get("model") or {}
    vocab, max_seq = model.get("vocab_size"), model.get("max_seq_len")
    if not vocab or not max_seq:
        print("soak_http: /v1/status has no engine.model.vocab_size/max_seq_len", file=sys.stderr)
        return 2
    before = snapshot(target)
    kv0 = before["kv"]
    pool = min((t for _, _, t in kv0), default=None)
    block = None
    for r in ((status.get("engine") or {}).get("placement") or {}).get("by_rank") or []:
        block = (r.get("kv") or {}).get("block_size") or block
    pool_tokens = pool * block if pool and block else None
    mix = Mix(a, rnd, vocab, model.get("eos_token_ids") or [], max_seq, pool_tokens, block)
    expected = a.requests if a.requests > 0 else int(a.rate * a.seconds)
    if a.requests > 0 and a.seconds > 0:
        expected = min(expected, int(a.rate * a.seconds))
    mix.plan_pairs(max(expected, 1))
    wd = Watchdog()

    def alone(tag):
        """The pairs' requests one at a time on the idle server: {pair: result}."""
        out = {}
        for sp in mix.pair_specs:
            out[sp["pair"]] = run_request(target, dict(sp, id=(tag, sp["pair"])), wd, a.timeout)
        return out

    print(f"soak_http: {len(mix.pair_specs)} seeded pairs' requests alone first", flush=True)
    pre = alone("before")
    before = snapshot(target)
    kv0 = before["kv"]

    print(f"soak_http: {url}  model {model.get('id')}, max_seq_len {max_seq}, "
          f"{len(kv0)} rank(s), KV pool {pool} blocks of {block} per rank "
          f"({pool_tokens} tokens); rate {a.rate}/s, concurrency {a.concurrency}, "
          f"{a.seconds:g} s" + (f" / {a.requests} requests" if a.requests else ""), flush=True)
    fails = []
    if any(f != t for _, f, t in kv0):
        fails.append(f"KV blocks in use before the soak: {kv0}")

    # the status monitor: the fewest free blocks per rank, the most sequences and queued
    mon = {"min_free": {}, "max_active": 0, "max_queued": 0, "polls": 0, "stop": False}

    def monitor():
        while not mon["stop"]:
            st = target.get_json("/v1/status", timeout=3.0)
            if st:
                mon["polls"] += 1
                for rank, f, _ in kv_of(st):
                    if f is not None:
                        mon["min_free"][rank] = min(mon["min_free"].get(rank, f), f)
                eng = st.get("engine") or {}
                mon["max_active"] = max(mon["max_active"], eng.get("active_sequences") or 0)
                mon["max_queued"] = max(mon["max_queued"], eng.get("queue_depth") or 0)
            time.sleep(0.25)

    mt = threading.Thread(target=monitor, daemon=True)
    mt.start()
    slots = threading.Semaphore(a.concurrency)
    results, specs = [], {}
    lock = threading.Lock()
    threads = []

    def worker(spec):
        try:
            r = run_request(target, spec, wd, a.timeout)
        except Exception as e:  # noqa: BLE001 -- a bug here must show as a failure, not a hang
            r = {"id": spec["id"], "outcome": "fail", "error": f"client bug: {e!r}",
                 "tokens": [], "status": None, "finish": None, "t": None}
        with lock:
            results.append(r)
        slots.release()

    def launch(spec):
        slots.acquire()
        specs[spec["id"]] = spec
        t = threading.Thread(target=worker, args=(spec,), daemon=True)
        t.start()
        threads.append(t)

    t_start = time.monotonic()
    next_at = t_start
    while True:
        now = time.monotonic()
        if a.seconds > 0 and now - t_start >= a.seconds:
            break
        if a.requests > 0 and mix.n >= a.requests:
            break
        if next_at > now:
            time.sleep(min(next_at - now, 0.5))
            continue
        launch(mix.next())
        next_at += rnd.expovariate(a.rate) if a.rate > 0 else 0
    for spec in mix.flush():
        launch(spec)
    t_arrivals = time.monotonic() - t_start
    for t in threads:
        t.join(a.timeout + 30)
    hung = sum(1 for t in threads if t.is_alive())
    t_answers = time.monotonic() - t_start
    mon["stop"] = True

    # drained: every block free, nothing active or queued
    t_d = time.monotonic()
    while True:
        after = snapshot(target)
        idle = (after["ok"] and after["kv"] and all(f == t for _, f, t in after["kv"])
                and not after["active"] and not after["queued"])
        if idle or time.monotonic() - t_d > a.drain_timeout:
            break
        time.sleep(0.25)
    drain_s = time.monotonic() - t_d
    ready, _ = target.get("/readyz")
    post = alone("after")
    wd.stop = True
    kv_end = kv_of(target.get_json("/v1/status"))

    # ---- checks
    by = collections.Counter(r["outcome"] for r in results)
    for r in results:
        if r["outcome"] == "fail":
            fails.append(f"request {r['id']} ({specs[r['id']]['kind']}, "
                         f"{'stream' if specs[r['id']]['stream'] else 'plain'}): {r['error']}")
    if hung:
        fails.append(f"{hung} request thread(s) still running {a.timeout + 30:.0f} s after the end")
    if len(results) != len(specs) - hung:
        fails.append(f"{len(specs)} requests sent, {len(results)} answered")
    if not idle:
        fails.append(f"not drained {a.drain_timeout:g} s after the last answer: KV {after['kv']}, "
                     f"active {after['active']}, queued {after['queued']}")
    if [(r, t) for r, _, t in after["kv"]] != [(r, t) for r, _, t in kv0]:
        fails.append(f"KV pool totals changed: before {kv0}, after {after['kv']}")
    if not kv_end or any(f != t for _, f, t in kv_end):
        fails.append(f"KV blocks in use after the pairs' runs alone at the end: {kv_end}")
    if ready != 200:
        fails.append(f"/readyz answered {ready} after the soak")
    d = lambda k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None  # noqa: E731
    steps, preempt = d("steps"), d("preemptions")
    if d("step_failures"):
        fails.append(f"{d('step_failures')} engine step failure(s) during the soak")
    if d("group_reforms"):
        fails.append(f"{d('group_reforms')} EP group re-formation(s) during the soak")
    if a.expect_preemption and not preempt:
        fails.append("no request was preempted: the KV pool never ran out (--expect-preemption)")
    if by["ok"] == 0:
        fails.append("no request completed")

    # seeded pairs: alone before == alone after (strict); under load == alone (strict with
    # --pair-check strict: a step's MoE path, LL or HT, depends on every rank's batch and rounds
    # differently, so a sampled token near a tie may differ under load)
    res_by = {r["id"]: r for r in results}
    pairs_idle_eq = pairs_load_eq = pairs_load_n = 0
    pair_notes = []

    def differ(x, y):
        k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        return f"differ at {k} of {len(x)}/{len(y)}"

    loaded = {s["pair"]: res_by.get(s["id"]) for s in specs.values() if "pair" in s}
    for sp in mix.pair_specs:
        j = sp["pair"]
        what = (f"pair {j} (seed {sp['seed']}, T {sp['temperature']}, top_k {sp['top_k']}, "
                f"top_p {sp['top_p']}, prompt {len(sp['prompt'])}, max_tokens {sp['max_tokens']})")
        r1, r2, rl = pre.get(j), post.get(j), loaded.get(j)
        if not (r1 and r2) or r1["outcome"] != "ok" or r2["outcome"] != "ok":
            fails.append(f"{what}: alone before/after: {r1 and (r1['error'] or r1['outcome'])} / "
                         f"{r2 and (r2['error'] or r2['outcome'])}")
            continue
        if r1["tokens"] == r2["tokens"]:
            pairs_idle_eq += 1
        else:
            fails.append(f"{what}: alone before and after the soak {differ(r1['tokens'], r2['tokens'])}")
        if rl and rl["outcome"] == "ok":
            pairs_load_n += 1
            if rl["tokens"] == r1["tokens"]:
                pairs_load_eq += 1
            else:
                msg = f"{what}: under load vs alone {differ(rl['tokens'], r1['tokens'])}"
                pair_notes.append(msg)
                if a.pair_check == "strict":
                    fails.append(msg)
        elif rl:
            pair_notes.append(f"{what}: the run under load did not complete ({rl['outcome']})")

    # ---- report
    ok = [r for r in results if r["outcome"] == "ok"]
    kinds = collections.Counter(specs[r["id"]]["kind"] for r in results)
    streams = sum(1 for r in ok if specs[r["id"]]["stream"])
    sampled = sum(1 for r in ok if specs[r["id"]]["temperature"] > 0)
    gen = sum(len(r["tokens"]) for r in results)
    ptoks = sum(len(specs[r["id"]]["prompt"]) for r in results if r["outcome"] != "refused_expected")
    longs = [len(s["prompt"]) for s in specs.values() if s["kind"] == "long"]
    lat = sorted(r["t"] for r in ok if r["t"] is not None)
    codes = collections.Counter(r["status"] for r in results if r["outcome"] in ("refused", "fail")
                                and r["status"])
    mb, ma = before["metrics"], after["metrics"]
    msteps = (ma.get("epd_engine_step_duration_seconds_count", 0)
              - mb.get("epd_engine_step_duration_seconds_count", 0)) if ma and mb else None
    summary = {
        "soak": "http", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "url": url,
        "model": model.get("id"), "ranks": len(kv0), "kv_blocks_per_rank": pool,
        "kv_block_size": block, "seconds": round(t_answers, 1), "arrivals_s": round(t_arrivals, 1),
        "rate": a.rate, "concurrency": a.concurrency,
        "requests": len(specs), "answered": len(results), "ok": by["ok"],
        "ok_streamed": streams, "ok_sampled": sampled,
        "cancelled_streams": by["cancelled"], "abandoned_plain": by["abandoned"],
        "refused_400_oversize": by["refused_expected"], "refused_429_503": by["refused"],
        "failed": by["fail"], "hung": hung,
        "short": kinds["short"], "long": kinds["long"], "oversize": kinds["oversize"],
        "long_prompt_max": max(longs) if longs else 0,
        "prompt_tokens": ptoks, "generated_tokens": gen,
        "steps": steps, "steps_metric": msteps, "preemptions": preempt,
        "step_failures": d("step_failures"),
        "kv_before": [[r, f, t] for r, f, t in kv0],
        "kv_min_free": {str(k): v for k, v in sorted(mon["min_free"].items())},
        "kv_after": [[r, f, t] for r, f, t in after["kv"]],
        "max_active": mon["max_active"], "max_queued": mon["max_queued"],
        "drain_s": round(drain_s, 2), "readyz_after": ready,
        "pairs": len(mix.pair_specs), "pairs_alone_equal": pairs_idle_eq,
        "pairs_loaded": pairs_load_n, "pairs_loaded_equal": pairs_load_eq,
        "latency_s_p50": round(lat[len(lat) // 2], 3) if lat else None,
        "latency_s_max": round(lat[-1], 3) if lat else None,
        "failures": len(fails), "pass": not fails,
    }
    rows = [
        ("requests sent / answered", f"{len(specs)} / {len(results)} in {t_answers:.1f} s "
                                     f"(arrivals for {t_arrivals:.1f} s)"),
        ("  short / long / oversize", f"{kinds['short']} / {kinds['long']} / {kinds['oversize']}"
                                      f"  (long prompts up to {summary['long_prompt_max']} ids)"),
        ("completed (200)", f"{by['ok']}  ({streams} streamed, {sampled} sampled)"),
        ("cancelled by the client", f"{by['cancelled']} streams closed, {by['abandoned']} plain "
                                    f"requests abandoned"),
        ("refused", f"{by['refused_expected']} oversize 400 (expected), {by['refused']} 429/503"
                    + (f" {dict(codes)}" if codes else "")),
        ("FAILED", f"{by['fail']}" + (f"  (+{hung} hung)" if hung else "")),
        ("tokens", f"{ptoks} prompt, {gen} generated"),
        ("engine steps", f"{steps} (/v1/status), {msteps if msteps is None else int(msteps)} "
                         f"(epd_engine_step_duration_seconds_count)"),
        ("preemptions", f"{preempt}  (KV exhausted: fewest free blocks per rank "
                        f"{summary['kv_min_free']})"),
        ("peak active / queued", f"{mon['max_active']} / {mon['max_queued']}"),
        ("KV before (rank,free,total)", f"{summary['kv_before']}"),
        ("KV after", f"{summary['kv_after']}  (drained in {drain_s:.2f} s)"),
        ("step failures / reforms", f"{d('step_failures')} / {d('group_reforms')}"),
        ("seeded pairs", f"{pairs_idle_eq} of {len(mix.pair_specs)} equal alone before/after; "
                         f"{pairs_load_eq} of {pairs_load_n} equal under load"),
        ("latency p50 / max", f"{summary['latency_s_p50']} / {summary['latency_s_max']} s"),
        ("/readyz after", f"{ready}"),
    ]
    for k, v in rows:
        print(f"  {k:<28} {v}")
    for n in pair_notes[:10]:
        print(f"  note: {n}")
    for f in fails[:20]:
        print(f"  FAIL: {f}")
    if len(fails) > 20:
        print(f"  ... and {len(fails) - 20} more failures")
    print(f"soak_http: {'PASS' if not fails else 'FAIL'}: {len(specs)} requests, {by['ok']} ok, "
          f"{by['cancelled'] + by['abandoned']} cancelled, "
          f"{by['refused_expected'] + by['refused']} refused, {by['fail']} failed; {steps} steps, "
          f"{preempt} preemptions; KV {'whole' if idle else 'NOT whole'} after")
    print("JSON " + json.dumps(summary), flush=True)
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Device-machine entry point for the GPU model work (issue 14), one command per device call:
# sources scripts/gpu-env.sh (the carried Debian debs in .deps/, see scripts/gpu-deps.sh),
# configures and builds the WHOLE tree with CUDA into build-gpu-serve/ (incremental when the
# folder is kept between calls), then runs the stages named on the command line, in that order,
# each under `timeout`, and prints a summary last. Logs go to $OUT (default ./gpu-out).
#
#   scripts/gpu-serve.sh [--no-build] STAGE... [-- ARGS...]
#
# Stages:
#   tests      ctest -L gpu, then ctest -L model (CTEST_ARGS: extra ctest arguments)
#   serve      starts build-gpu-serve/daemon/epd with config/examples/single-gpu.json (or
#              $EPD_CONFIG), model.path set to $EPD_MODEL or to tests/text/qwen3vocab (plus
#              Qwen3's tokenizer from .deps/qwen3-tokenizer when carried), the HTTP port to a free
#              one; waits for /readyz; runs tests/engine/http_check.py against the oracle's
#              expected.json ($EPD_EXPECTED; by default the model folder's expected.json, for
#              qwen3vocab tests/text/qwen3vocab/expected.json; without one, a smoke request)
#   httpbench  scripts/bench_http.py against that epd (started if serve did not run):
#              $HTTP_BENCH_ARGS (default --clients 4 --requests 3 --prompt-tokens 128
#              --max-tokens 64); output in $OUT/http-bench.txt
#   bench      build-gpu-serve/model/cuda/model-bench ARGS... (the ARGS after --), tee'd to
#              $OUT/bench.txt
#   dsbench    model-bench --model deepseek-v2-lite --batches 1,8,64,256 (DeepSeek-V2-Lite's
#              shape, MLA; then the ARGS after --), tee'd to $OUT/bench-dsv2lite.txt
#   torch      python3 scripts/bench_torch_peer.py $TORCH_ARGS, tee'd to $OUT/torch.txt
#              (TORCH_ARGS="--model deepseek-v2-lite": the DeepSeek-V2-Lite peer)
#   dsref      transformers' DeepseekV3/V2ForCausalLM on tests/model/oracle_dsv3 and oracle_dsv2
#              against their expected.json (tests/model/make_deepseek_oracle.py --check; CPU, no
#              build needed), tee'd to $OUT/dsref.txt
#   soak       tests/engine/soak_http.py against that epd (started if serve did not run) for
#              $SOAK_SECONDS (default 60): random arrivals, long and short prompts, cancellations,
#              an exhausted KV pool (with soak among the stages, the epd gets model.kv_blocks
#              $SOAK_KV_BLOCKS, default 64, so serve's http_check runs on that small pool too;
#              0 keeps the config's pool); --rate $SOAK_RATE (24), --concurrency
#              $SOAK_CONCURRENCY (32), --expect-preemption, $SOAK_ARGS; nvidia-smi memory.used
#              before and after it (epd still running) must agree within $SOAK_MEM_SLACK_MIB (64);
#              output in $OUT/soak.txt
#   sanitize   compute-sanitizer --tool memcheck on $SANITIZE_CMD (a shell command line), by
#              default on model-bench ARGS... (the ARGS after --). With SANITIZE_EPD=1 it is epd
#              itself that runs under the sanitizer instead (see below) and this stage runs the
#              short soak against it
# SANITIZE_EPD=1: whichever stage starts epd starts it under `compute-sanitizer --tool memcheck
# --leak-check full` (rate 4, concurrency 8 for the soak unless SOAK_RATE/SOAK_CONCURRENCY say
# otherwise); at the end epd gets SIGTERM (up to $SANITIZE_STOP_WAIT s, default 180, to exit)
# and its log ($OUT/epd.log) must end with the sanitizer's "ERROR SUMMARY: 0 errors".
# Settings: OUT, EPD_MODEL, EPD_CONFIG, EPD_EXPECTED, EPD_READY_TIMEOUT (s, default 300),
# EPD_SERVE_BACKEND=cpu (serve on the cpu backend: checks the stage itself while the cuda
# engine is not there), EPD_CALL_BUDGET (s the whole call may take, default 570: every stage's
# timeout is cut to what is left), <STAGE>_TIMEOUT (BUILD, TESTS, SERVE, HTTPBENCH, BENCH, TORCH,
# SOAK, SANITIZE; seconds).
# Example: scripts/gpu-serve.sh tests serve bench -- --batch 1,8,64,256 --context 1024
#          scripts/gpu-serve.sh serve soak
#          SANITIZE_EPD=1 SOAK_SECONDS=20 scripts/gpu-serve.sh serve sanitize
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
T_START=$SECONDS
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD=$ROOT/build-gpu-serve
BUDGET=${EPD_CALL_BUDGET:-570}

usage() {
    sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
DO_BUILD=1
STAGES=()
PASS=()
while [ $# -gt 0 ]; do
    case $1 in
    --no-build) DO_BUILD=0 ;;
    --) shift; PASS=("$@"); break ;;
    tests | serve | httpbench | bench | dsbench | torch | dsref | soak | sanitize) STAGES+=("$1") ;;
    -h | --help) usage ;;
    *) echo "gpu-serve: unknown stage or option '$1'" >&2; usage ;;
    esac
    shift
done

# the soak's small KV pool applies to the epd of this call when soak runs (or the sanitized soak)
SANITIZE_EPD=${SANITIZE_EPD:-0}
KV_BLOCKS=
for s in "${STAGES[@]}"; do
    if [ "$s" = soak ] || { [ "$s" = sanitize ] && [ "$SANITIZE_EPD" = 1 ]; }; then
        KV_BLOCKS=${SOAK_KV_BLOCKS:-64}
    fi
done
# a sanitized epd takes a while to stop (the leak check): the stages leave it that much time
STOP_RESERVE=0
[ "$SANITIZE_EPD" = 1 ] && STOP_RESERVE=60

SUMMARY=()
note() { SUMMARY+=("$(printf '%-28s %s' "$1" "$2")"); echo "gpu-serve: $1: $2" >&2; }
left() { echo $((BUDGET - (SECONDS - T_START))); }
# stage_timeout DEFAULT: the stage's timeout, cut to the call's budget (minus a margin for the
# summary); prints 0 when too little is left to start it
stage_timeout() {
    local t=$1 l
    l=$(($(left) - 15 - STOP_RESERVE))
    [ "$l" -lt "$t" ] && t=$l
    [ "$t" -lt 10 ] && t=0
    echo "$t"
}
# last line of a log that matches a pattern (for the summary)
grepl() { grep -aE "$1" "$2" 2>/dev/null | tail -1 | cut -c1-160; }

summary() {
    echo
    echo "==== gpu-serve: logs in $OUT; $(head -2 "$OUT/gpus.txt" 2>/dev/null | tail -1)"
    printf '%s\n' "${SUMMARY[@]}"
    printf '%-28s %ss\n' "total" "$((SECONDS - T_START))"
}

EPD_PID=
EPD_SANITIZED=0
# the epd process under compute-sanitizer (its child, or a grandchild): the one to signal
sanitized_epd() {
    local c g
    for c in $(pgrep -P "$EPD_PID" 2>/dev/null); do
        if [ "$(cat "/proc/$c/comm" 2>/dev/null)" = epd ]; then echo "$c"; return; fi
        for g in $(pgrep -P "$c" 2>/dev/null); do
            if [ "$(cat "/proc/$g/comm" 2>/dev/null)" = epd ]; then echo "$g"; return; fi
        done
    done
}
stop_epd() { # stops the epd this script started; notes how it ended
    [ -n "$EPD_PID" ] || return 0
    local target=$EPD_PID wait_s=10 rc
    if [ "$EPD_SANITIZED" = 1 ]; then
        wait_s=${SANITIZE_STOP_WAIT:-180}
        [ "$wait_s" -gt $(($(left) - 5)) ] && wait_s=$(($(left) - 5))
        [ "$wait_s" -lt 10 ] && wait_s=10
        target=$(sanitized_epd)
        [ -n "$target" ] || target=$EPD_PID
    fi
    if kill -0 "$EPD_PID" 2>/dev/null; then
        kill -TERM "$target" 2>/dev/null
        for _ in $(seq 1 $((wait_s * 10))); do kill -0 "$EPD_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$EPD_PID" 2>/dev/null; then
            kill -KILL "$target" "$EPD_PID" 2>/dev/null
            wait "$EPD_PID" 2>/dev/null
            note "epd shutdown" "FAIL (still running $wait_s s after SIGTERM: killed)"
            rc=137
        else
            wait "$EPD_PID"
            rc=$?
            case $rc in
            0) note "epd shutdown" "ok (SIGTERM, exit 0)" ;;
            86) note "epd shutdown" "ok (SIGTERM; the sanitizer's exit code 86: memcheck errors)" ;;
            *) note "epd shutdown" "FAIL (exit $rc)" ;;
            esac
        fi
    else
        wait "$EPD_PID"
        rc=$?
        note "epd" "FAIL (had exited by itself, rc $rc; see epd.log)"
    fi
    if [ "$EPD_SANITIZED" = 1 ]; then
        local s
        s=$(grepl 'ERROR SUMMARY' "$OUT/epd.log")
        if [ "$rc" = 0 ] && grep -aq '^========= ERROR SUMMARY: 0 errors' "$OUT/epd.log"; then
            note "epd memcheck" "PASS ($s)"
        else
            note "epd memcheck" "FAIL (rc $rc, ${s:-no ERROR SUMMARY in epd.log})"
            grep -a -m 10 '^========= ' "$OUT/epd.log"
        fi
    fi
    EPD_PID=
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader >>"$OUT/gpu-mem.txt" 2>&1
    note "GPU memory after epd" "$(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | head -1)"
}
trap 'stop_epd; summary' EXIT
trap 'exit 130' INT TERM

{ nvidia-smi --query-gpu=index,name,memory.total,memory.used,clocks.sm --format=csv
  nvidia-smi topo -m; } >"$OUT/gpus.txt" 2>&1

# ---- environment: the carried libraries, CUDA on PATH
# shellcheck source=scripts/gpu-env.sh
source "$ROOT/scripts/gpu-env.sh"
if [ "$EPD_DEPS_OK" = 1 ]; then note "deps (gpu-env.sh)" "ok ($EPD_DEPS_PREFIX)"
else note "deps (gpu-env.sh)" "FAIL (see above; is .deps carried?)"; fi
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=/usr/local/cuda/bin:$PATH
fi

# ---- build
BUILD_OK=0
if [ $DO_BUILD = 1 ]; then
    t=$(stage_timeout "${BUILD_TIMEOUT:-300}")
    t0=$SECONDS
    if { timeout -k 10 "$t" cmake -S . -B "$BUILD" -G Ninja -DEPD_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
             -DCMAKE_BUILD_TYPE=Release -DEPD_WERROR=OFF &&
         timeout -k 10 "$((t - (SECONDS - t0) > 10 ? t - (SECONDS - t0) : 10))" ninja -C "$BUILD" -j16; } \
            >"$OUT/build.log" 2>&1; then
        BUILD_OK=1
        note build "ok $((SECONDS - t0))s ($(grep -c '^\[' "$OUT/build.log") ninja lines)"
    else
        note build "FAIL $((SECONDS - t0))s (build.log)"
        grep -aE 'error|Error|FAILED' "$OUT/build.log" | head -20
        tail -15 "$OUT/build.log"
    fi
else
    [ -f "$BUILD/build.ninja" ] && BUILD_OK=1
    note build "skipped (--no-build; $BUILD $([ $BUILD_OK = 1 ] && echo present || echo MISSING))"
fi

# ---- stages
stage_tests() {
    local label t log
    for label in gpu model; do
        log=$OUT/ctest-$label.log
        t=$(stage_timeout "${TESTS_TIMEOUT:-300}")
        [ "$t" = 0 ] && { note "ctest -L $label" "SKIP (call budget spent)"; continue; }
        # shellcheck disable=SC2086
        if timeout -k 10 "$t" ctest --test-dir "$BUILD" -L "$label" --output-on-failure --timeout "$t" \
                ${CTEST_ARGS:-} >"$log" 2>&1; then
            note "ctest -L $label" "PASS ($(grepl 'tests passed' "$log"))"
        else
            note "ctest -L $label" "FAIL rc $? ($(grepl 'tests passed|No tests were found' "$log"))"
            grep -aE '^\s*[0-9]+ - |\*\*\*' "$log" | tail -10
        fi
    done
}

MODEL_DIR='' EXPECTED='' PORT='' SERVE_OK=0
prepare_model() {
    if [ -n "${EPD_MODEL:-}" ]; then
        MODEL_DIR=$EPD_MODEL
        EXPECTED=${EPD_EXPECTED:-}
        [ -z "$EXPECTED" ] && [ -f "$MODEL_DIR/expected.json" ] && EXPECTED=$MODEL_DIR/expected.json
    else
        # tests/text/qwen3vocab (tiny, Qwen3's real vocabulary) plus the tokenizer when carried
        local src=$ROOT/tests/text/qwen3vocab f
        MODEL_DIR=/tmp/epd-serve-model
        rm -rf "$MODEL_DIR" && mkdir -p "$MODEL_DIR"
        for f in "$src"/*.json; do [ "${f##*/}" = expected.json ] || cp "$f" "$MODEL_DIR/"; done
        ln -s "$src"/*.safetensors "$MODEL_DIR/"
        if [ -f .deps/qwen3-tokenizer/tokenizer.json ]; then
            cp .deps/qwen3-tokenizer/tokenizer*.json "$MODEL_DIR/"
        fi
        EXPECTED=${EPD_EXPECTED:-$src/expected.json}
    fi
}

write_config() { # writes $OUT/serve.json from the example config (or a minimal one)
    local cfg=${EPD_CONFIG:-$ROOT/config/examples/single-gpu.json}
    [ -f "$cfg" ] || { echo "gpu-serve: $cfg not found: using a minimal one-GPU config" >&2; cfg=; }
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    python3 - "$cfg" "$OUT/serve.json" "$MODEL_DIR" "$PORT" "${EPD_SERVE_BACKEND:-}" "$KV_BLOCKS" <<'PY'
import json, sys
src, dst, model, port, backend, kv_blocks = sys.argv[1:7]
if src:
    with open(src) as f:
        c = json.load(f)
else:
    c = {"node": {"id": 0, "name": "gpu-serve"},
         "compute": {"backend": "cuda", "gpus": [0]},
         "model": {"max_batch_tokens": 256, "max_seq_len": 4096},
         "log": {"level": "info"}}
c.setdefault("model", {})["path"] = model
c.setdefault("http", {})["listen"] = {"host": "127.0.0.1", "port": int(port)}
if kv_blocks and int(kv_blocks) > 0:  # the soak's small KV pool: preemption happens
    c["model"]["kv_blocks"] = int(kv_blocks)
if backend == "cpu":  # the stage's own check while the cuda engine is not there
    comp = c.setdefault("compute", {})
    for k in ("gpus", "transport", "num_sms"):
        comp.pop(k, None)
    comp["backend"] = "cpu"
    comp["ranks_per_node"] = 1
with open(dst, "w") as f:
    json.dump(c, f, indent=2)
PY
}

start_epd() { # starts epd once; 0 when /readyz answered 200
    [ -n "$EPD_PID" ] && return 0
    [ "$SERVE_OK" = 0 ] || return 1
    SERVE_OK=2 # tried
    [ -x "$BUILD/daemon/epd" ] || { note "epd start" "FAIL (no $BUILD/daemon/epd)"; return 1; }
    prepare_model
    write_config || { note "epd start" "FAIL (config)"; return 1; }
    if [ -x "$BUILD/epctl/epctl" ] && ! "$BUILD/epctl/epctl" config check "$OUT/serve.json" >"$OUT/config-check.txt" 2>&1; then
        note "epd config check" "FAIL ($(tail -1 "$OUT/config-check.txt"))"
        cat "$OUT/config-check.txt"
        return 1
    fi
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader >"$OUT/gpu-mem.txt" 2>&1
    local t0=$SECONDS wait_s=${EPD_READY_TIMEOUT:-300} code=0
    if [ "$SANITIZE_EPD" = 1 ]; then
        local cs
        cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        [ -x "$cs" ] || { note "epd start" "FAIL (SANITIZE_EPD=1: no compute-sanitizer)"; return 1; }
        EPD_SANITIZED=1
        # --error-exitcode tells memcheck's findings apart from epd's own exit status
        "$cs" --tool memcheck --leak-check full --error-exitcode 86 \
            "$BUILD/daemon/epd" -c "$OUT/serve.json" >"$OUT/epd.log" 2>&1 &
    else
        "$BUILD/daemon/epd" -c "$OUT/serve.json" >"$OUT/epd.log" 2>&1 &
    fi
    EPD_PID=$!
    local deadline=$((SECONDS + wait_s))
    while [ $SECONDS -lt $deadline ] && [ "$(left)" -gt 20 ]; do
        code=$(python3 - "$PORT" <<'PY'
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2).status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
PY
)
        [ "$code" = 200 ] && break
        kill -0 "$EPD_PID" 2>/dev/null || break
        sleep 0.5
    done
    if [ "$code" != 200 ]; then
        if kill -0 "$EPD_PID" 2>/dev/null; then
            note "epd ready" "FAIL (no /readyz 200 in $((SECONDS - t0))s)"
        else
            wait "$EPD_PID"
            note "epd ready" "FAIL (epd exited, rc $?)"
            EPD_PID=
        fi
        tail -20 "$OUT/epd.log"
        return 1
    fi
    note "epd ready" "ok in $((SECONDS - t0))s (port $PORT, $MODEL_DIR${KV_BLOCKS:+, kv_blocks $KV_BLOCKS}$([ "$EPD_SANITIZED" = 1 ] && echo ', under memcheck'))"
    python3 -c 'import json,sys,urllib.request; print(json.dumps(json.load(urllib.request.urlopen(sys.argv[1])), indent=1))' \
        "http://127.0.0.1:$PORT/v1/status" >"$OUT/status.json" 2>&1
    return 0
}

stage_serve() {
    start_epd || return
    local t log=$OUT/http-check.log
    t=$(stage_timeout "${SERVE_TIMEOUT:-240}")
    [ "$t" = 0 ] && { note "http_check" "SKIP (call budget spent)"; return; }
    if [ -n "$EXPECTED" ] && [ -f "$EXPECTED" ]; then
        if timeout -k 5 "$t" python3 tests/engine/http_check.py "http://127.0.0.1:$PORT" "$EXPECTED" >"$log" 2>&1; then
            note "http_check" "PASS ($(grepl '^http_check:' "$log" | sed 's/^http_check: //'))"
        else
            note "http_check" "FAIL rc $? ($(grepl '^http_check:' "$log" | sed 's/^http_check: //'))"
            head -30 "$log"
        fi
    else
        # no oracle for this checkpoint: one greedy completion must come back
        if timeout -k 5 "$t" python3 - "$PORT" >"$log" 2>&1 <<'PY'
import json, sys, urllib.request
body = json.dumps({"prompt": [1, 2, 3, 4], "max_tokens": 8, "temperature": 0}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/completions", data=body,
                             headers={"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=120))
print(json.dumps(r))
assert len(r["choices"][0]["token_ids"]) >= 1
PY
        then note "smoke completion" "PASS (no expected.json for $MODEL_DIR)"
        else note "smoke completion" "FAIL ($(tail -1 "$log"))"; fi
    fi
    grep -aE '\b(ERROR|FATAL|error)\b' "$OUT/epd.log" | head -5
}

stage_httpbench() {
    start_epd || return
    local t
    t=$(stage_timeout "${HTTPBENCH_TIMEOUT:-300}")
    [ "$t" = 0 ] && { note "http bench" "SKIP (call budget spent)"; return; }
    # shellcheck disable=SC2086
    timeout -k 5 "$t" python3 scripts/bench_http.py --url "http://127.0.0.1:$PORT" \
        ${HTTP_BENCH_ARGS:---clients 4 --requests 3 --prompt-tokens 128 --max-tokens 64} \
        2>&1 | tee "$OUT/http-bench.txt"
    local rc=${PIPESTATUS[0]}
    local j
    j=$(grep -a '^JSON ' "$OUT/http-bench.txt" | tail -1 | cut -c6- | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("%s tok/s, TTFT p50 %s ms, TPOT p50 %s ms, %s errors"
      % (d["output_tok_s"], d["ttft_ms_p50"], d["tpot_ms_p50"], d["errors"]))' 2>/dev/null)
    if [ "$rc" = 0 ]; then note "http bench" "ok ($j)"; else note "http bench" "FAIL rc $rc ${j:+($j)}"; fi
}

stage_bench() {
    local b=$BUILD/model/cuda/model-bench t
    [ -x "$b" ] || { note bench "FAIL (no $b)"; return; }
    t=$(stage_timeout "${BENCH_TIMEOUT:-450}")
    [ "$t" = 0 ] && { note bench "SKIP (call budget spent)"; return; }
    echo "==== $(date -u +%FT%TZ) model-bench ${PASS[*]}" >>"$OUT/bench.txt"
    timeout -k 10 "$t" "$b" "${PASS[@]}" 2>&1 | tee -a "$OUT/bench.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then note bench "ok (bench.txt)"; else note bench "FAIL rc $rc (bench.txt)"; fi
}

stage_dsbench() {
    local b=$BUILD/model/cuda/model-bench t
    [ -x "$b" ] || { note dsbench "FAIL (no $b)"; return; }
    t=$(stage_timeout "${BENCH_TIMEOUT:-450}")
    [ "$t" = 0 ] && { note dsbench "SKIP (call budget spent)"; return; }
    local args=(--model deepseek-v2-lite --batches 1,8,64,256 "${PASS[@]}")
    echo "==== $(date -u +%FT%TZ) model-bench ${args[*]}" >>"$OUT/bench-dsv2lite.txt"
    timeout -k 10 "$t" "$b" "${args[@]}" 2>&1 | tee -a "$OUT/bench-dsv2lite.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then note dsbench "ok (bench-dsv2lite.txt)"; else note dsbench "FAIL rc $rc (bench-dsv2lite.txt)"; fi
}

stage_torch() {
    local t
    t=$(stage_timeout "${TORCH_TIMEOUT:-540}")
    [ "$t" = 0 ] && { note "torch peer" "SKIP (call budget spent)"; return; }
    # the peer bounds itself too: give it the time it has (minus its own exit margin)
    # shellcheck disable=SC2086
    timeout -k 10 "$t" python3 scripts/bench_torch_peer.py --deadline "$((t - 10))" ${TORCH_ARGS:-} 2>&1 |
        tee "$OUT/torch.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 0 ]; then note "torch peer" "ok (torch.txt)"; else note "torch peer" "FAIL rc $rc (torch.txt)"; fi
}

stage_dsref() {
    local t d rc all=0
    t=$(stage_timeout "${DSREF_TIMEOUT:-300}")
    [ "$t" = 0 ] && { note dsref "SKIP (call budget spent)"; return; }
    : >"$OUT/dsref.txt"
    for d in oracle_dsv3 oracle_dsv2; do
        timeout -k 10 "$t" python3 tests/model/make_deepseek_oracle.py --check "tests/model/$d" \
            --tol "${DSREF_TOL:-0.001}" 2>&1 | tee -a "$OUT/dsref.txt"
        rc=${PIPESTATUS[0]}
        [ "$rc" = 0 ] || all=$rc
    done
    if [ "$all" = 0 ]; then note dsref "ok (dsref.txt)"; else note dsref "FAIL rc $all (dsref.txt)"; fi
}

# memory.used of every GPU: "INDEX:MIB ..."
gpu_mem() {
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits 2>/dev/null |
        tr -d ' ' | tr ',\n' ': ' | sed 's/ $//'
}

stage_soak() {
    start_epd || return
    local t secs log=$OUT/soak.txt m0 m1
    t=$(stage_timeout "${SOAK_TIMEOUT:-$((${SOAK_SECONDS:-60} + 240))}")
    [ "$t" = 0 ] && { note soak "SKIP (call budget spent)"; return; }
    # the arrivals stop in time for the drain (requests of up to 120 s) and the pairs' runs
    secs=${SOAK_SECONDS:-60}
    [ "$secs" -gt $((t - 150)) ] && secs=$((t - 150))
    [ "$secs" -lt 5 ] && { note soak "SKIP (${t}s left: too little for a soak)"; return; }
    local rate=${SOAK_RATE:-24} conc=${SOAK_CONCURRENCY:-32} pairs=6
    [ "$EPD_SANITIZED" = 1 ] && rate=${SOAK_RATE:-4} conc=${SOAK_CONCURRENCY:-8} pairs=2
    m0=$(gpu_mem)
    {
        echo "==== $(date -u +%FT%TZ) soak: ${secs}s, kv_blocks ${KV_BLOCKS:-config}$([ "$EPD_SANITIZED" = 1 ] && echo ', epd under memcheck')"
        echo "GPU memory.used before (index MiB): $m0"
    } >"$log"
    # shellcheck disable=SC2086
    timeout -k 10 "$t" python3 tests/engine/soak_http.py --url "http://127.0.0.1:$PORT" \
        --seconds "$secs" --rate "$rate" --concurrency "$conc" --pairs "$pairs" --expect-preemption \
        ${SOAK_ARGS:-} 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    sleep 1
    m1=$(gpu_mem)
    echo "GPU memory.used after (index MiB):  $m1" >>"$log"
    # every GPU back to its figure (within the slack)
    local mem
    mem=$(python3 - "$m0" "$m1" "${SOAK_MEM_SLACK_MIB:-64}" <<'PY'
import sys
a, b, slack = sys.argv[1].split(), sys.argv[2].split(), int(sys.argv[3])
if not a or len(a) != len(b):
    print("FAIL no nvidia-smi figures"); sys.exit()
bad = []
for x, y in zip(a, b):
    i, u0 = x.split(":")
    u1 = y.split(":")[1]
    if abs(int(u1) - int(u0)) > slack:
        bad.append(f"GPU {i} {u0} -> {u1} MiB")
print(("FAIL " + ", ".join(bad)) if bad else "ok " + " ".join(b))
PY
)
    echo "GPU memory check (slack ${SOAK_MEM_SLACK_MIB:-64} MiB): $mem" >>"$log"
    local j
    j=$(grep -a '^JSON ' "$log" | tail -1 | cut -c6- | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("%s requests: %s ok, %s cancelled, %s refused, %s failed; %s steps, %s preemptions, KV after %s"
      % (d["requests"], d["ok"], d["cancelled_streams"] + d["abandoned_plain"],
         d["refused_400_oversize"] + d["refused_429_503"], d["failed"], d["steps"], d["preemptions"],
         d["kv_after"]))' 2>/dev/null)
    if [ "$rc" = 0 ]; then note soak "PASS ($j)"; else note soak "FAIL rc $rc ${j:+($j)}"; fi
    case $mem in
    ok*) note "soak GPU memory" "ok (before $m0, after $m1 MiB)" ;;
    *) note "soak GPU memory" "$mem" ;;
    esac
}

stage_sanitize() {
    local cs t cmd
    if [ "$SANITIZE_EPD" = 1 ]; then
        # epd itself runs under memcheck: a short soak; the verdict comes at its shutdown
        stage_soak
        return
    fi
    cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    [ -x "$cs" ] || { note sanitize "FAIL (no compute-sanitizer)"; return; }
    if [ -n "${SANITIZE_CMD:-}" ]; then
        cmd=$SANITIZE_CMD
    else
        [ -x "$BUILD/model/cuda/model-bench" ] || { note sanitize "FAIL (no SANITIZE_CMD, no model-bench)"; return; }
        cmd=$(printf '%q ' "$BUILD/model/cuda/model-bench" "${PASS[@]}")
    fi
    t=$(stage_timeout "${SANITIZE_TIMEOUT:-400}")
    [ "$t" = 0 ] && { note sanitize "SKIP (call budget spent)"; return; }
    echo "==== compute-sanitizer --tool memcheck $cmd" >"$OUT/sanitize.log"
    # --error-exitcode tells the sanitizer's findings apart from the program's own failure
    timeout -k 10 "$t" "$cs" --tool memcheck --error-exitcode 86 --target-processes all \
        bash -c "$cmd" >>"$OUT/sanitize.log" 2>&1
    local rc=$?
    local s
    s=$(grepl 'ERROR SUMMARY' "$OUT/sanitize.log")
    case $rc in
    0) note sanitize "PASS (${s:-no summary})" ;;
    86) note sanitize "FAIL: memcheck errors (${s}; sanitize.log)"; grep -a -m 10 '^========= ' "$OUT/sanitize.log" ;;
    124 | 137) note sanitize "FAIL: timed out after ${t}s (${s:-no summary})" ;;
    *) note sanitize "FAIL: the command failed, rc $rc (${s:-no summary})"; tail -5 "$OUT/sanitize.log" ;;
    esac
}

[ ${#STAGES[@]} -eq 0 ] && echo "gpu-serve: no stage given: build only" >&2
for s in "${STAGES[@]}"; do
    case $s in
    torch) stage_torch ;;
    dsref) stage_dsref ;;
    *)
        if [ $BUILD_OK = 0 ]; then
            note "$s" "SKIP (no build)"
        else
            t0=$SECONDS
            "stage_$s"
            echo "gpu-serve: stage $s took $((SECONDS - t0))s" >&2
        fi
        ;;
    esac
done
stop_epd
# exit status: 1 when any line of the summary says FAIL
for l in "${SUMMARY[@]}"; do case $l in *FAIL*) exit 1 ;; esac; done
exit 0

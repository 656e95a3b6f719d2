#!/bin/bash
# A node's lifecycle around in-flight requests, through the real daemon and curl (the tiny
# oracle checkpoint with a byte-level tokenizer and Qwen3's chat template
# (fixtures/qwen3_chat_tokenizer_config.json), one rank, one token per step so that a request
# lasts seconds):
# - drain (epctl drain): new completions and chats get 503 "draining", /v1/status and /readyz
#   say draining, a request already running finishes with 200; epctl undrain serves again;
# - metrics: a client that leaves counts as 499 whether it streamed or not, in both
#   epd_requests_total and epd_http_requests_total; chat has its own endpoint label;
# - a stop whose timeouts.shutdown_ms runs out answers what still runs: 503 JSON, or on a stream
#   an error event and data: [DONE].
# Usage: lifecycle_e2e.sh EPD EPCTL NOTIFY_HELPER JSON_CHECK ORACLE_DIR [drain|disconnect|shutdown]
# (a part name runs that part alone)
set -u
EPD=$1 EPCTL=$2 NOTIFY=$3 CHECK=$4 ORACLE=$5 ONLY=${6:-}
HERE=$(cd "$(dirname "$0")" && pwd)
part() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
. "$HERE/../common/e2e.sh"
e2e_workdir lifecycle
fail() { e2e_fail 30 "$@"; }
CURL=(curl -s -m 30)
# 64 prompts of 400 tokens at one token per step: tens of thousands of steps
LONG='{"prompt":[[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24],[24]],"max_tokens":400,"temperature":0'

# start_epd SHUTDOWN_MS
start_epd() { e2e_start_epd readyz lifecycle_config "$1"; }
lifecycle_config() {
    cat >"$WORK/epd.json" <<JSON
{
  "node": {"id": 0, "name": "lifecycle-e2e"},
  "http": {"listen": {"host": "127.0.0.1", "port": $PORT}},
  "compute": {"backend": "cpu", "ranks_per_node": 1},
  "model": {"path": "$WORK/model", "max_batch_tokens": 1, "max_seq_len": 512},
  "timeouts": {"shutdown_ms": $1},
  "log": {"level": "info"}
}
JSON
}

mkdir "$WORK/model"
cp "$ORACLE/config.json" "$WORK/model/"
ln -s "$ORACLE/model.safetensors" "$WORK/model/"
"$CHECK" bytetok 1 >"$WORK/model/tokenizer.json" || fail "bytetok"
cp "$HERE/fixtures/qwen3_chat_tokenizer_config.json" "$WORK/model/tokenizer_config.json"

metric() { e2e_metric "$BASE" "$1"; } # NAME{labels} -> value (0 if absent)

wait_metric() { # NAME{labels} VALUE: until the metric has the value (the response ends just
    # after the engine lets go of the sequence), up to 5 s
    local i
    for ((i = 0; i < 100; i++)); do
        [ "$(metric "$1")" = "$2" ] && return 0
        sleep 0.05
    done
    return 1
}

wait_active() { # until the engine runs a sequence
    local i
    for ((i = 0; i < 200; i++)); do
        [ "$(metric epd_engine_active_sequences)" -gt 0 ] && return 0
        sleep 0.02
    done
    fail "no sequence became active"
}

wait_idle() {
    local i
    for ((i = 0; i < 400; i++)); do
        [ "$(metric epd_engine_active_sequences)" = 0 ] && [ "$(metric epd_engine_queue_depth)" = 0 ] && return 0
        sleep 0.05
    done
    fail "sequences stay active"
}

# post PATH BODY OUTFILE -> http code
post() {
    "${CURL[@]}" -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' -d "$2" "$BASE$1"
}

# ---- drain: new work refused with a reason, in-flight work finishes, undrain reverses it ----
if part drain; then
    start_epd 3000
    # 25,600 one-token steps: seconds in a plain build, up to a minute under ASan on 2 cores
    curl -s -m 300 -o "$WORK/inflight" -w '%{http_code}' -d "$LONG}" "$BASE/v1/completions" >"$WORK/inflight.code" &
    CURL_PID=$!
    wait_active
    "$EPCTL" drain --node "127.0.0.1:$PORT" >"$WORK/out" 2>&1 || fail "epctl drain: $(cat "$WORK/out")"
    "${CURL[@]}" "$BASE/v1/status" >"$WORK/st"
    grep -q '"state":"draining","ready":false' "$WORK/st" || fail "/v1/status while drained: $(head -c 400 "$WORK/st")"
    code=$("${CURL[@]}" -o "$WORK/r" -w '%{http_code}' "$BASE/readyz")
    [ "$code" = 503 ] && grep -q '"ready":false,"reasons":\["node: draining' "$WORK/r" ||
        fail "/readyz while drained: $code $(cat "$WORK/r")"
    code=$(post /v1/completions '{"prompt":[24],"max_tokens":2}' "$WORK/r")
    [ "$code" = 503 ] && grep -q '"code":"draining"' "$WORK/r" || fail "a completion while drained: $code $(cat "$WORK/r")"
    code=$(post /v1/chat/completions '{"messages":[{"role":"user","content":"hi"}]}' "$WORK/r")
    [ "$code" = 503 ] && grep -q '"code":"draining"' "$WORK/r" || fail "a chat while drained: $code $(cat "$WORK/r")"
    kill -0 "$CURL_PID" 2>/dev/null || fail "the long request ended before the checks (make it longer)"
    wait "$CURL_PID"
    [ "$(cat "$WORK/inflight.code")" = 200 ] || fail "the request in flight at the drain: $(cat "$WORK/inflight.code") $(head -c 300 "$WORK/inflight")"
    [ "$(grep -o '"finish_reason":"length"' "$WORK/inflight" | wc -l)" = 64 ] || fail "the request in flight did not finish"
    "$EPCTL" undrain --node "127.0.0.1:$PORT" >"$WORK/out" 2>&1 || fail "epctl undrain: $(cat "$WORK/out")"
    [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$BASE/readyz")" = 200 ] || fail "/readyz after undrain"
    "${CURL[@]}" "$BASE/v1/status" | grep -q '"state":"ready","ready":true' || fail "/v1/status after undrain"
    code=$(post /v1/completions '{"prompt":[24],"max_tokens":2}' "$WORK/r")
    [ "$code" = 200 ] || fail "a completion after undrain: $code $(cat "$WORK/r")"
    echo "drain / undrain: ok"
fi

# ---- a client that leaves: 499, stream or not; each endpoint its own label ----
if part disconnect; then
    [ -n "$EPD_PID" ] || start_epd 3000
    leave() { # BODY: send it on a raw connection, wait until it runs, close
        exec 3<>"/dev/tcp/127.0.0.1/$PORT"
        printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' \
            ${#1} "$1" >&3
        wait_active
        exec 3<&- 3>&-
        wait_idle
    }
    ok200=$(metric 'epd_requests_total{endpoint="/v1/completions",status="200"}')
    http200=$(metric 'epd_http_requests_total{path="/v1/completions",code="200"}')
    leave "$LONG}"
    wait_metric 'epd_requests_total{endpoint="/v1/completions",status="499"}' 1 ||
        fail "a non-stream request whose client left is not counted as 499"
    wait_metric 'epd_http_requests_total{path="/v1/completions",code="499"}' 1 ||
        fail "epd_http_requests_total: a non-stream request whose client left is not 499"
    leave "$LONG,\"stream\":true}"
    wait_metric 'epd_requests_total{endpoint="/v1/completions",status="499"}' 2 ||
        fail "a stream whose client left is not counted as 499"
    wait_metric 'epd_http_requests_total{path="/v1/completions",code="499"}' 2 ||
        fail "epd_http_requests_total: a stream whose client left is not 499"
    [ "$(metric 'epd_requests_total{endpoint="/v1/completions",status="200"}')" = "$ok200" ] ||
        fail "a request whose client left counted as 200"
    [ "$(metric 'epd_http_requests_total{path="/v1/completions",code="200"}')" = "$http200" ] ||
        fail "epd_http_requests_total: a request whose client left counted as 200"
    cmpl_n=$(metric 'epd_request_duration_seconds_count{endpoint="/v1/completions"}')
    post /v1/chat/completions '{"messages":[]}' "$WORK/r" >/dev/null
    [ "$(metric 'epd_requests_total{endpoint="/v1/chat/completions",status="400"}')" = 1 ] ||
        fail "a refused chat request is not counted under /v1/chat/completions"
    code=$(post /v1/chat/completions '{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}' "$WORK/r")
    [ "$code" = 200 ] || fail "a chat: HTTP $code: $(cat "$WORK/r")"
    [ "$(metric 'epd_requests_total{endpoint="/v1/chat/completions",status="200"}')" = 1 ] ||
        fail "a chat request is not counted under /v1/chat/completions"
    [ "$(metric 'epd_request_duration_seconds_count{endpoint="/v1/chat/completions"}')" = 1 ] ||
        fail "a chat's duration is not observed under /v1/chat/completions"
    [ "$(metric 'epd_request_duration_seconds_count{endpoint="/v1/completions"}')" = "$cmpl_n" ] ||
        fail "a chat's duration is observed under /v1/completions"
    kill -TERM "$EPD_PID"
    wait "$EPD_PID" || fail "epd exited with $? on SIGTERM"
    EPD_PID=
    echo "disconnects and labels: ok"
fi

# ---- the shutdown budget runs out: what still runs is answered, not cut ----
if part shutdown; then
    start_epd 300
    "${CURL[@]}" -o "$WORK/js" -w '%{http_code}' -d "$LONG}" "$BASE/v1/completions" >"$WORK/js.code" &
    J_PID=$!
    "${CURL[@]}" -N -o "$WORK/sse" -w '%{http_code}' -d "$LONG,\"stream\":true}" "$BASE/v1/completions" >"$WORK/sse.code" &
    S_PID=$!
    wait_active
    sleep 0.2
    kill -TERM "$EPD_PID"
    wait "$EPD_PID" || fail "epd exited with $? after the shutdown budget"
    EPD_PID=
    wait "$J_PID" "$S_PID"
    grep -q "timeouts.shutdown_ms (300 ms) elapsed" "$WORK/epd.log" || fail "the budget did not run out (make the requests longer)"
    [ "$(cat "$WORK/js.code")" = 503 ] || fail "non-stream at the end of the budget: HTTP $(cat "$WORK/js.code"): $(head -c 300 "$WORK/js")"
    grep -q '"code":"shutdown"' "$WORK/js" && grep -q 'timeouts.shutdown_ms' "$WORK/js" ||
        fail "non-stream at the end of the budget: body $(cat "$WORK/js")"
    [ "$(cat "$WORK/sse.code")" = 200 ] || fail "stream at the end of the budget: HTTP $(cat "$WORK/sse.code")"
    grep -q '^data: {"error":{.*"code":"shutdown"' "$WORK/sse" || fail "the stream has no error event: $(tail -c 400 "$WORK/sse")"
    [ "$(grep -v '^$' "$WORK/sse" | tail -1)" = "data: [DONE]" ] || fail "the stream does not end with data: [DONE]: $(tail -c 300 "$WORK/sse")"
    echo "shutdown budget: ok"
fi
echo "all ok"

#!/bin/bash
# Serving through the real daemon: epd loads the tiny oracle checkpoint with 1, 2 and 4 ranks
# and curl checks /v1/completions against transformers' greedy tokens (expected.json), the SSE
# stream, seeded sampling (same seed -> same tokens, on every rank count), the 4xx errors,
# concurrent requests, a client that leaves mid-stream, /v1/models, /v1/status and /metrics.
# Usage: serving_e2e.sh EPD NOTIFY_HELPER JSON_CHECK ORACLE_DIR [RANKS...]
set -u
EPD=$1 NOTIFY=$2 CHECK=$3 ORACLE=$4
shift 4
ID=$(basename "$ORACLE") # the model id the daemon serves it under
TYPE=$(sed -n 's/.*"model_type": *"\([a-z0-9_]*\)".*/\1/p' "$ORACLE/config.json")
RANKS=("$@")
[ ${#RANKS[@]} -gt 0 ] || RANKS=(1 2 4)
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../common/e2e.sh"
e2e_workdir serving
fail() { e2e_fail 50 "(ranks_per_node $R) $*"; }
CURL=(curl -s -m 20)

# start_epd RANKS MAX_BATCH_TOKENS [MAX_PREFILL_TOKENS]: a daemon on a free port, ready
# (READY via /readyz)
start_epd() { e2e_start_epd readyz serving_config "$@"; }
serving_config() {
    cat >"$WORK/epd.json" <<JSON
{
  "node": {"id": 0, "name": "serving-e2e"},
  "http": {"listen": {"host": "127.0.0.1", "port": $PORT}},
  "compute": {"backend": "cpu", "ranks_per_node": $1},
  "model": {"path": "${MODEL_DIR:-$ORACLE}", "max_batch_tokens": $2, "max_prefill_tokens": ${3:-512}, "max_seq_len": 512},
  "timeouts": {"shutdown_ms": 3000},
  "log": {"level": "info"}
}
JSON
}

stop_epd() {
    kill -TERM "$EPD_PID"
    wait "$EPD_PID"
    local rc=$?
    EPD_PID=
    [ $rc = 0 ] || fail "epd exited with $rc on SIGTERM"
    grep -q "stopped" "$WORK/epd.log" || fail "no clean stop"
}

# post BODY OUTFILE -> http code
post() {
    "${CURL[@]}" -o "$2" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d "$1" "$BASE/v1/completions"
}

metric() { e2e_metric "$BASE" "$1"; } # NAME{labels} -> value (0 if absent)

"$CHECK" cases "$ORACLE/expected.json" >"$WORK/cases" || fail "cannot read expected.json"
NCASES=$(wc -l <"$WORK/cases")
[ "$NCASES" -ge 3 ] || fail "expected.json has $NCASES cases"
NEW=16

for R in "${RANKS[@]}"; do
    # a batch bound below the longest prompt (19 tokens): prompts go through HT prefill steps,
    # except with 2 ranks, where HT is off (max_prefill_tokens 0) and prefill runs in LL chunks
    start_epd "$R" 8 $((R == 2 ? 0 : 512))

    # ---- greedy completions equal transformers' tokens, JSON and SSE ----
    c=0
    while read -r prompt tokens; do
        code=$(post "{\"model\":\"$ID\",\"prompt\":[$prompt],\"max_tokens\":$NEW,\"temperature\":0}" "$WORK/r")
        [ "$code" = 200 ] || fail "case $c: HTTP $code: $(cat "$WORK/r")"
        got=$("$CHECK" completion "$WORK/r") || fail "case $c: bad response shape: $(cat "$WORK/r")"
        [ "$got" = "0 $tokens length" ] || fail "case $c greedy: got '$got', transformers '0 $tokens length'"
        "${CURL[@]}" -N -o "$WORK/s" -d "{\"prompt\":[$prompt],\"max_tokens\":$NEW,\"temperature\":0,\"stream\":true}" \
            -D "$WORK/h" "$BASE/v1/completions" || fail "case $c: stream failed"
        grep -qi '^content-type: text/event-stream' "$WORK/h" || fail "stream content type: $(cat "$WORK/h")"
        got=$("$CHECK" sse "$WORK/s") || fail "case $c: bad stream: $(head -c 600 "$WORK/s")"
        [ "$got" = "0 $tokens length" ] || fail "case $c stream: got '$got', transformers '0 $tokens length'"
        [ "$(grep -c '^data: {' "$WORK/s")" = $((NEW + 1)) ] || fail "case $c: not one chunk per token (+ the finish chunk)"
        c=$((c + 1))
    done <"$WORK/cases"

    # several prompts in one request: one choice each, in order
    prompts=$(awk '{ printf "%s[%s]", (NR > 1 ? "," : ""), $1 }' "$WORK/cases")
    code=$(post "{\"prompt\":[$prompts],\"max_tokens\":$NEW,\"temperature\":0}" "$WORK/r")
    [ "$code" = 200 ] || fail "multi-prompt: HTTP $code: $(cat "$WORK/r")"
    "$CHECK" completion "$WORK/r" >"$WORK/got" || fail "multi-prompt shape"
    awk '{ print NR - 1, $2, "length" }' "$WORK/cases" | diff - "$WORK/got" >&2 || fail "multi-prompt tokens"

    # ---- concurrent requests: each case twice, all at once; batching must not mix them ----
    c=0
    while read -r prompt tokens; do
        for k in 1 2; do
            "${CURL[@]}" -o "$WORK/c$c.$k" -d "{\"prompt\":[$prompt],\"max_tokens\":$NEW,\"temperature\":0,\"stream\":$([ $k = 2 ] && echo true || echo false)}" \
                "$BASE/v1/completions" &
        done
        c=$((c + 1))
    done <"$WORK/cases"
    wait $(jobs -p | grep -v "^$EPD_PID\$")
    c=0
    while read -r prompt tokens; do
        got=$("$CHECK" completion "$WORK/c$c.1") || fail "concurrent $c: $(cat "$WORK/c$c.1")"
        [ "$got" = "0 $tokens length" ] || fail "concurrent case $c: got '$got', transformers '0 $tokens length'"
        got=$("$CHECK" sse "$WORK/c$c.2") || fail "concurrent stream $c"
        [ "$got" = "0 $tokens length" ] || fail "concurrent stream case $c: got '$got'"
        c=$((c + 1))
    done <"$WORK/cases"

    # ---- seeded sampling: reproducible, and the same on every rank count ----
    body='{"prompt":[[24],[303,339,294,53]],"max_tokens":24,"temperature":0.9,"top_p":0.95,"seed":1234}'
    post "$body" "$WORK/s1" >/dev/null
    post "$body" "$WORK/s2" >/dev/null
    a=$("$CHECK" completion "$WORK/s1") || fail "seeded: $(cat "$WORK/s1")"
    b=$("$CHECK" completion "$WORK/s2") || fail "seeded: $(cat "$WORK/s2")"
    [ "$a" = "$b" ] || fail "same seed, different tokens: '$a' vs '$b'"
    post "${body/1234/1235}" "$WORK/s3" >/dev/null
    d=$("$CHECK" completion "$WORK/s3") || fail "seeded 1235"
    [ "$a" != "$d" ] || fail "seeds 1234 and 1235 gave the same 48 tokens"
    greedy=$(head -2 "$WORK/cases" | awk '{ print NR - 1, $2 }')
    [ "$(echo "$a" | cut -d' ' -f1,2)" != "$greedy" ] || fail "temperature 0.9 gave the greedy tokens"
    if [ -z "${SEEDED:-}" ]; then SEEDED=$a; else
        [ "$a" = "$SEEDED" ] || fail "seeded tokens differ from the first rank count: '$a' vs '$SEEDED'"
    fi

    # ---- errors in OpenAI's shape ----
    expect_error() { # CODE BODY MESSAGE-PATTERN
        local code
        code=$(post "$2" "$WORK/e")
        [ "$code" = "$1" ] || fail "'$2': HTTP $code, expected $1: $(cat "$WORK/e")"
        msg=$("$CHECK" error "$WORK/e") || fail "'$2': not an OpenAI error: $(cat "$WORK/e")"
        echo "$msg" | grep -q -- "$3" || fail "'$2': message '$msg' lacks '$3'"
    }
    expect_error 400 '{"prompt":[1,2,384]}' 'prompt\[2\]: token id 384 is outside the vocabulary (0..383)'
    expect_error 400 '{"prompt":[[1],[2,-1]]}' 'prompt\[1\]\[1\]: token id -1 is outside'
    expect_error 400 '{"prompt":[1,2.5]}' 'prompt\[1\] must be an integer'
    expect_error 400 '{"prompt":"hello"}' 'no tokenizer'
    expect_error 400 '{"prompt":[]}' 'empty'
    expect_error 400 '{"max_tokens":3}' "'prompt' is required"
    expect_error 400 '{"prompt":[1],"max_tokens":"8"}' "'max_tokens' must be an integer"
    expect_error 400 '{"prompt":[1],"max_tokens":0}' "'max_tokens' is 0"
    expect_error 400 '{"prompt":[1,2,3],"max_tokens":510}' 'maximum context length is 512 tokens. However, you requested 513 tokens'
    expect_error 400 '{"prompt":[1],"temperature":2.5}' "'temperature' is 2.5"
    expect_error 400 '{"prompt":[1],"temperature":"hot"}' "'temperature' must be a number"
    expect_error 400 '{"prompt":[1],"top_p":0}' "'top_p' is 0"
    expect_error 400 '{"prompt":[1],"top_p":1e-46}' "'top_p' is 1e-46, which is 0 as the 32-bit float"
    expect_error 400 '{"prompt":[1],"max_tokens":1e400}' "'max_tokens' is out of range (beyond a double)"
    expect_error 400 '{"prompt":[1],"stream":1}' "'stream' must be a boolean"
    expect_error 400 '{"prompt":[1],"n":2}' "'n' > 1 is not supported"
    expect_error 400 '{"prompt":[1],"frobnicate":true}' 'Unrecognized request argument supplied: frobnicate'
    expect_error 400 '{"prompt":[1],"stop":["\n"]}' "'stop' sequences"
    expect_error 400 '{"prompt":[1],"stream_options":{"include_usage":true}}' "only allowed when 'stream' is true"
    expect_error 400 '{"prompt":[1], "max_tokens": }' 'not valid JSON (error at byte 29)'
    expect_error 400 '[1,2]' 'must be a JSON object'
    expect_error 400 '{"prompt":[1,2],"prompt":[1]}' "the key 'prompt' more than once (at prompt)"
    expect_error 400 '{"prompt":[1],"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}' \
        "the key 'include_usage' more than once (at stream_options.include_usage)"
    expect_error 400 '{"prompt":[1]} x' 'unexpected data at byte 15'
    expect_error 404 '{"prompt":[1],"model":"gpt-4"}' "The model 'gpt-4' does not exist"

    # ---- a client that leaves mid-stream: its sequence is cancelled, the next request works ----
    before=$(metric epd_generated_tokens_total)
    exec 3<>"/dev/tcp/127.0.0.1/$PORT"
    body='{"prompt":[24],"max_tokens":500,"temperature":0,"stream":true}'
    printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s' \
        ${#body} "$body" >&3
    IFS= read -r -t 10 status <&3 || fail "no response head on the stream"
    case "$status" in "HTTP/1.1 200"*) ;; *) fail "stream status '$status'" ;; esac
    # wait for the first token, then leave
    for ((i = 0; i < 100; i++)); do
        IFS= read -r -t 10 line <&3 || fail "stream ended before a token"
        case "$line" in data:*) break ;; esac
    done
    exec 3<&- 3>&-
    for ((i = 0; i < 100; i++)); do
        [ "$(metric epd_engine_active_sequences)" = 0 ] && break
        sleep 0.05
    done
    [ "$(metric epd_engine_active_sequences)" = 0 ] || fail "the abandoned sequence stays active"
    after=$(metric epd_generated_tokens_total)
    [ $((after - before)) -lt 500 ] || fail "the abandoned stream ran to its end ($((after - before)) tokens)"
    [ "$(metric 'epd_requests_total{endpoint="/v1/completions",status="499"}')" = 1 ] ||
        fail "the abandoned stream is not counted as status 499"
    read -r prompt tokens <"$WORK/cases"
    post "{\"prompt\":[$prompt],\"max_tokens\":$NEW,\"temperature\":0}" "$WORK/r" >/dev/null
    [ "$("$CHECK" completion "$WORK/r")" = "0 $tokens length" ] || fail "request after the abandoned stream"

    # ---- models, status, metrics ----
    "${CURL[@]}" "$BASE/v1/models" >"$WORK/m"
    grep -q "\"object\":\"list\",\"data\":\[{\"id\":\"$ID\",\"object\":\"model\"" "$WORK/m" || fail "/v1/models: $(cat "$WORK/m")"
    "${CURL[@]}" "$BASE/v1/status" >"$WORK/st"
    grep -q "\"type\":\"$TYPE\",\"layers\":3" "$WORK/st" || fail "status lacks the model: $(head -c 800 "$WORK/st")"
    grep -q "\"experts_per_rank\":$((16 / R))" "$WORK/st" || fail "status placement: experts_per_rank"
    [ "$(grep -o '"on_this_node":true' "$WORK/st" | wc -l)" = "$R" ] || fail "status lists not $R ranks"
    for ((r = 0; r < R; r++)); do
        v=$(metric "epd_model_expert_bytes{rank=\"$r\"}")
        # 2 MoE layers x 16/R experts x 3 matrices of 96x128 fp32
        [ "$v" = $((2 * 16 / R * 3 * 96 * 128 * 4)) ] || fail "epd_model_expert_bytes{rank=$r} = $v"
    done
    sum=0
    for ((x = 0; x < 16; x++)); do
        sum=$((sum + $(metric "epd_expert_tokens_total{expert=\"$x\"}")))
    done
    # every forwarded token picks top-4 experts in each of the 2 MoE layers
    [ $sum -gt 0 ] && [ $((sum % 8)) = 0 ] || fail "epd_expert_tokens_total sums to $sum"
    [ "$(metric 'epd_requests_total{endpoint="/v1/completions",status="400"}')" -ge 20 ] || fail "400s not counted"
    [ "$(metric 'epd_requests_total{endpoint="/v1/completions",status="200"}')" -ge 10 ] || fail "200s not counted"
    [ "$(metric epd_generated_tokens_total)" -gt 300 ] || fail "generated tokens not counted"
    [ "$(metric epd_prompt_tokens_total)" -gt 60 ] || fail "prompt tokens not counted"
    [ "$(metric epd_engine_step_duration_seconds_count)" -gt 16 ] || fail "no step histogram"
    [ "$(metric epd_time_to_first_token_seconds_count)" -gt 10 ] || fail "no TTFT histogram"
    [ "$(metric 'epd_request_duration_seconds_count{endpoint="/v1/completions"}')" -gt 10 ] || fail "no request histogram"
    "${CURL[@]}" "$BASE/metrics" | grep -q '^epd_generated_tokens_per_second ' || fail "no tokens/s gauge"
    "${CURL[@]}" "$BASE/metrics" | grep -q '^epd_engine_queue_depth 0' || fail "queue depth gauge"
    # the KV pool: per rank in /v1/status and /metrics, whole again once nothing runs; the load
    # progress at its end; tokens per step in a histogram
    [ "$(grep -o '"kv":{"blocks_total":[0-9]*,"blocks_free":[0-9]*' "$WORK/st" |
        awk -F'[:,]' '$3 == $5 && $3 > 0' | wc -l)" = "$R" ] ||
        fail "status: KV blocks per rank not all free: $(grep -o '"kv":{[^}]*}' "$WORK/st")"
    [ "$(grep -o '"load":{"bytes_done":[0-9]*,"bytes_total":[0-9]*' "$WORK/st" |
        awk -F'[:,]' '$3 == $5 && $3 > 0' | wc -l)" = "$R" ] || fail "status: load progress"
    for ((r = 0; r < R; r++)); do
        total=$(metric "epd_kv_blocks_total{rank=\"$r\"}")
        [ "$total" -gt 0 ] && [ "$(metric "epd_kv_blocks_free{rank=\"$r\"}")" = "$total" ] ||
            fail "epd_kv_blocks_free/total{rank=$r}"
        [ "$(metric "epd_model_workspace_bytes{rank=\"$r\"}")" -gt 0 ] || fail "workspace gauge"
    done
    [ "$(metric epd_step_batch_tokens_count)" -gt 16 ] || fail "no batch-size histogram"
    stop_epd
    echo "ranks_per_node $R: ok"
done

# ---- text with U+0000, kept end to end: the oracle with a byte-level tokenizer in which the
# first greedy id of a case (< 256) is byte 0x00 (and id 0 that byte) ----
R=1
NUL_ID=
while read -r prompt tokens; do
    first=${tokens%%,*}
    if [ "$first" -gt 0 ] && [ "$first" -lt 256 ]; then NUL_PROMPT=$prompt NUL_ID=$first; break; fi
done <"$WORK/cases"
[ -n "$NUL_ID" ] || fail "no case whose first greedy id is a byte"
mkdir "$WORK/nul"
cp "$ORACLE/config.json" "$WORK/nul/"
ln -s "$ORACLE/model.safetensors" "$WORK/nul/"
"$CHECK" bytetok "$NUL_ID" >"$WORK/nul/tokenizer.json" || fail "bytetok"
MODEL_DIR=$WORK/nul start_epd 1 8
nulpost() { # PATH BODY -> the response body (HTTP 200 required)
    local code
    code=$("${CURL[@]}" -o "$WORK/n" -w '%{http_code}' -H 'Content-Type: application/json' -d "$2" "$BASE$1")
    [ "$code" = 200 ] || fail "$1 '$2': HTTP $code: $(cat "$WORK/n")"
    cat "$WORK/n"
}
got=$(nulpost /tokenize '{"prompt":"a\u0000b"}')
echo "$got" | grep -q "\"tokens\":\[97,$NUL_ID,98\],\"count\":3" || fail "/tokenize of a NUL: $got"
got=$(nulpost /detokenize "{\"tokens\":[97,$NUL_ID,98]}")
[ "$got" = '{"prompt":"a\u0000b"}' ] || fail "/detokenize of a NUL: $got"
got=$(nulpost /v1/completions '{"prompt":"a\u0000b","max_tokens":1,"temperature":0}')
echo "$got" | grep -q '"prompt_tokens":3,' || fail "a prompt with a NUL is not 3 tokens: $got"
got=$(nulpost /v1/completions "{\"prompt\":[$NUL_PROMPT],\"max_tokens\":1,\"temperature\":0}")
echo "$got" | grep -q "\"text\":\"\\\\u0000\",\"token_ids\":\[$NUL_ID\]" || fail "a generated NUL: $got"
got=$(nulpost /v1/completions "{\"prompt\":[$NUL_PROMPT],\"max_tokens\":1,\"temperature\":0,\"stream\":true}")
echo "$got" | grep -q "^data: {.*\"text\":\"\\\\u0000\",\"token_ids\":\[$NUL_ID\]" || fail "a streamed NUL: $got"
got=$(nulpost /v1/completions "{\"prompt\":[$NUL_PROMPT],\"max_tokens\":4,\"temperature\":0,\"stop\":[\"\\u0000\"]}")
echo "$got" | grep -q '"text":"","token_ids":\[[0-9]*\],"logprobs":null,"finish_reason":"stop"' ||
    fail "a NUL stop string: $got"
stop_epd
echo "text with U+0000: ok"

# ---- a checkpoint that cannot load: exit 1 before READY, naming the file and tensor ----
R=1
mkdir "$WORK/bad"
cp "$ORACLE/config.json" "$WORK/bad/"
head -c 100000 "$ORACLE/model.safetensors" >"$WORK/bad/model.safetensors"
PORT=$("$NOTIFY" freeport)
cat >"$WORK/bad.json" <<JSON
{"http": {"listen": {"host": "127.0.0.1", "port": $PORT}},
 "compute": {"backend": "cpu", "ranks_per_node": 2}, "model": {"path": "$WORK/bad"}}
JSON
timeout 30 "$EPD" -c "$WORK/bad.json" 2>"$WORK/epd.log"
rc=$?
[ $rc = 1 ] || fail "a truncated checkpoint: exit $rc, expected 1"
grep -q "cannot load the model.*model.safetensors: tensor '.*': data_offsets" "$WORK/epd.log" ||
    fail "the load error does not name the file and tensor"
echo "all ok"

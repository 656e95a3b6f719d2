#!/bin/bash
# End-to-end test of epd: starts it under a real NOTIFY_SOCKET (our listener), waits for
# READY=1, exercises every endpoint and the HTTP limits with curl and raw sockets, reloads
# with SIGHUP, stops with SIGTERM and checks STOPPING=1 and exit status 0.
# Usage: epd_e2e.sh EPD EPCTL NOTIFY_HELPER
set -u
EPD=$1 EPCTL=$2 NOTIFY=$3
. "$(cd "$(dirname "$0")" && pwd)/../common/e2e.sh"
e2e_workdir e2e
fail() { e2e_fail 0 "$@"; }
# wait_for FILE PATTERN SECONDS
wait_for() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
write_config() { # level
    cat >"$WORK/epd.json" <<JSON
{
  "node": {"id": 3, "name": "e2e-node"},
  "http": {"listen": {"host": "127.0.0.1", "port": $PORT},
           "max_header_bytes": 2048, "max_body_bytes": 4096,
           "idle_timeout_ms": 1000, "max_connections": 16},
  "timeouts": {"shutdown_ms": 2000},
  "log": {"level": "$1"}
}
JSON
}

e2e_notify_listen "$NOTIFY" 50

# The test config, checked by epctl first.
checked_config() {
    write_config info
    "$EPCTL" config check "$WORK/epd.json" >/dev/null || fail "epctl config check rejected the test config"
}
e2e_start_epd notify checked_config
grep -q READY=1 "$WORK/notify.out" || fail "epd did not become ready"
grep -q "^STATUS=ready" "$WORK/notify.out" || fail "no STATUS=ready"
CURL=(curl -s -m 5)

# ---- endpoints ----
[ "$("${CURL[@]}" -o "$WORK/b" -w '%{http_code}' "$BASE/healthz")" = 200 ] || fail "healthz code"
[ "$(cat "$WORK/b")" = '{"status":"ok"}' ] || fail "healthz body: $(cat "$WORK/b")"
[ "$("${CURL[@]}" -o "$WORK/b" -w '%{http_code}' "$BASE/readyz")" = 200 ] || fail "readyz code"
[ "$(cat "$WORK/b")" = '{"ready":true}' ] || fail "readyz body: $(cat "$WORK/b")"
[ "$("${CURL[@]}" -o "$WORK/b" -w '%{http_code}' "$BASE/v1/status")" = 200 ] || fail "status code"
grep -q '"name":"e2e-node"' "$WORK/b" || fail "status lacks node name"
grep -q '"state":"ready"' "$WORK/b" || fail "status lacks state ready"
grep -q '"max_body_bytes":4096' "$WORK/b" || fail "status lacks the effective config"
"$EPCTL" status --node "127.0.0.1:$PORT" >"$WORK/st" || fail "epctl status exit $?"
grep -q "^state *ready" "$WORK/st" || fail "epctl status table: $(cat "$WORK/st")"
"$EPCTL" ready --node "127.0.0.1:$PORT" >/dev/null || fail "epctl ready"

# ---- metrics: content type, and every line in the exposition grammar ----
ct=$("${CURL[@]}" -o "$WORK/m" -w '%{content_type}' "$BASE/metrics")
case "$ct" in "text/plain; version=0.0.4"*) ;; *) fail "metrics content type $ct" ;; esac
name='[a-zA-Z_:][a-zA-Z0-9_:]*'
lv='"([^"\\]|\\["\\n])*"'
labels="\{([a-zA-Z_][a-zA-Z0-9_]*=$lv(,[a-zA-Z_][a-zA-Z0-9_]*=$lv)*)?\}"
num='(NaN|[+-]Inf|[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?)'
bad=$(grep -Ev "^(# HELP $name .*|# TYPE $name (counter|gauge|histogram|summary|untyped)|$name($labels)? $num)\$" "$WORK/m")
[ -z "$bad" ] || fail "metrics lines outside the grammar: $bad"
for s in epd_build_info epd_process_start_time_seconds epd_uptime_seconds \
    epd_process_resident_memory_bytes epd_process_virtual_memory_bytes; do
    grep -q "^$s" "$WORK/m" || fail "metric $s missing"
done
grep -q '^epd_http_requests_total{path="/healthz",code="200"} 1$' "$WORK/m" || fail "healthz not counted"
grep -q '^epd_http_request_duration_seconds_bucket{path="/healthz",le="+Inf"} 1$' "$WORK/m" || fail "histogram"
grep -q '^epd_build_info{version="[^"]*",commit="[^"]*",backend="cpu"} 1$' "$WORK/m" || fail "build_info"

# ---- errors ----
code=$("${CURL[@]}" -o "$WORK/b" -w '%{http_code}' "$BASE/no/such/path")
[ "$code" = 404 ] && grep -q '"error":"not found"' "$WORK/b" || fail "404: $code $(cat "$WORK/b")"
code=$("${CURL[@]}" -o /dev/null -D "$WORK/h" -w '%{http_code}' -X POST "$BASE/healthz")
[ "$code" = 405 ] || fail "405: $code"
grep -qi '^Allow: GET, HEAD' "$WORK/h" || fail "405 without Allow"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' -H "X-Big: $(head -c 3000 /dev/zero | tr '\0' a)" "$BASE/healthz")
[ "$code" = 431 ] || fail "oversize header: $code"
head -c 5000 /dev/zero | tr '\0' b >"$WORK/big"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' --data-binary @"$WORK/big" "$BASE/healthz")
[ "$code" = 413 ] || fail "oversize body: $code"

# garbage bytes: 400 and a close, then the daemon still serves
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf '\x00\x01\x02garbage\r\n\r\n' >&3
reply=$(timeout 5 cat <&3)
exec 3<&-
case "$reply" in "HTTP/1.1 400 "*) ;; *) fail "garbage got: $reply" ;; esac

# half-open request: stalls mid-headers; the header deadline (idle_timeout_ms = 1 s) answers
# 408 and closes
start=$(date +%s%N)
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ' >&3
reply=$(timeout 10 cat <&3)
rc=$?
exec 3<&-
[ $rc = 0 ] || fail "half-open connection was not closed by the server"
case "$reply" in "HTTP/1.1 408 "*) ;; *) fail "half-open got: $reply" ;; esac
ms=$((($(date +%s%N) - start) / 1000000))
[ $ms -ge 900 ] || fail "half-open closed too early ($ms ms)"

# an idle keep-alive connection is closed after idle_timeout_ms
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
reply=$(timeout 10 cat <&3); rc=$?
exec 3<&-
[ $rc = 0 ] && [ -z "$reply" ] || fail "idle connection not closed quietly"

[ "$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$BASE/healthz")" = 200 ] || fail "not serving after abuse"
"${CURL[@]}" "$BASE/metrics" >"$WORK/m"
for r in malformed header_too_large body_too_large header_timeout; do
    grep -q "^epd_http_rejected_total{reason=\"$r\"} [1-9]" "$WORK/m" || fail "rejected{$r} not counted"
done

# ---- SIGHUP: log level info -> debug is applied live; an invalid file keeps the old one ----
write_config debug
kill -HUP "$EPD_PID"
wait_for "$WORK/epd.log" "reload: log.level info -> debug" 5 || fail "reload not logged"
"${CURL[@]}" "$BASE/nope" >/dev/null
exec 3<>"/dev/tcp/127.0.0.1/$PORT"; printf 'BAD\r\n\r\n' >&3; timeout 5 cat <&3 >/dev/null; exec 3<&-
wait_for "$WORK/epd.log" "DEBUG http: rejecting request" 5 || fail "debug level not in effect"
echo '{"http": {"max_body_bytes": "lots"}}' >"$WORK/epd.json"
kill -HUP "$EPD_PID"
wait_for "$WORK/epd.log" "keeping the running config" 5 || fail "invalid reload not reported"
grep -q 'http.max_body_bytes' "$WORK/epd.log" || fail "invalid reload does not name the setting"
kill -0 "$EPD_PID" || fail "epd died on an invalid reload"
[ "$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$BASE/healthz")" = 200 ] || fail "not serving after bad reload"

# ---- max_connections (16) all held by idle connections: a 17th still gets /healthz, and
# the oldest idle connection is closed to make room ----
for fd in $(seq 10 25); do eval "exec $fd<>/dev/tcp/127.0.0.1/$PORT"; done
sleep 0.2
exec 9<>"/dev/tcp/127.0.0.1/$PORT"
printf 'GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&9
reply=$(timeout 3 cat <&9); rc=$?
exec 9<&-
[ $rc = 0 ] || fail "healthz on a full server did not complete"
case "$reply" in "HTTP/1.1 200 "*) ;; *) fail "healthz on a full server got: $reply" ;; esac
reply=$(timeout 3 cat <&10); rc=$?
[ $rc = 0 ] && [ -z "$reply" ] || fail "the oldest idle connection was not closed to make room"
for fd in $(seq 10 25); do eval "exec $fd<&-"; done
"${CURL[@]}" "$BASE/metrics" | grep -q '^epd_http_rejected_total{reason="evicted"} [1-9]' ||
    fail "eviction not counted"

# ---- SIGTERM with a request in flight (stalled in its headers): the stop waits for it,
# the header deadline ends it, then STOPPING=1 and exit 0 ----
exec 3<>"/dev/tcp/127.0.0.1/$PORT"
printf 'GET /healthz HTTP/1.1\r\nHost: x\r\n' >&3
sleep 0.2
kill -TERM "$EPD_PID"
wait_for "$WORK/notify.out" STOPPING=1 3 || fail "no STOPPING=1"
reply=$(timeout 5 cat <&3)
exec 3<&-
case "$reply" in "HTTP/1.1 408 "*) ;; *) fail "in-flight request during stop got: $reply" ;; esac
for ((i = 0; i < 50; i++)); do kill -0 "$EPD_PID" 2>/dev/null || break; sleep 0.1; done
wait "$EPD_PID"
rc=$?
EPD_PID=
[ $rc = 0 ] || fail "epd exit status $rc after SIGTERM"
grep -q "all HTTP connections finished" "$WORK/epd.log" || fail "stop did not drain"

# ---- a node with peers is not ready; watchdog pings when WATCHDOG_USEC is set ----
: >"$WORK/notify.out"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/secret"
chmod 600 "$WORK/secret"
PORT=$("$NOTIFY" freeport)
cat >"$WORK/peers.json" <<JSON
{
  "node": {"id": 1, "name": "e2e-peer"},
  "cluster": {"peers": [{"id": 2, "host": "127.0.0.1", "port": 1}],
              "secret_file": "$WORK/secret"},
  "http": {"listen": {"host": "127.0.0.1", "port": $PORT}}
}
JSON
"$EPCTL" config check "$WORK/peers.json" >/dev/null || fail "peers config rejected: $("$EPCTL" config check "$WORK/peers.json" 2>&1)"
WATCHDOG_USEC=400000 NOTIFY_SOCKET="$WORK/notify.sock" "$EPD" -c "$WORK/peers.json" 2>"$WORK/epd.log" &
EPD_PID=$!
wait_for "$WORK/notify.out" READY=1 10 || fail "peer node not started"
BASE="http://127.0.0.1:$PORT"
code=$("${CURL[@]}" -o "$WORK/b" -w '%{http_code}' "$BASE/readyz")
[ "$code" = 503 ] || fail "readyz with peers: $code"
grep -q '"ready":false' "$WORK/b" && grep -q 'cluster: waiting for peers' "$WORK/b" ||
    fail "readyz reasons: $(cat "$WORK/b")"
"$EPCTL" status --node "127.0.0.1:$PORT" >"$WORK/st"
[ $? = 3 ] || fail "epctl status on a not-ready node should exit 3"
grep -q "^cluster *no *waiting for peers" "$WORK/st" || fail "epctl status table: $(cat "$WORK/st")"
"$EPCTL" ready --node "127.0.0.1:$PORT" >/dev/null
[ $? = 3 ] || fail "epctl ready on a not-ready node should exit 3"
wait_for "$WORK/notify.out" WATCHDOG=1 3 || fail "no WATCHDOG=1 with WATCHDOG_USEC set"
kill -TERM "$EPD_PID"
wait "$EPD_PID"
rc=$?
EPD_PID=
[ $rc = 0 ] || fail "peer node exit status $rc"
"$EPCTL" status --node "127.0.0.1:$PORT" --timeout 2000 >/dev/null 2>&1
[ $? = 1 ] || fail "epctl status on a stopped node should exit 1"
echo "epd e2e: all checks passed"

#!/bin/bash
# HTTP access end to end (issue 16 item 8): a browser cross-origin POST to /v1/admin/* is
# refused (CSRF); with http.admin_token_file the admin endpoints need the token (epctl
# --token-file) and with http.api_key_file the API needs the key, while /healthz, /readyz and
# /metrics stay open; a non-loopback listener without a token refuses the admin endpoints and
# without an API key logs a warning; `down` ends the daemon with exit status 0.
# Usage: epd_http_auth.sh EPD EPCTL NOTIFY_HELPER
set -u
EPD=$1 EPCTL=$2 NOTIFY=$3
. "$(cd "$(dirname "$0")" && pwd)/../common/e2e.sh"
e2e_workdir auth
fail() { e2e_fail 0 "$@"; }
CURL=(curl -s -m 5)

e2e_notify_listen "$NOTIFY" 50

# start HOST EXTRA_HTTP_JSON: epd on a free port; sets PORT, BASE, EPD_PID
start() {
    e2e_start_epd notify auth_config "$@"
    grep -q READY=1 "$WORK/notify.out" || fail "epd did not become ready"
}
auth_config() {
    cat >"$WORK/epd.json" <<JSON
{"node": {"id": 1, "name": "auth-node"},
 "http": {"listen": {"host": "$1", "port": $PORT}$2},
 "timeouts": {"shutdown_ms": 2000}}
JSON
    "$EPCTL" config check "$WORK/epd.json" >/dev/null || fail "config rejected: $("$EPCTL" config check "$WORK/epd.json" 2>&1)"
}
stop() {
    kill -TERM "$EPD_PID"; wait "$EPD_PID"; EPD_PID=
}
code() { "${CURL[@]}" -o "$WORK/b" -D "$WORK/h" -w '%{http_code}' "$@"; }

# ---- loopback, no token: tools may drain; a page of another origin may not ----
start 127.0.0.1 ""
c=$(code -X POST -H 'Origin: http://evil.example' -H 'Content-Type: text/plain' -d x "$BASE/v1/admin/down")
[ "$c" = 403 ] || fail "cross-origin down: $c $(cat "$WORK/b")"
grep -q 'cross-origin' "$WORK/b" || fail "cross-origin 403 body: $(cat "$WORK/b")"
c=$(code -X POST -H 'Sec-Fetch-Site: cross-site' "$BASE/v1/admin/drain")
[ "$c" = 403 ] || fail "Sec-Fetch-Site cross-site drain: $c"
kill -0 "$EPD_PID" || fail "a cross-origin POST stopped the daemon"
c=$(code -X POST -H "Origin: http://127.0.0.1:$PORT" "$BASE/v1/admin/drain")
[ "$c" = 200 ] || fail "same-origin drain: $c $(cat "$WORK/b")"
[ "$(code "$BASE/v1/status")" = 200 ] || fail "status without a key configured"
stop

# ---- owner-only token files: a readable one is refused by the check ----
printf 'admin-%s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$WORK/admin"
printf 'key-%s\n' "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$WORK/key"
chmod 644 "$WORK/admin"
echo "{\"http\": {\"admin_token_file\": \"$WORK/admin\"}}" >"$WORK/bad.json"
"$EPCTL" config check "$WORK/bad.json" >"$WORK/o" 2>&1 && fail "a 0644 admin token file passed the check"
grep -q 'http.admin_token_file' "$WORK/o" || fail "check does not name the setting: $(cat "$WORK/o")"
chmod 600 "$WORK/admin" "$WORK/key"

# ---- token and key configured ----
start 127.0.0.1 ", \"admin_token_file\": \"$WORK/admin\", \"api_key_file\": \"$WORK/key\""
for p in /healthz /readyz /metrics; do
    [ "$(code "$BASE$p")" = 200 ] || fail "$p is not open with an API key set"
done
c=$(code "$BASE/v1/status")
[ "$c" = 401 ] || fail "status without the key: $c"
grep -qi '^WWW-Authenticate: Bearer' "$WORK/h" || fail "401 without WWW-Authenticate"
[ "$(code -H 'Authorization: Bearer not-the-key-0123456789' "$BASE/v1/status")" = 401 ] || fail "wrong key accepted"
[ "$(code -H "Authorization: Bearer $(cat "$WORK/key")" "$BASE/v1/status")" = 200 ] || fail "key refused"
c=$(code -X POST "$BASE/v1/admin/drain")
[ "$c" = 401 ] || fail "drain without the token: $c"
[ "$(code -X POST -H "Authorization: Bearer $(cat "$WORK/key")" "$BASE/v1/admin/drain")" = 401 ] ||
    fail "the API key opened an admin endpoint"
"$EPCTL" status --node "127.0.0.1:$PORT" >/dev/null 2>&1 && fail "epctl status without the key succeeded"
"$EPCTL" status --node "127.0.0.1:$PORT" --token-file "$WORK/key" >"$WORK/st" || fail "epctl status --token-file (API key): $?"
grep -q '^name *auth-node' "$WORK/st" || fail "epctl status table: $(cat "$WORK/st")"
EPD_TOKEN_FILE="$WORK/admin" "$EPCTL" status --node "127.0.0.1:$PORT" >/dev/null || fail "epctl status with the admin token"
"$EPCTL" drain --node "127.0.0.1:$PORT" >/dev/null 2>"$WORK/o" && fail "epctl drain without a token succeeded"
grep -q 'token' "$WORK/o" || fail "epctl drain refusal does not say why: $(cat "$WORK/o")"
"$EPCTL" drain --node "127.0.0.1:$PORT" --token-file "$WORK/admin" >/dev/null || fail "epctl drain --token-file"
EPD_TOKEN_FILE="$WORK/admin" "$EPCTL" down --node "127.0.0.1:$PORT" >/dev/null || fail "epctl down with the token"
for ((i = 0; i < 50; i++)); do kill -0 "$EPD_PID" 2>/dev/null || break; sleep 0.1; done
wait "$EPD_PID"; rc=$?; EPD_PID=
[ $rc = 0 ] || fail "exit status after down: $rc (documented: 0)"

# ---- a non-loopback listener: a warning without an API key; admin refused without a token ----
start 0.0.0.0 ""
grep -q 'not loopback and no http.api_key_file' "$WORK/epd.log" || fail "no warning for an open non-loopback API"
c=$(code -X POST "$BASE/v1/admin/down")
[ "$c" = 403 ] || fail "admin on a non-loopback listener without a token: $c"
grep -q 'http.admin_token_file' "$WORK/b" || fail "403 does not say how to configure: $(cat "$WORK/b")"
stop
echo "epd http auth: all checks passed"

# Sourced by the end-to-end shell tests (tests/daemon, tests/engine, tests/text, tests/cluster)
# and scripts/soak-cluster.sh: a work folder cleaned up on exit with every daemon it started, the
# systemd notify listener, epd on a free port, and a cluster's ports, secret and peer lists.
# The caller sets `set -u` and defines fail() (e2e_fail is a default it may use); the variables
# named here are the test's: WORK, EPD_PID, LISTEN_PID, PID[], PORT, BASE, HTTP[], CTL[].

# e2e_workdir NAME: WORK=/tmp/epd-NAME.XXXXXX and the EXIT trap (e2e_cleanup). With
# E2E_KEEP_WORK set the folder stays (for a soak's logs).
e2e_workdir() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/epd-$1.XXXXXX") || exit 1
    EPD_PID= LISTEN_PID=
    trap e2e_cleanup EXIT
}

# Kills what the test started (EPD_PID, every PID[], the notify listener), then removes WORK.
e2e_cleanup() {
    local p
    [ -n "${EPD_PID:-}" ] && kill -9 "$EPD_PID" 2>/dev/null
    for p in "${PID[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null; done
    [ -n "${LISTEN_PID:-}" ] && kill "$LISTEN_PID" 2>/dev/null
    wait 2>/dev/null
    [ -n "${E2E_KEEP_WORK:-}" ] || rm -rf "$WORK"
}

# e2e_fail LINES MESSAGE...: prints FAIL, the last LINES of $WORK/epd.log (all with LINES 0)
# and $WORK/notify.out where there is one, and exits 1.
e2e_fail() {
    local lines=$1
    shift
    echo "FAIL: $*" >&2
    echo "--- epd log ---" >&2
    if [ "$lines" = 0 ]; then cat "$WORK/epd.log" >&2 2>/dev/null; else tail -n "$lines" "$WORK/epd.log" >&2 2>/dev/null; fi
    if [ -s "$WORK/notify.out" ]; then
        echo "--- notify ---" >&2
        cat "$WORK/notify.out" >&2
    fi
    exit 1
}

# e2e_fail_nodes N LINES MESSAGE...: prints FAIL and the last LINES of each node's log
# ($WORK/n<i>.log, i < N), and exits 1.
e2e_fail_nodes() {
    local n=$1 lines=$2 i
    shift 2
    echo "FAIL: $*" >&2
    for ((i = 0; i < n; i++)); do
        echo "--- node $i log (last $lines lines) ---" >&2
        tail -n "$lines" "$WORK/n$i.log" >&2 2>/dev/null
    done
    exit 1
}

# e2e_notify_listen NOTIFY_HELPER SECONDS: a systemd notify socket at $WORK/notify.sock whose
# messages go to $WORK/notify.out (LISTEN_PID).
e2e_notify_listen() {
    local i
    "$1" listen "$WORK/notify.sock" "$2" >"$WORK/notify.out" &
    LISTEN_PID=$!
    for ((i = 0; i < 50; i++)); do
        [ -S "$WORK/notify.sock" ] && return 0
        sleep 0.1
    done
    fail "notify listener did not bind"
}

# e2e_ready HOW: epd at $PORT is ready: HOW readyz (GET /readyz answers 200) or notify (READY=1
# in $WORK/notify.out).
e2e_ready() {
    if [ "$1" = notify ]; then
        grep -q READY=1 "$WORK/notify.out"
    else
        [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz")" = 200 ]
    fi
}

# e2e_start_epd HOW WRITE_CONFIG [ARGS...]: epd on a free port ("$NOTIFY" freeport), up to 5
# ports (another process may take one before epd binds it). `WRITE_CONFIG ARGS...` writes
# $WORK/epd.json for $PORT; epd logs to $WORK/epd.log (under NOTIFY_SOCKET=$WORK/notify.sock with
# HOW notify) and is waited for E2E_READY_STEPS x 50 ms (default 200) until ready (e2e_ready
# HOW). Sets EPD_PID, PORT and BASE; a daemon that exits fails the test, one still starting when
# the wait ends is returned (the test's next request says what is wrong).
e2e_start_epd() {
    local how=$1 attempt i
    shift
    for attempt in 1 2 3 4 5; do
        PORT=$("$NOTIFY" freeport)
        "$@"
        if [ "$how" = notify ]; then
            : >"$WORK/notify.out"
            NOTIFY_SOCKET="$WORK/notify.sock" "$EPD" -c "$WORK/epd.json" 2>"$WORK/epd.log" &
        else
            "$EPD" -c "$WORK/epd.json" 2>"$WORK/epd.log" &
        fi
        EPD_PID=$!
        for ((i = 0; i < ${E2E_READY_STEPS:-200}; i++)); do
            e2e_ready "$how" && break
            kill -0 "$EPD_PID" 2>/dev/null || break
            sleep 0.05
        done
        if kill -0 "$EPD_PID" 2>/dev/null; then
            BASE="http://127.0.0.1:$PORT"
            return 0
        fi
        wait "$EPD_PID"
        EPD_PID=
        grep -q "address already in use" "$WORK/epd.log" || fail "epd did not start"
    done
    fail "no free port after 5 attempts"
}

# e2e_metric BASE NAME{labels}: the value of a /metrics line (0 if absent).
e2e_metric() {
    "${CURL[@]}" "$1/metrics" | awk -v n="$2" '$1 == n { v = $2 } END { print v + 0 }'
}

# ---- clusters -----------------------------------------------------------------------------

# e2e_cluster_ports UTIL N: HTTP[i] and CTL[i], free loopback ports for N nodes
# (cluster_testutil freeports).
e2e_cluster_ports() {
    local i
    mapfile -t PORTS < <("$1" freeports $((2 * $2)))
    [ "${#PORTS[@]}" = $((2 * $2)) ] || fail "no free ports"
    for ((i = 0; i < $2; i++)); do
        HTTP[i]=${PORTS[2 * i]}
        CTL[i]=${PORTS[2 * i + 1]}
    done
}

# e2e_secret FILE: a fresh cluster secret, readable by its owner only.
e2e_secret() {
    head -c 32 /dev/urandom | base64 >"$1"
    chmod 600 "$1"
}

# e2e_peers NODE N: the "peers" JSON list of NODE: every other node's control port.
e2e_peers() {
    local j peers=""
    for ((j = 0; j < $2; j++)); do
        [ "$j" = "$1" ] && continue
        peers+="${peers:+,}{\"id\": $j, \"host\": \"127.0.0.1\", \"port\": ${CTL[j]}}"
    done
    echo "$peers"
}

# e2e_cluster_json N [NAME]: epctl's cluster file (every node's HTTP address) on stdout.
e2e_cluster_json() {
    local i
    echo "{${2:+\"name\": \"$2\", }\"nodes\": ["
    for ((i = 0; i < $1; i++)); do
        echo "  {\"id\": $i, \"http\": \"127.0.0.1:${HTTP[i]}\"}$([ "$i" -lt $(($1 - 1)) ] && echo ,)"
    done
    echo ']}'
}

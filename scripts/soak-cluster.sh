#!/bin/bash
# Soak test of the control plane (not run in CI): three epd daemons on loopback exchange
# heartbeats for DURATION seconds (default 600) under valgrind or AddressSanitizer, while node 2
# is killed and restarted every CHURN seconds (links torn down and rebuilt, epochs bumped) and
# /v1/cluster and /metrics are polled. Nodes 0 and 1 live through the whole run and are checked:
#   - RSS flat: after a warm-up, RSS grows by at most RSS_SLACK_KB (default 2048);
#   - no leak: valgrind's "definitely/indirectly lost" are 0, or LeakSanitizer reports nothing;
#   - both stop cleanly (exit 0) on SIGTERM.
# Usage: scripts/soak-cluster.sh [--mode valgrind|asan] [--duration S] [--churn S] [--build DIR]
#   valgrind (default) runs BUILD/daemon/epd (default build dir: build) under memcheck;
#   asan configures and builds build-asan with -DEPD_SANITIZE=ON unless --build is given.
set -u
MODE=valgrind DURATION=600 CHURN=60 BUILD= RSS_SLACK_KB=${RSS_SLACK_KB:-2048}
while [ $# -gt 0 ]; do
    case $1 in
    --mode) MODE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --churn) CHURN=$2; shift 2 ;;
    --build) BUILD=$2; shift 2 ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "soak-cluster: unknown argument $1" >&2; exit 2 ;;
    esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
case $MODE in
valgrind)
    BUILD=${BUILD:-$ROOT/build}
    command -v valgrind >/dev/null || { echo "soak-cluster: valgrind not installed" >&2; exit 2; }
    ;;
asan)
    if [ -z "$BUILD" ]; then
        BUILD=$ROOT/build-asan
        cmake -S "$ROOT" -B "$BUILD" -G Ninja -DEPD_SANITIZE=ON -DEPD_CUDA=OFF >/dev/null &&
            ninja -C "$BUILD" -j2 epd epctl cluster_testutil >/dev/null ||
            { echo "soak-cluster: ASan build failed" >&2; exit 1; }
    fi
    ;;
*) echo "soak-cluster: --mode is valgrind or asan" >&2; exit 2 ;;
esac
EPD=$BUILD/daemon/epd EPCTL=$BUILD/epctl/epctl UTIL=$BUILD/tests/cluster/cluster_testutil
for f in "$EPD" "$EPCTL" "$UTIL"; do
    [ -x "$f" ] || { echo "soak-cluster: $f missing (build first)" >&2; exit 2; }
done

N=3
. "$ROOT/tests/common/e2e.sh"
fail() { echo "soak-cluster: $*" >&2; exit 1; }
declare -a PID HTTP CTL
E2E_KEEP_WORK=1 # the logs stay for the report
e2e_workdir soak
e2e_cluster_ports "$UTIL" $N
e2e_secret "$WORK/secret"
e2e_cluster_json $N >"$WORK/cluster.json"

start_node() {
    local i=$1 peers
    peers=$(e2e_peers "$i" $N)
    cat >"$WORK/n$i.json" <<JSON
{
  "node": {"id": $i, "name": "soak$i"},
  "cluster": {"name": "soak", "listen": {"host": "127.0.0.1", "port": ${CTL[i]}},
              "peers": [$peers], "secret_file": "$WORK/secret"},
  "http": {"listen": {"host": "127.0.0.1", "port": ${HTTP[i]}}},
  "timeouts": {"connect_ms": 1000, "heartbeat_interval_ms": 50, "heartbeat_timeout_ms": 1000,
               "shutdown_ms": 2000},
  "log": {"level": "warn"}
}
JSON
    if [ "$MODE" = valgrind ]; then
        # A small free-list: valgrind's default 20 MB quarantine of freed blocks would read as
        # RSS growth for the first minutes.
        valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=99 \
            --freelist-vol=1000000 \
            --log-file="$WORK/vg$i.%p.log" "$EPD" -c "$WORK/n$i.json" 2>>"$WORK/n$i.log" &
    else
        # Same for ASan's quarantine (256 MB by default).
        ASAN_OPTIONS=detect_leaks=1:exitcode=99:quarantine_size_mb=4 "$EPD" -c "$WORK/n$i.json" 2>>"$WORK/n$i.log" &
    fi
    PID[i]=$!
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null; }

for ((i = 0; i < N; i++)); do start_node "$i"; done
"$EPCTL" up "$WORK/cluster.json" --deadline 120 --timeout 5000 >/dev/null ||
    { echo "soak-cluster: cluster did not form; logs in $WORK" >&2; exit 1; }
echo "soak-cluster: formed; running ${DURATION}s in $MODE mode (churn every ${CHURN}s), work dir $WORK"

T0=$(date +%s)
# RSS is compared from the end of a warm-up (a fifth of the run, 10..120 s: allocator arenas
# and caches settle) to the end.
WARM=$((DURATION / 5))
[ $WARM -lt 10 ] && WARM=10
[ $WARM -gt 120 ] && WARM=120
declare -a BASE PEAK
next_churn=$((T0 + CHURN))
while :; do
    now=$(date +%s)
    [ $((now - T0)) -ge "$DURATION" ] && break
    for i in 0 1; do
        kill -0 "${PID[i]}" 2>/dev/null || { echo "soak-cluster: node $i died; see $WORK" >&2; exit 1; }
        curl -s -m 5 -o /dev/null "http://127.0.0.1:${HTTP[i]}/v1/cluster"
        curl -s -m 5 -o /dev/null "http://127.0.0.1:${HTTP[i]}/metrics"
        r=$(rss_kb "${PID[i]}")
        if [ $((now - T0)) -ge "$WARM" ]; then
            [ -z "${BASE[i]:-}" ] && BASE[i]=$r
            [ "$r" -gt "${PEAK[i]:-0}" ] && PEAK[i]=$r
        fi
    done
    if [ "$now" -ge "$next_churn" ]; then
        kill -9 "${PID[2]}" 2>/dev/null
        wait "${PID[2]}" 2>/dev/null
        start_node 2
        next_churn=$((now + CHURN))
    fi
    sleep 5
done
"$EPCTL" up "$WORK/cluster.json" --deadline 60 --timeout 5000 >/dev/null ||
    { echo "soak-cluster: cluster not formed at the end; see $WORK" >&2; exit 1; }

rc=0
for i in 0 1; do
    growth=$((${PEAK[i]:-0} - ${BASE[i]:-0}))
    echo "node $i: RSS after warm-up ${BASE[i]:-?} kB, peak ${PEAK[i]:-?} kB (growth $growth kB)"
    if [ "$growth" -gt "$RSS_SLACK_KB" ]; then
        echo "soak-cluster: node $i RSS grew by $growth kB (> $RSS_SLACK_KB kB)" >&2
        rc=1
    fi
done
for i in 0 1 2; do kill -TERM "${PID[i]}" 2>/dev/null; done
for i in 0 1; do
    wait "${PID[i]}"
    st=$?
    PID[i]=
    if [ $st != 0 ]; then
        echo "soak-cluster: node $i exited $st (99: leak or memory error)" >&2
        rc=1
    fi
done
wait "${PID[2]}" 2>/dev/null
PID[2]=
if [ "$MODE" = valgrind ]; then
    for f in "$WORK"/vg0.*.log "$WORK"/vg1.*.log; do
        grep -E "definitely lost|indirectly lost|ERROR SUMMARY" "$f" | sed "s|^|$(basename "$f"): |"
        grep -q "ERROR SUMMARY: 0 errors" "$f" || rc=1
    done
fi
[ $rc = 0 ] && echo "soak-cluster: PASS" && rm -rf "$WORK"
[ $rc != 0 ] && echo "soak-cluster: FAIL (logs in $WORK)" >&2
exit $rc

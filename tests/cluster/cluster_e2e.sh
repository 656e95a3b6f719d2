#!/bin/bash
# Integration test of the control plane with real epd processes on loopback ports:
#  - 4 daemons form a cluster (`epctl up` exits 0; /v1/cluster: one epoch, 8 ranks by node id);
#  - kill -9 of one is detected by every other node within 2 x heartbeat_timeout_ms + slack
#    (/readyz 503 naming the node, epd_cluster_peer_state{peer} = 3 (down));
#  - restarted, it rejoins and the cluster forms again at a newer epoch;
#  - a node with the wrong secret is refused and counted (epd_ctl_rejected_frames_total);
#  - a node whose cluster-wide settings differ is refused, naming the setting;
#  - `epctl up` exits non-zero naming the node that is missing;
#  - drain makes a node not ready; `epctl down` stops a node and its peers see it leave at once.
# Usage: cluster_e2e.sh EPD EPCTL CLUSTER_TESTUTIL
set -u
EPD=$1 EPCTL=$2 UTIL=$3
N=4
HB=100 TO=500
. "$(cd "$(dirname "$0")" && pwd)/../common/e2e.sh"
declare -a PID HTTP CTL
e2e_workdir cluster-e2e
fail() { e2e_fail_nodes $N 30 "$@"; }
CURL=(curl -s -m 3)

e2e_cluster_ports "$UTIL" $N
e2e_secret "$WORK/secret"
e2e_secret "$WORK/wrong-secret"

write_config() { # node secret_file [max_batch_tokens]
    local i=$1 peers
    peers=$(e2e_peers "$i" $N)
    cat >"$WORK/n$i.json" <<JSON
{
  "node": {"id": $i, "name": "n$i"},
  "cluster": {"name": "e2e", "listen": {"host": "127.0.0.1", "port": ${CTL[i]}},
              "peers": [$peers], "secret_file": "$2"},
  "http": {"listen": {"host": "127.0.0.1", "port": ${HTTP[i]}}},
  "compute": {"ranks_per_node": 2},
  "model": {"max_batch_tokens": ${3:-128}},
  "timeouts": {"connect_ms": 500, "heartbeat_interval_ms": $HB, "heartbeat_timeout_ms": $TO,
               "shutdown_ms": 1000},
  "log": {"level": "info"}
}
JSON
}

start_node() { # node [secret_file [max_batch_tokens]]
    write_config "$1" "${2:-$WORK/secret}" "${3:-}"
    "$EPD" -c "$WORK/n$1.json" 2>>"$WORK/n$1.log" &
    PID[$1]=$!
}

e2e_cluster_json $N e2e >"$WORK/cluster.json"

now_ms() { date +%s%3N; }

# wait_ready_reason NODE PATTERN DEADLINE_MS: /readyz answers 503 with PATTERN in its body
wait_readyz() {
    local node=$1 pat=$2 until=$(($(now_ms) + $3)) code
    while [ "$(now_ms)" -lt "$until" ]; do
        code=$("${CURL[@]}" -o "$WORK/rz$node" -w '%{http_code}' "http://127.0.0.1:${HTTP[node]}/readyz")
        if [ "$code" = 503 ] && grep -q -- "$pat" "$WORK/rz$node"; then return 0; fi
        sleep 0.05
    done
    echo "node $node /readyz: $code $(cat "$WORK/rz$node" 2>/dev/null)" >&2
    return 1
}

cluster_doc() { # node -> $WORK/c$node.json
    "${CURL[@]}" -o "$WORK/c$1.json" "http://127.0.0.1:${HTTP[$1]}/v1/cluster" ||
        fail "GET /v1/cluster on node $1"
}

metric() { # node name_with_labels -> value
    "${CURL[@]}" "http://127.0.0.1:${HTTP[$1]}/metrics" | awk -v m="$2" '$1 == m {print $2}'
}

# ---- formation ----
for ((i = N - 1; i >= 0; i--)); do start_node "$i"; done
"$EPCTL" up "$WORK/cluster.json" --deadline 20 --interval 100 >"$WORK/up1.out" 2>&1 ||
    { cat "$WORK/up1.out" >&2; fail "epctl up did not see the cluster form"; }
grep -q "cluster up: 4 node(s) ready" "$WORK/up1.out" || fail "epctl up output: $(cat "$WORK/up1.out")"
grep -q "node 3 (127.0.0.1:${HTTP[3]}): reachable yes, joined yes, rank 6-7, ready yes" "$WORK/up1.out" ||
    fail "epctl up progress lines: $(cat "$WORK/up1.out")"
for ((i = 0; i < N; i++)); do
    cluster_doc "$i"
    [ "$("$UTIL" jget "$WORK/c$i.json" formed)" = true ] || fail "node $i not formed"
    [ "$("$UTIL" jget "$WORK/c$i.json" rank_table.nranks)" = 8 ] || fail "node $i: nranks"
    [ "$("$UTIL" jget "$WORK/c$i.json" first_rank)" = $((2 * i)) ] || fail "node $i: first_rank"
    [ "$("$UTIL" jget "$WORK/c$i.json" rank_table.coordinator)" = 0 ] || fail "node $i: coordinator"
done
E1=$("$UTIL" jget "$WORK/c0.json" epoch)
for ((i = 1; i < N; i++)); do
    [ "$("$UTIL" jget "$WORK/c$i.json" epoch)" = "$E1" ] || fail "node $i at another epoch than node 0 ($E1)"
done
"$EPCTL" status --node "127.0.0.1:${HTTP[1]}" >"$WORK/status.out" || fail "epctl status on a ready node"
grep -q "^RANK TABLE epoch $E1, 8 ranks" "$WORK/status.out" || fail "epctl status: $(cat "$WORK/status.out")"
grep -Eq "^2 +127.0.0.1:${CTL[2]} +up " "$WORK/status.out" || fail "epctl status peers: $(cat "$WORK/status.out")"

# ---- kill -9 of node 2: detected by all others ----
T0=$(now_ms)
kill -9 "${PID[2]}"
wait "${PID[2]}" 2>/dev/null
PID[2]=
LIMIT=$((2 * TO + 4 * HB + 1500)) # the down rule (2 x timeout), a tick, and curl/scheduling slack
for i in 0 1 3; do
    wait_readyz "$i" "node 2 down" $((LIMIT - ($(now_ms) - T0))) || fail "node $i did not report node 2 down within $LIMIT ms"
done
[ "$(metric 0 'epd_cluster_peer_state{peer="2"}')" = 3 ] || fail "node 0: epd_cluster_peer_state{peer=\"2\"} is not 3 (down)"
cluster_doc 0
E2=$("$UTIL" jget "$WORK/c0.json" epoch)
[ "$E2" -gt "$E1" ] || fail "epoch did not move after node 2 went down ($E1 -> $E2)"
[ "$("$UTIL" jget "$WORK/c0.json" rank_table.complete)" = false ] || fail "table without node 2 should be incomplete"

# ---- epctl up names the missing node ----
"$EPCTL" up "$WORK/cluster.json" --deadline 1 --interval 100 >"$WORK/up2.out" 2>"$WORK/up2.err"
rc=$?
[ $rc != 0 ] || fail "epctl up exited 0 with node 2 dead"
grep -q "node 2 (127.0.0.1:${HTTP[2]}): unreachable" "$WORK/up2.err" || fail "epctl up did not name node 2: $(cat "$WORK/up2.err")"

# ---- restart: rejoin at a newer epoch ----
start_node 2
"$EPCTL" up "$WORK/cluster.json" --deadline 20 --interval 100 >"$WORK/up3.out" 2>&1 ||
    { cat "$WORK/up3.out" >&2; fail "cluster did not form again after node 2 restarted"; }
cluster_doc 2
E3=$("$UTIL" jget "$WORK/c2.json" epoch)
[ "$E3" -gt "$E2" ] || fail "rejoin did not bump the epoch ($E2 -> $E3)"
[ "$("$UTIL" jget "$WORK/c2.json" first_rank)" = 4 ] || fail "node 2 rejoined with the wrong rank"

# ---- wrong secret: refused and counted ----
kill -9 "${PID[3]}"
wait "${PID[3]}" 2>/dev/null
before=$(metric 0 'epd_ctl_rejected_frames_total{reason="auth_failed"}')
start_node 3 "$WORK/wrong-secret"
sleep 1.5
after=$(metric 0 'epd_ctl_rejected_frames_total{reason="auth_failed"}')
[ "${after:-0}" -gt "${before:-0}" ] 2>/dev/null ||
    fail "node 0 did not count the wrong secret (auth_failed $before -> $after)"
wait_readyz 3 "cluster" 3000 || fail "node 3 with the wrong secret is ready"
"$EPCTL" up "$WORK/cluster.json" --deadline 1 --interval 100 >/dev/null 2>"$WORK/up4.err"
[ $? = 3 ] || fail "epctl up should exit 3 (reachable, not ready): $(cat "$WORK/up4.err")"
grep -q "node 3 (127.0.0.1:${HTTP[3]})" "$WORK/up4.err" || fail "epctl up did not name node 3: $(cat "$WORK/up4.err")"
kill -9 "${PID[3]}"
wait "${PID[3]}" 2>/dev/null

# ---- a differing cluster-wide setting: refused, and the setting is named ----
start_node 3 "$WORK/secret" 256
wait_readyz 3 "model.max_batch_tokens" 5000 || fail "node 3 (max_batch_tokens 256) not refused naming the setting"
wait_readyz 0 "model.max_batch_tokens" 2000 || fail "node 0 does not name the differing setting of node 3"
kill -9 "${PID[3]}"
wait "${PID[3]}" 2>/dev/null
start_node 3
"$EPCTL" up "$WORK/cluster.json" --deadline 20 --interval 100 >/dev/null 2>&1 || fail "no re-form with the right secret"

# ---- drain, then down ----
"$EPCTL" drain --node "127.0.0.1:${HTTP[1]}" >/dev/null || fail "epctl drain"
wait_readyz 1 "draining" 2000 || fail "node 1 ready while draining"
T0=$(now_ms)
"$EPCTL" down --node "127.0.0.1:${HTTP[0]}" >/dev/null || fail "epctl down"
for ((k = 0; k < 50; k++)); do kill -0 "${PID[0]}" 2>/dev/null || break; sleep 0.1; done
kill -0 "${PID[0]}" 2>/dev/null && fail "node 0 still running 5 s after epctl down"
wait "${PID[0]}"
rc=$?
PID[0]=
[ $rc = 0 ] || fail "node 0 exited $rc after epctl down"
# Its BYE marks it down at once: well before the 2 x timeout silence rule.
wait_readyz 2 "node 0 down" "$TO" || fail "node 2 did not see node 0 leave within $TO ms"
grep -q "left the cluster" "$WORK/rz2" || fail "reason should say node 0 left: $(cat "$WORK/rz2")"
cluster_doc 2
[ "$("$UTIL" jget "$WORK/c2.json" coordinator)" = 1 ] || fail "node 1 should coordinate once node 0 left"
echo "PASS"

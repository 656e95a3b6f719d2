#!/bin/bash
# Serving across two epd nodes (one process each, 2 ranks per node, cpu backend, tcp wire): the
# engines' EP group is bootstrapped through the control plane. Greedy completions asked of
# either node equal the reference's tokens (ORACLE_DIR/expected.json: tests/model/oracle, or the
# DeepSeek oracles). Node 1 is killed
# (-9) while node 0 runs a long completion: that request fails with 503 (no hang), node 0 stops
# serving at once (not ready, new requests fail instead of hanging). Node 1 is then restarted:
# both nodes become ready again at a higher cluster epoch, their engines re-form one EP group
# (the survivor's ranks and the fresh node's meet in the same sequence of collectives), and
# greedy completions on each node equal transformers' tokens again.
# Usage: cluster_serving.sh EPD JSON_CHECK ORACLE_DIR CLUSTER_TESTUTIL
set -u
EPD=$1 CHECK=$2 ORACLE=$3 UTIL=$4
N=2
. "$(cd "$(dirname "$0")" && pwd)/../common/e2e.sh"
declare -a PID HTTP CTL
e2e_workdir cluster-serving
fail() { e2e_fail_nodes $N 40 "$@"; }
CURL=(curl -s -m 30)
e2e_cluster_ports "$UTIL" $N
e2e_secret "$WORK/secret"

start_node() {
    local i=$1 j=$((1 - $1))
    cat >"$WORK/n$i.json" <<JSON
{
  "node": {"id": $i, "name": "serve$i"},
  "cluster": {"name": "serving", "listen": {"host": "127.0.0.1", "port": ${CTL[i]}},
              "peers": [{"id": $j, "host": "127.0.0.1", "port": ${CTL[j]}}],
              "secret_file": "$WORK/secret"},
  "http": {"listen": {"host": "127.0.0.1", "port": ${HTTP[i]}}},
  "compute": {"backend": "cpu", "transport": "tcp", "ranks_per_node": 2},
  "model": {"path": "$ORACLE", "max_batch_tokens": 8, "max_seq_len": 512},
  "timeouts": {"connect_ms": 500, "heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 500,
               "ep_op_ms": 3000, "shutdown_ms": 3000},
  "log": {"level": "info"}
}
JSON
    "$EPD" -c "$WORK/n$i.json" 2>>"$WORK/n$i.log" &
    PID[i]=$!
}
wait_ready() { # node seconds
    local k
    for ((k = 0; k < $2 * 20; k++)); do
        [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:${HTTP[$1]}/readyz")" = 200 ] && return 0
        kill -0 "${PID[$1]}" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}
check_greedy() { # node
    local c=0 prompt tokens code got
    while read -r prompt tokens; do
        code=$("${CURL[@]}" -o "$WORK/r" -w '%{http_code}' -H 'Content-Type: application/json' \
            -d "{\"prompt\":[$prompt],\"max_tokens\":16,\"temperature\":0}" \
            "http://127.0.0.1:${HTTP[$1]}/v1/completions")
        [ "$code" = 200 ] || fail "node $1 case $c: HTTP $code: $(cat "$WORK/r")"
        got=$("$CHECK" completion "$WORK/r") || fail "node $1 case $c: bad response: $(cat "$WORK/r")"
        [ "$got" = "0 $tokens length" ] || fail "node $1 case $c: got '$got', transformers '0 $tokens length'"
        c=$((c + 1))
    done <"$WORK/cases"
}

epoch_of() { # node: the cluster epoch it reports
    "${CURL[@]}" -o "$WORK/st$1" "http://127.0.0.1:${HTTP[$1]}/v1/cluster" &&
        "$UTIL" jget "$WORK/st$1" epoch
}
boot_of() { # node: collectives its ranks ran through the control plane's bootstrap
    "${CURL[@]}" -o "$WORK/bc$1" "http://127.0.0.1:${HTTP[$1]}/v1/cluster" &&
        "$UTIL" jget "$WORK/bc$1" bootstrap_collectives
}
step_ctl_of() { # node plane: step control words its rank 0 exchanged on that plane
    "${CURL[@]}" -o "$WORK/sc$1" "http://127.0.0.1:${HTTP[$1]}/v1/status" &&
        "$UTIL" jget "$WORK/sc$1" "engine.step_control.$2"
}
active_of() { # node: sequences its engine is running
    "${CURL[@]}" "http://127.0.0.1:${HTTP[$1]}/metrics" | sed -n 's/^epd_engine_active_sequences //p'
}

"$CHECK" cases "$ORACLE/expected.json" >"$WORK/cases" || fail "cannot read expected.json"
for ((i = 0; i < N; i++)); do start_node "$i"; done
for ((i = 0; i < N; i++)); do wait_ready "$i" 60 || fail "node $i not ready"; done
check_greedy 0
check_greedy 1
"${CURL[@]}" -o "$WORK/st" "http://127.0.0.1:${HTTP[1]}/v1/cluster"
[ "$("$UTIL" jget "$WORK/st" rank_table.nranks)" = 4 ] || fail "expected 4 ranks in the table"

# ---- the steps' control words travel on libep's data plane, not through the control plane:
# the nodes' bootstrap collectives stay flat while both nodes generate ----
for ((i = 0; i < N; i++)); do
    BC[i]=$(boot_of "$i") || fail "no bootstrap_collectives from node $i"
    SD[i]=$(step_ctl_of "$i" data_plane) || fail "no step_control from node $i"
done
check_greedy 0
check_greedy 1
for ((i = 0; i < N; i++)); do
    b=$(boot_of "$i") d=$(step_ctl_of "$i" data_plane) s=$(step_ctl_of "$i" bootstrap)
    [ "$b" = "${BC[i]}" ] ||
        fail "node $i: ${BC[i]} -> $b bootstrap collectives while generating (want none)"
    [ "$d" -gt "${SD[i]}" ] || fail "node $i: no step control word on the data plane (${SD[i]} -> $d)"
    [ "$s" = 0 ] || fail "node $i: $s step control words went through the bootstrap"
    echo "node $i: $((d - SD[i])) step control words on the data plane, bootstrap collectives flat at $b"
done

E0=$(epoch_of 0) || fail "no epoch from node 0"

# ---- node 1 dies while node 0 runs a completion: it fails with 503, not a hang ----
curl -s -m 20 -o "$WORK/inflight" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '{"prompt":[24],"max_tokens":500,"temperature":0}' \
    "http://127.0.0.1:${HTTP[0]}/v1/completions" >"$WORK/inflight.code" &
INFLIGHT=$!
for ((k = 0; k < 200; k++)); do
    [ "$(active_of 0)" = 1 ] && break
    sleep 0.01
done
[ $k -lt 200 ] || fail "the long completion never became active on node 0"
kill -9 "${PID[1]}"
wait "${PID[1]}" 2>/dev/null
PID[1]=
T0=$(date +%s%3N)
wait $INFLIGHT
[ $(($(date +%s%3N) - T0)) -lt 10000 ] || fail "the in-flight request took more than 10 s to fail"
code=$(cat "$WORK/inflight.code")
[ "$code" = 503 ] || fail "in-flight request: HTTP $code (want 503): $(cat "$WORK/inflight")"
grep -q '"error"' "$WORK/inflight" || fail "in-flight request: no error object: $(cat "$WORK/inflight")"
for ((k = 0; k < 100; k++)); do
    [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:${HTTP[0]}/readyz")" = 503 ] && break
    sleep 0.05
done
[ $k -lt 100 ] || fail "node 0 still ready 5 s after node 1 was killed"
T0=$(date +%s%3N)
code=$(curl -s -m 10 -o "$WORK/r" -w '%{http_code}' -d '{"prompt":[1,2,3],"max_tokens":4,"temperature":0}' \
    "http://127.0.0.1:${HTTP[0]}/v1/completions")
[ "$code" = 503 ] ||
    fail "node 0 answered $code with its peer dead (want 503, not a completion or a hang): $(cat "$WORK/r")"
[ $(($(date +%s%3N) - T0)) -lt 5000 ] || fail "the failed request took more than 5 s"
# (the engine may have failed over on its own first: its data plane saw the socket close; the
# control plane's notice follows within the heartbeat timeout)
for ((k = 0; k < 100; k++)); do
    grep -q "rank 2 is down: node 1" "$WORK/n0.log" && break
    sleep 0.05
done
[ $k -lt 100 ] || fail "node 0's engine was not told that node 1 went down"

# ---- node 1 restarts: one EP group again, at a new epoch, serving transformers' tokens ----
start_node 1
for ((i = 0; i < N; i++)); do wait_ready "$i" 20 || fail "node $i not ready again after node 1 restarted"; done
for ((i = 0; i < N; i++)); do
    e=$(epoch_of "$i") || fail "no epoch from node $i"
    [ "$e" -gt "$E0" ] || fail "node $i is at epoch $e after the restart; it was $E0 before"
done
check_greedy 0
check_greedy 1
grep -q "EP group re-formed" "$WORK/n0.log" || fail "node 0's engine did not re-form its group"
grep -q "allgather sizes differ\|where a step's control word was due\|answered the group's join" "$WORK/n0.log" "$WORK/n1.log" &&
    fail "the nodes' collectives disagreed while the group re-formed"
echo "PASS"

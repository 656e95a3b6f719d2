#!/bin/bash
# Three epd daemons as separate hosts: one network namespace each, joined by veth pairs to a
# bridge that lives in a fourth namespace (the host's own network is never touched). Each
# node's HTTP API listens on 127.0.0.1 inside its namespace; the control plane on 10.77.x.y.
# The test forms the cluster, cuts node 2's link (`ip link set ... down`): every node reports
# the other side down; restores it: the cluster forms again at a newer epoch.
# Needs root and `ip netns`; otherwise exits 77 (ctest SKIP_RETURN_CODE) saying why.
# Usage: cluster_netns.sh EPD EPCTL CLUSTER_TESTUTIL
set -u
EPD=$1 EPCTL=$2 UTIL=$3
SKIP=77
N=3
HB=100 TO=500
if [ "$(id -u)" != 0 ]; then
    echo "SKIP: needs root to create network namespaces (running as uid $(id -u))"
    exit $SKIP
fi
if ! command -v ip >/dev/null || ! ip netns list >/dev/null 2>&1; then
    echo "SKIP: 'ip netns' is not available"
    exit $SKIP
fi
TAG=e$$
BR=${TAG}br
NET=10.77.$(($$ % 200 + 20))
. "$(cd "$(dirname "$0")" && pwd)/../common/e2e.sh"
declare -a PID
e2e_workdir cluster-netns
ns() { echo "${TAG}n$1"; }
cleanup() {
    e2e_cleanup
    for ((i = 0; i < N; i++)); do ip netns del "$(ns $i)" 2>/dev/null; done
    ip netns del "$BR" 2>/dev/null
}
trap cleanup EXIT
fail() { e2e_fail_nodes $N 30 "$@"; }
in_ns() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

# ---- topology ----
ip netns add "$BR" || { echo "SKIP: cannot create a network namespace"; exit $SKIP; }
ip -n "$BR" link add br0 type bridge || { echo "SKIP: no bridge support in this kernel"; exit $SKIP; }
ip -n "$BR" link set br0 up
ip -n "$BR" link set lo up
for ((i = 0; i < N; i++)); do
    ip netns add "$(ns $i)" || fail "ip netns add $(ns $i)"
    ip link add "${TAG}h$i" netns "$BR" type veth peer name eth0 netns "$(ns $i)" ||
        { echo "SKIP: cannot create veth pairs"; exit $SKIP; }
    ip -n "$BR" link set "${TAG}h$i" master br0 up
    ip -n "$(ns $i)" link set lo up
    ip -n "$(ns $i)" addr add "$NET.$((i + 1))/24" dev eth0
    ip -n "$(ns $i)" link set eth0 up
done

e2e_secret "$WORK/secret"
for ((i = 0; i < N; i++)); do
    peers=""
    for ((j = 0; j < N; j++)); do
        [ "$j" = "$i" ] && continue
        peers+="${peers:+,}{\"id\": $j, \"host\": \"$NET.$((j + 1))\", \"port\": 7420}"
    done
    cat >"$WORK/n$i.json" <<JSON
{
  "node": {"id": $i, "name": "host$i"},
  "cluster": {"name": "netns", "listen": {"host": "$NET.$((i + 1))", "port": 7420},
              "peers": [$peers], "secret_file": "$WORK/secret"},
  "http": {"listen": {"host": "127.0.0.1", "port": 8080}},
  "timeouts": {"connect_ms": 300, "heartbeat_interval_ms": $HB, "heartbeat_timeout_ms": $TO,
               "shutdown_ms": 1000}
}
JSON
    echo '{"nodes": [{"id": '"$i"', "http": "127.0.0.1:8080"}]}' >"$WORK/up$i.json"
    ip netns exec "$(ns $i)" "$EPD" -c "$WORK/n$i.json" 2>"$WORK/n$i.log" &
    PID[i]=$!
done

cluster_doc() { in_ns "$1" curl -s -m 3 -o "$WORK/c$1.json" http://127.0.0.1:8080/v1/cluster; }
all_up() { # each node, in its own namespace, sees the whole cluster formed and itself ready
    local i
    for ((i = 0; i < N; i++)); do
        in_ns "$i" "$EPCTL" up "$WORK/up$i.json" --deadline "$1" --interval 100 >"$WORK/up$i.out" 2>&1 ||
            { echo "node $i: $(cat "$WORK/up$i.out")" >&2; return 1; }
    done
}
all_up 20 || fail "the cluster did not form across namespaces"
cluster_doc 0
E1=$("$UTIL" jget "$WORK/c0.json" epoch)
[ "$("$UTIL" jget "$WORK/c0.json" rank_table.nranks)" = 3 ] || fail "expected 3 ranks"

# ---- cut node 2's link ----
ip -n "$BR" link set "${TAG}h2" down
readyz_says() { # node pattern
    in_ns "$1" curl -s -m 2 -o "$WORK/rz$1" -w '%{http_code}' http://127.0.0.1:8080/readyz | grep -q 503 &&
        grep -q -- "$2" "$WORK/rz$1"
}
DEADLINE=$(($(date +%s) + 5)) # 2 x 500 ms down rule, generously
ok=0
while [ "$(date +%s)" -le "$DEADLINE" ]; do
    if readyz_says 0 "node 2 down" && readyz_says 1 "node 2 down" && readyz_says 2 "node 0 down"; then
        ok=1
        break
    fi
    sleep 0.1
done
[ $ok = 1 ] || fail "link cut not detected: node0 $(cat "$WORK/rz0"), node1 $(cat "$WORK/rz1"), node2 $(cat "$WORK/rz2")"
cluster_doc 0
E2=$("$UTIL" jget "$WORK/c0.json" epoch)
[ "$E2" -gt "$E1" ] || fail "epoch did not move after the cut ($E1 -> $E2)"

# ---- restore: rejoin ----
ip -n "$BR" link set "${TAG}h2" up
all_up 20 || fail "the cluster did not form again after the link came back"
for ((i = 0; i < N; i++)); do
    cluster_doc "$i"
    e=$("$UTIL" jget "$WORK/c$i.json" epoch)
    [ "$e" -gt "$E2" ] || fail "node $i: epoch $e after rejoin, not newer than $E2"
done
echo "PASS"

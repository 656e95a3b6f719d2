#!/bin/sh
# Guest side of scripts/rdma-vm.sh: sets up the two rxe devices, runs the rdma test programs of
# BUILD_DIR (each with its own output) and checks with the devices' counters that the traffic
# crossed the veth wire in both directions. Exit 0 only if everything passed.
# usage: guest-tests.sh BUILD_DIR [TEST_PROGRAM_ARGS...]  (arguments go to test_rdma_wire)
set -u
build=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
"$here/net-setup.sh" || { echo "rdma-vm-guest: network set-up failed"; exit 3; }

counter() { cat "/sys/class/infiniband/$1/ports/1/hw_counters/$2" 2>/dev/null || echo 0; }
snapshot() {
    for d in rxe0 rxe1; do
        for c in sent_pkts rcvd_pkts; do
            eval "${1}_${d}_${c}=$(counter $d $c)"
        done
    done
}

fails=0
run() {
    name=$1
    shift
    echo "=== $name: $*"
    snapshot before
    t0=$(date +%s)
    "$@"
    rc=$?
    snapshot after
    for d in rxe0 rxe1; do
        for c in sent_pkts rcvd_pkts; do
            eval "delta=\$((after_${d}_${c} - before_${d}_${c}))"
            eval "${d}_${c}=$delta"
        done
    done
    echo "--- $name: exit $rc in $(($(date +%s) - t0)) s; rxe0 sent $rxe0_sent_pkts rcvd $rxe0_rcvd_pkts, rxe1 sent $rxe1_sent_pkts rcvd $rxe1_rcvd_pkts packets"
    if [ "$rc" -ne 0 ]; then
        echo "FAIL $name (exit $rc)"
        fails=$((fails + 1))
        return
    fi
    # Ranks alternate between rxe0 and rxe1: both must have sent and received.
    if [ "$rxe0_sent_pkts" -eq 0 ] || [ "$rxe1_rcvd_pkts" -eq 0 ] ||
        [ "$rxe1_sent_pkts" -eq 0 ] || [ "$rxe0_rcvd_pkts" -eq 0 ]; then
        echo "FAIL $name: no traffic between rxe0 and rxe1"
        fails=$((fails + 1))
    fi
}

run wire "$build/tests/rdma/test_rdma_wire" "$@"
if [ $# -eq 0 ]; then
    for n in 2 4; do
        run "ep_ops_${n}ranks" "$build/tests/rdma/test_rdma_ep" "$n"
    done
    # the cuda backend's proxy thread (no GPU needed) driving the verbs wire
    if [ -x "$build/tests/transport_tcp/test_cuda_proxy" ]; then
        run proxy_over_verbs env EP_TEST_WIRE=rdma "$build/tests/transport_tcp/test_cuda_proxy"
    fi
    if [ -x "$build/transport/ep-bench" ]; then
        run bench_ll_2ranks "$here/bench.sh" "$build" ll 2
        run bench_ht_2ranks "$here/bench.sh" "$build" ht 2
    fi
fi
echo "rdma-vm-guest: $fails failed"
[ "$fails" -eq 0 ]

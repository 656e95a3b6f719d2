#!/bin/sh
# Guest side of scripts/rdma-vm.sh: ep-bench over the rdma transport with one process per rank
# (ranks alternate between rxe0 and rxe1). Soft-RoCE under emulation: the figures show that the
# path works, they are no performance claim. Output also goes to $EPD_VM_RESULTS if set.
# usage: bench.sh BUILD_DIR ll|ht NRANKS
set -u
build=$1 mode=$2 n=$3
port=$((20000 + $$ % 20000))
out=${EPD_VM_RESULTS:-/tmp}/bench-$mode-${n}ranks.txt
case $mode in
ll) args="--mode ll --tokens 32 --hidden 2048 --topk 4 --experts 16" ;;
ht) args="--mode ht --tokens 256 --hidden 2048 --topk 4 --experts 16" ;;
*) echo "bench.sh: mode $mode is not ll or ht" >&2; exit 2 ;;
esac
pids=""
r=1
while [ $r -lt "$n" ]; do
    "$build/transport/ep-bench" $args --transport rdma --iters 5 --warmup 1 --timeout-ms 60000 \
        --rank $r --nranks "$n" --bootstrap 127.0.0.1:$port >"$out.$r" 2>&1 &
    pids="$pids $!"
    r=$((r + 1))
done
"$build/transport/ep-bench" $args --transport rdma --iters 5 --warmup 1 --timeout-ms 60000 \
    --rank 0 --nranks "$n" --bootstrap 127.0.0.1:$port >"$out" 2>&1
rc=$?
for p in $pids; do
    wait "$p" || rc=1
done
cat "$out"
for f in "$out".*; do
    [ -s "$f" ] && grep -qi "error\|fail" "$f" && cat "$f"
done
exit $rc

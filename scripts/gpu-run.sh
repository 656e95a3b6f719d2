#!/usr/bin/env bash
# Device-machine entry point: configure and build with CUDA, run the GPU tests (1000 LL steps
# per mode, timeout test, ranks in separate processes over CUDA IPC and over the proxy/tcp
# internode path, PyTorch cross-check) and the cuda benchmark, write logs to $OUT, and print a
# short summary table last. Usage: scripts/gpu-run.sh [--quick] [--no-bench]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STEPS=1000
BENCH=1
for a in "$@"; do
  case $a in
  --quick) STEPS=100 ;;
  --no-bench) BENCH=0 ;;
  *) echo "usage: $0 [--quick] [--no-bench]" >&2; exit 2 ;;
  esac
done
SUMMARY=()
note() { SUMMARY+=("$(printf '%-34s %s' "$1" "$2")"); }

nvidia-smi --query-gpu=index,name,memory.total,clocks.sm --format=csv >"$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >>"$OUT/gpus.txt" 2>&1
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)

# The machine has no cmocka (tests/transport needs it to configure): unpack the carried Debian
# packages (.deps/, fetched here with scripts/gpu-deps.sh) into a prefix (scripts/gpu-env.sh).
if ! pkg-config --exists cmocka 2>/dev/null && ls .deps/*.deb >/dev/null 2>&1; then
  source scripts/gpu-env.sh
fi

# Build from a copy that holds only what the GPU work needs (libep, kernels, their tests): the
# other folders want libraries the device machine lacks (cJSON, ICU, libuv), and a folder
# without its CMakeLists.txt simply stays out of the build.
SRC=/tmp/epd-gpu-src
rm -rf $SRC && mkdir -p $SRC/tests
cp -r CMakeLists.txt kernels transport $SRC/ && cp tests/CMakeLists.txt $SRC/tests/ &&
  cp -r tests/gpu tests/transport $SRC/tests/
BUILD=$PWD/build-gpu
if ! { cmake -S $SRC -B $BUILD -G Ninja -DEPD_BUILD_DAEMON=OFF -DCMAKE_CUDA_ARCHITECTURES=90a \
         -DEPD_CUDA=ON -DCMAKE_BUILD_TYPE=Release &&
       ninja -C $BUILD -j16; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
note build ok

T=$BUILD/tests/gpu/test_cuda_ll
run_test() { # name, args...
  local name=$1; shift
  local t0=$SECONDS log="$OUT/test-$name.log"
  if timeout 300 "$T" "$@" >"$log" 2>&1; then r=PASS; else r="FAIL (rc $?)"; fi
  note "test $name" "$r  $((SECONDS - t0))s  $(grep -m1 -o 'worst combine error [0-9.e+-]*' "$log")"
  [ "$r" = PASS ] || tail -5 "$log"
  { echo "==== $name: $*"; cat "$log"; } >>"$OUT/tests.log"
  rm -f "$log"
}
run_test ll --steps $STEPS --dump "$OUT/fp8dump.bin"
run_test ll_hook --steps $STEPS --hook
run_test ll_graph --steps $STEPS --graph
run_test ll_graph_hook --steps $STEPS --graph --hook
run_test timeout --timeout
T=$BUILD/tests/gpu/test_cuda_ht
run_test ht_route --steps 40
EP_CUDA_HT_COPY=0 run_test ht_route_sm --steps 40
T=$BUILD/tests/gpu/test_cuda_vs_cpu
run_test cuda_vs_cpu
EP_CUDA_HT_COPY=0 run_test cuda_vs_cpu_sm
T=$BUILD/tests/gpu/test_cuda_mp
run_test mp_nvlink_ipc --steps 40
run_test mp_tcp_proxy --transport tcp --steps 200
EP_CUDA_RING_SLOTS=16 run_test mp_tcp_small_ring --transport tcp --steps 60
run_test mp_tcp_kill --transport tcp --kill
run_test mp_nvlink_kill --kill
T=$BUILD/tests/gpu/test_cuda_mp3
run_test mp3_tcp_proxy --transport tcp --steps 100
T=$BUILD/tests/gpu/test_cuda_ll
if python3 tests/gpu/check_torch.py "$OUT/fp8dump.bin" 512 >>"$OUT/tests.log" 2>&1; then
  note "torch fp8/bf16 cross-check" "PASS $(grep -o 'check_torch: [0-9]* rows' "$OUT/tests.log")"
else
  note "torch fp8/bf16 cross-check" "FAIL: $(tail -1 "$OUT/tests.log")"
fi
rm -f "$OUT/fp8dump.bin"
if [ $STEPS = 1000 ]; then # --quick leaves out the ctest run (the same binaries, fewer steps)
  (cd $BUILD && ctest -L gpu --output-on-failure) >"$OUT/ctest.log" 2>&1 &&
    note "ctest -L gpu" PASS || note "ctest -L gpu" "FAIL (see ctest.log)"
fi

if [ $BENCH = 1 ]; then
  B=$BUILD/tests/gpu/ep-cuda-bench
  timeout 300 $B --iters 50 --num-sms 24 >"$OUT/bench.log" 2>&1 || echo "bench rc $?"
  for sms in 8 24; do
    for cp in 1 0; do
      echo "==== HT num_sms $sms, EP_CUDA_HT_COPY=$cp" >>"$OUT/bench.log"
      EP_CUDA_HT_COPY=$cp timeout 200 $B --iters 30 --num-sms $sms --ht-only >>"$OUT/bench.log" 2>&1 ||
        echo "bench $sms $cp rc $?"
    done
  done
  EB=$BUILD/transport/ep-bench
  # Ranks as threads of one process, each on its own stream (on a one-GPU machine both ranks
  # share it and split its SMs): nvlink (peer stores), and the internode path (LL: kernels ->
  # command ring -> proxy thread -> tcp wire over loopback; HT: host-driven block transfers).
  for tr in nvlink tcp; do
    for args in "--mode ll --fp8" "--mode ll --fp8 --hook" "--mode ll --bf16" \
                "--mode ht --bf16" "--mode ht --fp8"; do
      echo "==== ep-bench --backend cuda --transport $tr $args" >>"$OUT/ep-bench.log"
      timeout 90 $EB --backend cuda --transport $tr --iters 30 --timeout-ms 5000 $args \
        >>"$OUT/ep-bench.log" 2>&1 || echo "ep-bench $tr $args rc $?" >>"$OUT/ep-bench.log"
    done
  done
  # Two processes, one rank each, over CUDA IPC (nvlink) and over the internode path. On a
  # one-GPU machine both processes share the GPU and their kernels take turns (time slices of
  # the two CUDA contexts), so these figures are functional only.
  for tr in nvlink tcp; do
    for args in "--mode ll --fp8" "--mode ll --bf16"; do
      port=$((29000 + RANDOM % 2000))
      echo "==== ep-bench 2 processes --backend cuda --transport $tr $args" >>"$OUT/ep-bench-mp.log"
      for r in 1 0; do
        timeout 120 $EB --backend cuda --transport $tr --rank $r --nranks 2 \
          --bootstrap 127.0.0.1:$port --iters 30 --timeout-ms 20000 $args \
          >"$OUT/mp-$r.log" 2>&1 &
      done
      wait
      cat "$OUT/mp-0.log" "$OUT/mp-1.log" >>"$OUT/ep-bench-mp.log"
      rm -f "$OUT/mp-0.log" "$OUT/mp-1.log"
    done
  done
fi

echo
echo "==== logs: $OUT ($NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
[ $BENCH = 1 ] && { sed -n '/^ep-cuda-bench/,/^====/p' "$OUT/bench.log" | grep -v '^$';
  grep -E '^==== HT|GB/s' "$OUT/bench.log" | tail -12;
  grep -sE '^====|^LL|^HT|median' "$OUT/ep-bench.log" "$OUT/ep-bench-mp.log"; }
printf '%s\n' "${SUMMARY[@]}"

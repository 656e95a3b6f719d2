#!/usr/bin/env bash
# The project's test command (README.md, .ci/run): installs what is missing, then
#  1. a warnings-as-errors build (CUDA sources compiled for sm_90a where nvcc exists) + all tests
#     (GPU and RDMA-device tests skip themselves on machines without those devices),
#  2. an ASan+UBSan build of the same tests (skipped with --quick),
#  3. the libFuzzer targets under clang, each for a bounded time (skipped with --quick).
# Fails on the first failed step.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
jobs=$(nproc)

scripts/install-deps.sh

cuda=OFF
if [ -x /usr/local/cuda/bin/nvcc ] || command -v nvcc >/dev/null; then cuda=ON; fi

step() { printf '\n=== %s\n' "$*"; }

step "build (Werror, CUDA=$cuda)"
cmake -S . -B build -G Ninja -DEPD_WERROR=ON -DEPD_CUDA=$cuda >/dev/null
ninja -C build -j"$jobs"
step "tests"
ctest --test-dir build --output-on-failure -j"$jobs" -LE fuzz

[ $quick -eq 1 ] && exit 0

step "build (ASan+UBSan)"
cmake -S . -B build-asan -G Ninja -DEPD_WERROR=ON -DEPD_SANITIZE=ON -DEPD_CUDA=OFF >/dev/null
ninja -C build-asan -j"$jobs"
step "tests under ASan+UBSan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs" -LE "fuzz|noasan"

step "build (libFuzzer, clang)"
CC=clang cmake -S . -B build-fuzz -G Ninja -DEPD_FUZZ=ON -DEPD_CUDA=OFF >/dev/null
ninja -C build-fuzz -j"$jobs"
step "fuzz targets (bounded time each)"
ctest --test-dir build-fuzz --output-on-failure -L fuzz

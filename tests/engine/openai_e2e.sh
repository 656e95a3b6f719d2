#!/bin/bash
# Runs openai_client.mjs (the official openai npm client) against epd serving the oracle
# checkpoint with 2 ranks. The client is installed with npm into NPM_DIR (the build tree) at
# test time; without node/npm, or if npm cannot fetch it, the test is skipped (exit 77).
# Usage: openai_e2e.sh EPD NOTIFY_HELPER ORACLE_DIR NPM_DIR
set -u
EPD=$1 NOTIFY=$2 ORACLE=$3 NPM_DIR=$4
HERE=$(cd "$(dirname "$0")" && pwd)
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "SKIP: node or npm is not installed"
    exit 77
fi
mkdir -p "$NPM_DIR"
if [ ! -d "$NPM_DIR/node_modules/openai" ]; then
    (cd "$NPM_DIR" && [ -f package.json ] || echo '{"private":true,"type":"module"}' >package.json
     timeout 300 npm install --no-audit --no-fund --loglevel=error openai) ||
        { echo "SKIP: npm could not fetch the openai package"; exit 77; }
fi
cp "$HERE/openai_client.mjs" "$NPM_DIR/"
. "$HERE/../common/e2e.sh"
e2e_workdir openai
fail() { e2e_fail 30 "$@"; }
openai_config() {
    cat >"$WORK/epd.json" <<JSON
{"http": {"listen": {"host": "127.0.0.1", "port": $PORT}},
 "compute": {"backend": "cpu", "ranks_per_node": 2},
 "model": {"path": "$ORACLE", "max_batch_tokens": 8, "max_seq_len": 512}}
JSON
}
e2e_start_epd readyz openai_config
(cd "$NPM_DIR" && timeout 120 node openai_client.mjs "http://127.0.0.1:$PORT" "$ORACLE/expected.json")
rc=$?
[ $rc = 0 ] || { echo "--- epd log ---"; tail -30 "$WORK/epd.log"; }
exit $rc

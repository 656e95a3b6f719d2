#!/bin/sh
# scripts/rdma-vm.sh --plan: a build folder or checkout under /tmp or /run (which the guest
# covers with its own tmpfs) is shared into the guest separately, at its own path; one inside
# another rides along; elsewhere nothing extra is shared. No VM is booted (ctest rdma.vm does).
# usage: rdma_vm_paths.sh SOURCE_DIR
set -u
src=$(cd "$1" && pwd)
vm=$src/scripts/rdma-vm.sh
fails=0
fail() {
    echo "FAIL $*"
    fails=$((fails + 1))
}
t=$(mktemp -d /tmp/epd-vm-paths.XXXXXX) || exit 1
v=$(mktemp -d /var/tmp/epd-vm-paths.XXXXXX) || exit 1
trap 'rm -rf "$t" "$v"' EXIT

# expect NAME "EXPECTED PLAN" VM_SCRIPT ARGS...: the plan equals EXPECTED (run from $PWD)
expect() {
    name=$1 want=$2
    shift 2
    got=$("$@" 2>&1)
    rc=$?
    if [ $rc -ne 0 ] || [ "$got" != "$want" ]; then
        fail "$name (exit $rc)"
        printf '  want:\n%s\n  got:\n%s\n' "$want" "$got"
    else
        echo "ok $name"
    fi
}

# where the checkout is when the test runs (a clone in /tmp shares itself as well)
case $(cd "$src" && pwd -P)/ in
/tmp/* | /run/*) self="share share0 $(cd "$src" && pwd -P)
" n=1 ;;
*) self="" n=0 ;;
esac

mkdir -p "$t/build"
cd "$v" || exit 1
expect "a build folder under /tmp is shared" "${self}share share$n $t/build
cmd cd '$v' || exit 2
cmd exec '$src/scripts/rdma-vm/guest-tests.sh' '$t/build'" "$vm" --plan "$t/build"

mkdir -p "$v/build"
expect "a build folder elsewhere needs no share" "${self}cmd cd '$v' || exit 2
cmd exec 'true'" "$vm" --plan "$v/build" true

# a checkout cloned into /tmp, its build folder inside it or beside it
mkdir -p "$t/clone/scripts" "$t/clone/build" "$t/b2"
cp -R "$src/scripts/rdma-vm.sh" "$src/scripts/rdma-vm" "$t/clone/scripts/"
expect "a checkout under /tmp with its build folder inside: one share" "share share0 $t/clone
cmd cd '$v' || exit 2
cmd exec '$t/clone/scripts/rdma-vm/guest-tests.sh' '$t/clone/build'" \
    "$t/clone/scripts/rdma-vm.sh" --plan "$t/clone/build"
expect "a checkout under /tmp, its build folder beside it: two shares" "share share0 $t/clone
share share1 $t/b2
cmd exec 'true'" sh -c "cd '$t' && '$t/clone/scripts/rdma-vm.sh' --plan '$t/b2' true"

# the working directory: kept where the guest sees it (inside a share), dropped where not
expect "working directory inside the shared build folder" "${self}share share$n $t/build
cmd cd '$t/build' || exit 2
cmd exec 'true'" sh -c "cd '$t/build' && '$vm' --plan '$t/build' true"

# a symlink into /tmp: the physical folder is what the guest must be given
ln -s "$t/build" "$v/link"
expect "a symlink to a build folder under /tmp shares its target" "${self}share share$n $t/build
cmd cd '$v' || exit 2
cmd exec 'x'" "$vm" --plan "$v/link" x

# refused: the guest's tmpfs itself
out=$("$vm" --plan /tmp true 2>&1)
[ $? -eq 2 ] && echo "$out" | grep -q "guest's own tmpfs" && echo "ok /tmp itself is refused" ||
    fail "/tmp itself as the build folder: $out"

echo "$fails failure(s)"
[ "$fails" -eq 0 ]

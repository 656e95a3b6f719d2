#!/bin/sh
# Guest side of scripts/rdma-vm.sh: two Soft-RoCE devices, rxe0 on veth0 (10.77.0.1) and rxe1
# on veth1 (10.77.0.2), both in the initial network namespace (rxe on kernel 6.1 works only
# there). Policy routing makes locally generated traffic between the two addresses leave
# through the veth instead of the kernel's short-cut through lo: one table per direction,
# looked up for packets from lo before the local table (moved after them); accept_local lets
# the receiving end take packets whose source is one of its own addresses.
set -eu
ip link set lo up
ip link add veth0 type veth peer name veth1
ip addr add 10.77.0.1/24 dev veth0
ip addr add 10.77.0.2/24 dev veth1
ip link set veth0 mtu 1500 up
ip link set veth1 mtu 1500 up
for f in all default veth0 veth1; do
    echo 1 >/proc/sys/net/ipv4/conf/$f/accept_local
    echo 0 >/proc/sys/net/ipv4/conf/$f/rp_filter
done
ip route add 10.77.0.2 dev veth0 src 10.77.0.1 table 101
ip route add 10.77.0.1 dev veth1 src 10.77.0.2 table 102
ip rule add pref 10 iif lo to 10.77.0.2 table 101
ip rule add pref 11 iif lo to 10.77.0.1 table 102
ip rule add pref 100 table local
ip rule del pref 0
rdma link add rxe0 type rxe netdev veth0
rdma link add rxe1 type rxe netdev veth1
# The ports come up with their netdevs; the GID table fills in asynchronously.
i=0
while [ $i -lt 50 ]; do
    n=$(ibv_devinfo 2>/dev/null | grep -c "PORT_ACTIVE" || true)
    [ "$n" -ge 2 ] && break
    sleep 0.1
    i=$((i + 1))
done
ibv_devinfo | grep -E "hca_id|state|active_mtu|link_layer"

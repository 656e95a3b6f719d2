#!/bin/bash
# Verifies packaging/epd.service with systemd-analyze: a copy whose ExecStart points at the
# built epd (verify needs the binary to exist). Any diagnostic about the unit fails the test.
# Usage: unit_verify.sh UNIT EPD
set -u
UNIT=$1 EPD=$2
WORK=$(mktemp -d /tmp/epd-unit.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
sed "s|^ExecStart=/usr/bin/epd |ExecStart=$EPD |" "$UNIT" >"$WORK/epd.service"
grep -q "^ExecStart=$EPD -c /etc/epd/epd.json\$" "$WORK/epd.service" || {
    echo "FAIL: ExecStart is not '/usr/bin/epd -c /etc/epd/epd.json'"; exit 1; }
for key in "Type=notify" "User=epd" "ExecReload=/bin/kill -HUP \$MAINPID" "Restart=on-failure" \
    "WatchdogSec=30s" "LimitMEMLOCK=infinity" "NoNewPrivileges=yes" "ProtectSystem=strict" \
    "ProtectHome=yes" "PrivateTmp=yes" "ReadWritePaths=/var/lib/epd"; do
    grep -qxF "$key" "$UNIT" || { echo "FAIL: unit lacks '$key'"; exit 1; }
done
grep -q '^PrivateDevices=yes' "$UNIT" && { echo "FAIL: PrivateDevices=yes hides GPUs and RDMA"; exit 1; }
for dev in char-nvidia-frontend char-nvidia-uvm char-infiniband_verbs /dev/infiniband/rdma_cm; do
    grep -q "^DeviceAllow=$dev rw\$" "$UNIT" || { echo "FAIL: no DeviceAllow for $dev"; exit 1; }
done
out=$(systemd-analyze verify --man=no "$WORK/epd.service" 2>&1)
rc=$?
echo "$out"
[ $rc = 0 ] || { echo "FAIL: systemd-analyze verify exit $rc"; exit 1; }
if echo "$out" | grep -q "epd.service"; then
    echo "FAIL: systemd-analyze reported problems in the unit"
    exit 1
fi
echo "unit verified"

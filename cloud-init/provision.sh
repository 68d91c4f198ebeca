#!/bin/sh
# Runs once, as root, inside the provisioning VM (from cloud-init's runcmd).
# The VM has no network device: its one way out is vmiso's gateway on the host,
# which the host's SSH session over the virtio-serial port forwards to
# 127.0.0.1:$GATEWAY_PORT here (an allow-listing HTTP proxy that resolves names).
# It installs the image's packages (pip as an unprivileged build user), seals the
# image for cloning and powers off.  Progress goes to the serial console as
# "VMISO-STEP name" lines that the host reads; a failure is "VMISO-FAIL name".
# Results go to the report share (tag vmiso-report), which the host treats as
# untrusted data.
set -uf  # -f: no globbing of the package list
CONF=/var/lib/vmiso/provision.env
. "$CONF"
REPORT=/mnt/vmiso-report
VENV=/opt/vmiso/venv
console() { echo "$*" > /dev/ttyS0; }
step() { STEP=$1; console "VMISO-STEP $1"; }
fail() {
    console "VMISO-FAIL $STEP"
    echo "$STEP" > "$REPORT/failed-step"
    sync
    poweroff
    exit 1
}
# run CMD...: its output goes to the step's log in the report share and the console.
# The log's tail is what the step's programs (install-time code among them) wrote: the
# host's markers in it are defused, so that it can neither start nor blame a step.
run() { "$@" >> "$REPORT/$STEP.log" 2>&1 || {
    tail -n 40 "$REPORT/$STEP.log" | sed 's/VMISO-/VMISO_/g' > /dev/ttyS0; fail; }; }

modprobe 9pnet_virtio; modprobe 9p
mkdir -p "$REPORT"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmiso-report "$REPORT" || {
    console "VMISO-FAIL report-share"; poweroff; exit 1; }

step gateway
# sshd on the SSH port, for the host's session only: it may ask for one remote
# forward, of 127.0.0.1:$GATEWAY_PORT, and nothing else.
SSH_PORT=/dev/virtio-ports/org.vmiso.ssh
mkdir -p /run/sshd
# sshd refuses a locked account ("!") when PAM is off; "*" matches no password.
run usermod -p '*' vmiso
i=0
until [ -e "$SSH_PORT" ]; do
    i=$((i + 1)); [ $i -gt 600 ] && { console "no $SSH_PORT"; fail; }; sleep 0.1
done
(
    while :; do
        /usr/sbin/sshd -i -f /etc/ssh/sshd_config.vmiso -o AllowTcpForwarding=remote \
            -o "PermitListen=127.0.0.1:$GATEWAY_PORT" -o PermitOpen=none <>"$SSH_PORT" >&0 2>/dev/null
        sleep 0.1
    done
) &
SSHD_LOOP=$!
# The host connects once it reads this step's marker; wait for its forward.
run python3 -c '
import socket, sys, time
deadline = time.monotonic() + 300
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the gateway did not appear on 127.0.0.1:%s" % sys.argv[1])
        time.sleep(0.2)
' "$GATEWAY_PORT"
PROXY="http://127.0.0.1:$GATEWAY_PORT"

step apt
export DEBIAN_FRONTEND=noninteractive
# A cloud image may start its own apt jobs at first boot (apt-daily,
# unattended-upgrades): wait for their lock rather than fail on it.  And go
# through the gateway: it forwards to the mirror (or the image's sources) only.
WAIT_LOCK="-o DPkg::Lock::Timeout=600 -o Acquire::http::Proxy=$PROXY -o Acquire::https::Proxy=$PROXY"
if [ -n "$APT_PACKAGES" ]; then
    # shellcheck disable=SC2086  # option and package lists, split on purpose
    run apt-get $WAIT_LOCK update -q
    # shellcheck disable=SC2086
    run apt-get $WAIT_LOCK install -y -q --no-install-recommends $APT_PACKAGES
fi

step venv
# Everything that runs the requirements' code (pip's builds, setup.py, .pth files at
# every start of the venv's Python) runs as this user, who owns only the venv, its
# home and temporary files: it cannot replace sshd, its config, vmiso's files or tini.
BUILD_USER=vmiso-build
run useradd --system --create-home --home-dir /var/lib/vmiso-build --shell /usr/sbin/nologin "$BUILD_USER"
run install -d -o root -g root -m 0755 /opt/vmiso
run install -d -o "$BUILD_USER" -g "$BUILD_USER" -m 0755 "$VENV"
as_build() { runuser -u "$BUILD_USER" -- env HOME=/var/lib/vmiso-build "$@"; }
run as_build python3 -m venv "$VENV"

step pip
# pip trusts its own certificate bundle unless told otherwise; point it at the
# system store, where cloud-init put the configured CAs.
export PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
export PIP_PROXY="$PROXY" HTTP_PROXY="$PROXY" HTTPS_PROXY="$PROXY" http_proxy="$PROXY" https_proxy="$PROXY"
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST and PIP_REQUIRE_HASHES come from $CONF.
if [ -s /var/lib/vmiso/requirements.txt ]; then
    # --report: what it downloaded for each distribution (URL, sha256), for the host's lock.
    run as_build "$VENV/bin/pip" install --no-input --report /var/lib/vmiso-build/pip-report.json \
        -r /var/lib/vmiso/requirements.txt
fi

step manifest
as_build "$VENV/bin/pip" freeze --all > "$REPORT/pip-freeze.txt" 2>> "$REPORT/manifest.log" || fail
if [ -s /var/lib/vmiso/requirements.txt ]; then  # read as the build user: it wrote the file
    as_build cat /var/lib/vmiso-build/pip-report.json > "$REPORT/pip-report.json" 2>> "$REPORT/manifest.log" || fail
fi
dpkg-query -W -f '${Package}\t${Version}\n' > "$REPORT/dpkg.txt" 2>> "$REPORT/manifest.log" || fail
as_build "$VENV/bin/python" -c 'import platform; print(platform.python_version())' > "$REPORT/python.txt" || fail
# The build user ends here: its processes, its files, itself.  The venv becomes root's.
runuser -u "$BUILD_USER" -- /bin/sh -c 'kill -KILL -1' 2>/dev/null
sleep 0.5
find / -xdev -user "$BUILD_USER" ! -path "$VENV" ! -path "$VENV/*" -exec rm -rf {} + 2>/dev/null
run chown -R root:root "$VENV"
run userdel "$BUILD_USER"
kill "$SSHD_LOOP" 2>/dev/null

step seal
# Clones boot with vmiso's own init, never cloud-init, and have no network.
touch /etc/cloud/cloud-init.disabled
rm -f /etc/network/interfaces.d/* /etc/netplan/*.yaml 2>/dev/null
run apt-get clean
rm -rf /var/lib/apt/lists/* /root/.cache /var/cache/debconf/*-old /var/lib/vmiso/requirements.txt
: > /etc/machine-id
run cloud-init clean --logs
find /var/log -type f -exec truncate -s 0 "{}" +
rm -f "$CONF"
# Sealed: nothing may write to the disk any more.  cloud-init, which runs this
# script, would otherwise recreate its instance directory (with the seed's user
# data in it) on its way out.  A remount fails while any file is open for
# writing; the kernel's emergency remount does not.
sync
if mount -o remount,ro / 2>/dev/null; then
    console "vmiso: root filesystem read-only"
else
    echo 1 > /proc/sys/kernel/sysrq
    echo u > /proc/sysrq-trigger  # block-device filesystems only: the report share stays writable
    sleep 1
    console "vmiso: root filesystem read-only (emergency remount)"
fi
awk '$2 == "/" { split($4, o, ","); exit o[1] != "ro" }' /proc/mounts || fail
# What was deleted (the requirements, cloud-init's copy of the seed, logs, caches)
# must not survive in the free blocks that the template would carry: discard every
# free block (the overlay's clusters are 4 KiB, so each discard reaches it and
# reads back as zeros), now that the filesystem is read-only and ext4 has given
# back the blocks it had set aside for files being written.
run fstrim -v /
echo ok > "$REPORT/status"
sync
umount "$REPORT"
console "VMISO-STEP poweroff"
poweroff

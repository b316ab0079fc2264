#!/bin/sh
# PID 1 of the lab guest, on the overlay of the host root: finish the
# mounts a normal boot would make, run /lab-out/cmd, save its exit code and
# the kernel log to the results share, power off.
#
# With TIERD_LAB_INIT=systemd (in /lab-out/env) it hands PID 1 to the host's
# systemd instead, which boots to lab.target and runs the command as
# lab-cmd.service (this script again, with the argument "run"); the unit
# powers the guest off when the command is done.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb

# Keep the kernel's cpusets_enabled static key on for the whole boot. A test
# that makes and removes a cpuset flips it, and the flip patches the page
# allocator's hot path while the other vCPU allocates: under multi-threaded
# TCG that once ended in "Oops: int3" at get_page_from_freelist (CI, the
# tierd guest). A cpuset that lives as long as the guest means no flip.
pin_cpusets_key() {
    echo +cpuset > /sys/fs/cgroup/cgroup.subtree_control &&
        mkdir -p /sys/fs/cgroup/lab-cpusets-key
}

run_cmd() {
    pin_cpusets_key || echo "lab-guest: cpusets key not pinned" >&2
    echo "lab-guest: $(uname -r) up in $(cut -d' ' -f1 /proc/uptime) s"
    cd "$TIERD_LAB_CWD" || cd /
    # The host retries a boot that panicked before this point (vm.py's
    # STARTED_MARKER), never one that got here: the command runs once.
    : > /lab-out/started
    sh /lab-out/cmd
    echo $? > /lab-out/rc
    dmesg > /lab-out/dmesg
    sync
}

# lab-cmd.service, under systemd: everything is mounted already.
if [ "${1:-}" = run ]; then
    . /lab-out/env
    run_cmd
    exit 0
fi

mount -t proc proc /proc
mount -t sysfs sysfs /sys
. /lab-out/env
# A checkout under /tmp (CI clones anywhere) must survive the tmpfs on /tmp.
case "$TIERD_LAB_CWD" in
    /tmp/*) mkdir -p /mnt/lab-cwd && mount --bind "$TIERD_LAB_CWD" /mnt/lab-cwd ;;
esac
mount -t tmpfs -o mode=1777 tmpfs /tmp
if mountpoint -q /mnt/lab-cwd 2>/dev/null; then
    mkdir -p "$TIERD_LAB_CWD" && mount --move /mnt/lab-cwd "$TIERD_LAB_CWD"
fi
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null
# Loopback, as any boot brings up: tierd serves its metrics on 127.0.0.1.
ip link set lo up

# Units for systemd as PID 1: lab.target is the whole boot (basic.target, so
# services get the environment of a real boot, but no gettys or timers).
write_lab_units() {
    mkdir -p /run/systemd/system
    cat > /run/systemd/system/lab.target <<'UNIT'
[Unit]
Description=Lab guest
Requires=basic.target lab-cmd.service
After=basic.target lab-cmd.service
AllowIsolate=yes
UNIT
    cat > /run/systemd/system/lab-cmd.service <<'UNIT'
[Unit]
Description=Lab command (/lab-out/cmd)
After=basic.target
# rc and dmesg are on the 9p share and synced: nothing left to stop cleanly.
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate

[Service]
Type=oneshot
ExecStart=/bin/sh /lab-out/guest-init.sh run
TimeoutStartSec=infinity
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/console
UNIT
}

if [ -n "${TIERD_LAB_MODULES:-}" ]; then
    mkdir -p /lib/modules && mount --bind "$TIERD_LAB_MODULES" /lib/modules
fi
if [ "${TIERD_LAB_INIT:-shell}" = systemd ]; then
    write_lab_units
    # systemd logs to the journal as on a real host (tests read it there);
    # journald copies notices and worse to the lab console.
    mkdir -p /run/systemd/journald.conf.d
    printf '[Journal]\nForwardToConsole=yes\nTTYPath=/dev/console\nMaxLevelConsole=notice\n' \
        > /run/systemd/journald.conf.d/lab-console.conf
    exec /lib/systemd/systemd --unit=lab.target --show-status=no --log-level=notice
fi
run_cmd
# PID 1 must not exit before the power-off lands, and nothing may be loaded
# from the 9p root once it starts: block on a FIFO (tmpfs) with builtins only.
mkfifo /run/lab-halt
echo o > /proc/sysrq-trigger
read -r _ < /run/lab-halt

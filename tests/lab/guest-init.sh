#!/bin/sh
# PID 1 of the lab guest, on the overlay of the host root: finish the
# mounts a normal boot would make, run /lab-out/cmd, save its exit code and
# the kernel log to the results share, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null

. /lab-out/env
if [ -n "${TIERD_LAB_MODULES:-}" ]; then
    mkdir -p /lib/modules && mount --bind "$TIERD_LAB_MODULES" /lib/modules
fi
echo "lab-guest: $(uname -r) up in $(cut -d' ' -f1 /proc/uptime) s"
cd "$TIERD_LAB_CWD" || cd /
sh /lab-out/cmd
echo $? > /lab-out/rc
dmesg > /lab-out/dmesg
sync
echo o > /proc/sysrq-trigger
sleep 30

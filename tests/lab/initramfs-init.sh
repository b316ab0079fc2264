#!/bin/busybox sh
# /init of the lab's initramfs: mount the host root (read-only, virtio-9p)
# under a tmpfs overlay so the guest may write anywhere without touching the
# host, mount the rw results share, and hand over to guest-init.sh.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() { echo "lab-initramfs: $*"; echo o > /proc/sysrq-trigger; sleep 10; }

# Stock kernels need their 9p/overlay modules; the tierd kernel has them built in.
if [ -f /modules/order ]; then
    while read -r m; do insmod "/modules/$m" || fail "insmod $m"; done < /modules/order
fi

opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /lower /rw /newroot
mount -t 9p -o "$opts,cache=loose,ro" hostroot /lower || fail "cannot mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "cannot mount the overlay root"
mkdir -p /newroot/lab-out
mount -t 9p -o "$opts" labout /newroot/lab-out || fail "cannot mount the results share"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /lab-out/guest-init.sh

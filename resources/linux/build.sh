#!/usr/bin/env bash
# Builds the Linux test guest from Debian's packages (no other downloads):
#   build/vmlinuz            the kernel of linux-image-cloud-amd64 (a bzImage)
#   build/initramfs.cpio.gz  busybox-static plus the virtio modules, whose /init
#                            prints WISP-LINUX-INIT-OK and powers off
# Usage: resources/linux/build.sh   (OUT=dir to build elsewhere)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/build}
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ "$out/initramfs.cpio.gz" -nt "$here/build.sh" ]; then
  exit 0
fi
for tool in apt-get dpkg-deb cpio gzip; do
  command -v "$tool" >/dev/null || { echo "build.sh: '$tool' is missing (apt-get install cpio)" >&2; exit 1; }
done
dl="$out/dl"
rm -rf "$dl" "$out/root"
mkdir -p "$dl" "$out/root"
cd "$dl"
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
apt-get download -q "$kpkg" busybox-static >/dev/null
dpkg-deb -x "$(ls "$kpkg"_*.deb)" kernel
dpkg-deb -x "$(ls busybox-static_*.deb)" busybox
cp kernel/boot/vmlinuz-* "$out/vmlinuz"

root="$out/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules,mnt}
cp busybox/bin/busybox "$root/bin/busybox"
kver=$(ls kernel/lib/modules)
# virtio transport, block and net drivers, in load order.
mods="virtio virtio_ring virtio_mmio virtio_blk failover net_failover virtio_net"
for m in $mods; do
  f=$(find "kernel/lib/modules/$kver" -name "$m.ko*" | head -1)
  if [ -n "$f" ]; then
    case "$f" in
      *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
      *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
      *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
  fi
done
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio virtio_ring virtio_mmio virtio_blk failover net_failover virtio_net; do
  [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
echo "WISP-LINUX-INIT-OK cpus=$(grep -c ^processor /proc/cpuinfo)"
# Optional test script from the command line: wisp.test=NAME runs /tests/NAME.
for arg in $(cat /proc/cmdline); do
  case "$arg" in wisp.test=*) t=${arg#wisp.test=}; [ -x "/tests/$t" ] && "/tests/$t" ;; esac
done
poweroff -f
INIT
chmod +x "$root/init"
mkdir -p "$root/tests"
# wisp.test=blk: the first disk holds the test pattern; write a marker sector and read it back.
cat > "$root/tests/blk" <<'T'
#!/bin/sh
[ -b /dev/vda ] || { echo "WISP-LINUX-BLK-FAIL no /dev/vda"; exit 1; }
echo "WISP-LINUX-BLK-SIZE $(cat /sys/block/vda/size)"
printf 'wisp-linux-was-here' | dd of=/dev/vda bs=512 seek=2048 conv=fsync,notrunc 2>/dev/null
got=$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 19)
[ "$got" = "wisp-linux-was-here" ] && echo "WISP-LINUX-BLK-OK" || echo "WISP-LINUX-BLK-FAIL read back '$got'"
T
# wisp.test=net: bring up eth0 with wisp.ip=A/N and ping wisp.peer=B three times.
cat > "$root/tests/net" <<'T'
#!/bin/sh
for arg in $(cat /proc/cmdline); do
  case "$arg" in wisp.ip=*) ip=${arg#wisp.ip=};; wisp.peer=*) peer=${arg#wisp.peer=};; esac
done
ip link set eth0 up && ip addr add "$ip" dev eth0
ping -c 3 -W 5 "$peer" && echo "WISP-LINUX-NET-OK" || echo "WISP-LINUX-NET-FAIL"
T
chmod +x "$root/tests/blk" "$root/tests/net"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz"
rm -rf "$dl" "$root"
echo "Linux guest: $out/vmlinuz ($kpkg), $out/initramfs.cpio.gz"

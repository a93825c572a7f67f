#!/usr/bin/env bash
# Builds the Linux test guest from Debian's packages (no other downloads):
#   build/vmlinuz            the kernel of linux-image-cloud-amd64 (a bzImage)
#   build/vmlinux            the same kernel as an ELF (PVH entry), unpacked
#                            from the bzImage's payload
#   build/initramfs.cpio.gz  busybox-static, the virtio, ACPI button and evdev
#                            modules, init (this folder's `init`) and the test
#                            scripts of tests/ (run with wisp.test=NAME,...)
#   build/modules/           the kernel's modules (for the nested tier's L1)
# Usage: resources/linux/build.sh   (OUT=dir to build elsewhere)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/build}
stamp="$out/.stamp"
newest=$(find "$here/build.sh" "$here/init" "$here/tests" -newer "$stamp" 2>/dev/null | head -1 || true)
if [ -s "$stamp" ] && [ -z "$newest" ] && [ -s "$out/vmlinux" ] && [ -s "$out/initramfs.cpio.gz" ]; then
  exit 0
fi
for tool in apt-get apt-cache dpkg-deb cpio gzip lz4 od; do
  command -v "$tool" >/dev/null || { echo "build.sh: '$tool' is missing (apt-get install cpio lz4)" >&2; exit 1; }
done
dl="$out/dl"
rm -rf "$dl" "$out/root" "$out/modules"
mkdir -p "$dl" "$out/root" "$out/modules"
cd "$dl"
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1 \
  || { echo "build.sh: apt-get download $kpkg busybox-static failed" >&2; exit 1; }
dpkg-deb -x "$(ls "$kpkg"_*.deb)" kernel
dpkg-deb -x "$(ls busybox-static_*.deb)" busybox
cp kernel/boot/vmlinuz-* "$out/vmlinuz"
kver=$(ls kernel/lib/modules)
cp -r "kernel/lib/modules/$kver/kernel" "$out/modules/"
cp busybox/bin/busybox "$out/busybox"

# The bzImage's payload (setup header: setup_sects at 0x1f1, payload_offset
# at 0x248, payload_length at 0x24c) is the LZ4-compressed ELF vmlinux.
rd() { od -An -t "u$2" -j "$1" -N "$2" "$out/vmlinuz" | tr -d ' '; }
setup_sects=$(rd $((0x1f1)) 1)
[ "$setup_sects" -eq 0 ] && setup_sects=4
start=$(( (setup_sects + 1) * 512 + $(rd $((0x248)) 4) ))
dd if="$out/vmlinuz" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$(rd $((0x24c)) 4)" status=none \
  | lz4 -dc > "$out/vmlinux" 2>/dev/null || true   # lz4 complains about the appended size word
[ "$(head -c 4 "$out/vmlinux" | od -An -t x1 | tr -d ' ')" = 7f454c46 ] \
  || { echo "build.sh: could not unpack an ELF vmlinux from the bzImage" >&2; exit 1; }

root="$out/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules,mnt,tmp,etc}
cp busybox/bin/busybox "$root/bin/busybox"
# Drivers in load order (each after what it depends on).
mods="virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net button evdev"
for m in $mods; do
  f=$(find "kernel/lib/modules/$kver" -name "$m.ko*" | head -1)
  [ -n "$f" ] || { echo "build.sh: module $m not found in $kpkg" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
echo "$mods" | tr ' ' '\n' > "$root/lib/modules/load-order"
install -m 0755 "$here/init" "$root/init"
mkdir -p "$root/tests"
cp -p "$here"/tests/* "$root/tests/"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz"
rm -rf "$dl" "$root"
echo "$kpkg" > "$stamp"
echo "Linux guest: $out/vmlinuz and $out/vmlinux ($kpkg), $out/initramfs.cpio.gz"

#!/usr/bin/env bash
# Builds the nested tier's L1 from Debian packages (through
# resources/linux/build.sh, which fetches the same kernel and busybox):
#   build/l1-initramfs.cpio  busybox, kvm/kvm-amd, tun, bridge and loop
#                            modules, and this folder's `init`
# L1's kernel is resources/linux/build/vmlinuz. The test harness
# (tests/nested.rs) appends a second cpio holding /job (wisp, its libraries,
# the L2 guest and job/) and boots it all under qemu-system-x86_64 -accel tcg.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/build}
linux=$here/../linux/build
"$here/../linux/build.sh" >/dev/null
stamp="$out/.stamp"
if [ -s "$out/l1-initramfs.cpio" ] && [ -z "$(find "$here/build.sh" "$here/init" "$linux/.stamp" -newer "$stamp" 2>/dev/null)" ]; then
  exit 0
fi
command -v cpio >/dev/null || { echo "nested/build.sh: cpio is missing" >&2; exit 1; }
root="$out/root"
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules,tmp,run,mnt}
cp "$linux/busybox" "$root/bin/busybox"
mods="virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd drivers/net/tun net/llc/llc net/802/stp net/bridge/bridge drivers/block/loop"
for m in $mods; do
  cp "$linux/modules/kernel/$m.ko" "$root/lib/modules/" \
    || { echo "nested/build.sh: module $m missing" >&2; exit 1; }
  basename "$m" >> "$root/lib/modules/load-order"
done
install -m 0755 "$here/init" "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/l1-initramfs.cpio"
rm -rf "$root"
date > "$stamp"
echo "Nested L1: $out/l1-initramfs.cpio (kernel $linux/vmlinuz)"

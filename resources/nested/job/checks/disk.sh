# limit: 500
# Disks: ext4 on raw and qcow2 written, remounted and verified from L1 byte
# for byte; a read-only disk; flush; discard (fstrim) freeing space in both;
# a qcow2 overlay over a raw base.
. "$JOB/lib.sh"
cd "$WORK" || exit 1
$W image convert -f qcow2 -O raw $JOB/images/ext4.qcow2 fs.raw || { fail disk-setup "convert"; exit 0; }
cp $JOB/images/ext4.qcow2 fs.qcow2
dd if=/dev/zero of=ro.raw bs=1M count=16 2>/dev/null
printf 'wisp-read-only-disk' | dd of=ro.raw conv=notrunc 2>/dev/null
dd if=/dev/zero of=base.raw bs=1M count=16 2>/dev/null
printf 'wisp-base-image' | dd of=base.raw conv=notrunc 2>/dev/null
ro_sum=$(md5sum ro.raw | cut -d' ' -f1); base_sum=$(md5sum base.raw | cut -d' ' -f1)
$W image create -f qcow2 -b base.raw -F raw overlay.qcow2 >/dev/null || { fail disk-setup "overlay"; exit 0; }
disks="--disk path=fs.raw --disk path=fs.qcow2,format=qcow2 --disk path=ro.raw,readonly=on --disk path=overlay.qcow2,format=qcow2"
args="wisp.fs=vda,vdb wisp.ro=vdc wisp.backing=vdd"
rc=$(run_l2 disk-write 240 --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=fswrite,ro,backing $args" --memory 256M $disks --metrics-path "$WORK/disk-write.metrics")
[ "$rc" = 0 ] || fail disk-write "wisp exited $rc"

# ext4 on raw and qcow2: the guest's md5 of /data matches the image's.
verify_fs() { # name image guest-dev
  sum=$(grep "WISP-LINUX-FSWRITE-OK $3 " disk-write.log | tr -d '\r' | awk '{print $3}')
  mkdir -p /mnt/v && mount -o loop,ro "$2" /mnt/v 2>/dev/null || { fail "$1" "cannot mount $2 in L1"; return; }
  host=$(md5sum /mnt/v/data | cut -d' ' -f1); umount /mnt/v
  [ -n "$sum" ] && [ "$sum" = "$host" ]; verdict "$1" $? "guest=$sum host=$host"
}
verify_fs disk-ext4-raw fs.raw vda
$W image convert -f qcow2 -O raw fs.qcow2 fs-qcow2-as.raw && verify_fs disk-ext4-qcow2 fs-qcow2-as.raw vdb
rm -f fs-qcow2-as.raw
$W image check fs.qcow2 >check.out 2>&1; rc=$?; [ "$rc" = 0 ]; verdict disk-qcow2-check $? "wisp image check exit $rc: $(tr '\n' ' ' <check.out)"

# Read-only: the guest saw it read-only, its write failed, the image is unchanged.
now=$(md5sum ro.raw | cut -d' ' -f1)
grep -q 'WISP-LINUX-RO-OK vdc' disk-write.log && [ "$now" = "$ro_sum" ]; verdict disk-readonly $? "image $now (was $ro_sum)"

# Flush: the guest drives a write-back cache (so it sends flushes), and
# wisp's final metrics line counts flushes that reached both ext4 disks.
wc=$(grep -c 'WISP-LINUX-WCACHE vd[ab] write back' disk-write.log)
flushed=$(tail -1 disk-write.metrics 2>/dev/null | grep -o '"flushes":[0-9]*' | grep -vc ':0$')
[ "$wc" = 2 ] && [ "$flushed" -ge 2 ] && grep -q 'WISP-LINUX-FSWRITE-OK vdb' disk-write.log
verdict disk-flush $? "write-back disks seen by the guest: $wc; disks with flushes in wisp's metrics: $flushed"

# Backing chain: read through the overlay, write lands in the overlay only.
$W image convert -f qcow2 -O raw overlay.qcow2 ov.raw
ov=$(dd if=ov.raw bs=512 skip=1 count=1 2>/dev/null | head -c 18); rm -f ov.raw
now=$(md5sum base.raw | cut -d' ' -f1)
grep -q WISP-LINUX-BACKING-OK disk-write.log && [ "$ov" = wisp-overlay-write ] && [ "$now" = "$base_sum" ]
verdict disk-backing $? "overlay sector 1 '$ov', base $now (was $base_sum)"

# Discard: delete the 48 MiB filler and fstrim; raw gets holes, qcow2 frees clusters.
clusters() { $W image check "$1" 2>&1 | grep -o '[0-9]* allocated clusters' | cut -d' ' -f1; }
raw_before=$(alloc_kib fs.raw); q_before=$(clusters fs.qcow2)
rc=$(run_l2 disk-trim 240 --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=fstrim wisp.fs=vda,vdb" --memory 256M \
  --disk path=fs.raw --disk path=fs.qcow2,format=qcow2 --metrics-path "$WORK/disk-trim.metrics")
discarded=$(tail -1 disk-trim.metrics 2>/dev/null | grep -o '"discards":[0-9]*' | grep -vc ':0$')
raw_after=$(alloc_kib fs.raw); q_after=$(clusters fs.qcow2)
[ "$rc" = 0 ] && grep -q 'WISP-LINUX-FSTRIM-OK vda' disk-trim.log && [ $((raw_before - raw_after)) -ge 40000 ] && [ "$discarded" = 2 ]
verdict disk-discard-raw $? "allocated ${raw_before} -> ${raw_after} KiB; disks with discards in wisp's metrics: $discarded"
# 64 KiB clusters: the 48 MiB filler held 768 of them.
[ "$rc" = 0 ] && grep -q 'WISP-LINUX-FSTRIM-OK vdb' disk-trim.log && [ $((${q_before:-0} - ${q_after:-0})) -ge 600 ]
verdict disk-discard-qcow2 $? "allocated clusters ${q_before} -> ${q_after}"
$W image check fs.qcow2 >check.out 2>&1; rc=$?; [ "$rc" = 0 ]; verdict disk-qcow2-check-after-trim $? "exit $rc: $(tr '\n' ' ' <check.out)"

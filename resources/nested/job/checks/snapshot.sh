# limit: 600
# Snapshots: a guest with a disk and a NIC on a bridge (pinging the bridge
# and writing its disk every second) is snapshotted (full), restored in a new
# wisp process, then snapshotted again as a diff on top of the full one and
# restored again; after each restore its network and disk keep working.
. "$JOB/lib.sh"
bridge_up
cd "$WORK" || exit 1
dd if=/dev/zero of=snap-disk.raw bs=1M count=16 2>/dev/null
cat > snap.json <<J
{
  "boot-source": {"kernel_image_path": "$L2/vmlinuz", "initrd_path": "$L2/initramfs.cpio.gz",
                  "boot_args": "$CMDLINE wisp.test=alive wisp.disk=vda $GUEST_NET"},
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "track_dirty_pages": true},
  "drives": [{"drive_id": "d0", "path_on_host": "$WORK/snap-disk.raw", "is_root_device": false, "is_read_only": false}],
  "network-interfaces": [{"iface_id": "n0", "host_dev_name": "wtap1", "bridge": "br0"}]
}
J
start_l2 snapshot-source --config-file snap.json --api-sock "$WORK/snap-a.sock"
if ! wait_log snapshot-source 'WISP-LINUX-ALIVE 3 net=ok disk=ok' 180; then
  kill -9 $PID; fail snapshot-full "guest never alive with network and disk before the snapshot"; exit 0
fi
$W ctl --api-sock snap-a.sock pause && $W ctl --api-sock snap-a.sock snapshot create --snapshot-path full.snap --mem-file-path vm.mem \
  || { fail snapshot-full "snapshot create failed"; kill -9 $PID; exit 0; }
at=$(last_round snapshot-source)
$W ctl --api-sock snap-a.sock stop; wait_exit $PID 30

start_l2 snapshot-restored --restore full.snap --mem vm.mem --api-sock "$WORK/snap-b.sock"
i=0; while [ "$(alive_since snapshot-restored "$at")" -lt 3 ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
n=$(alive_since snapshot-restored "$at")
[ "$n" -ge 3 ]; verdict snapshot-full $? "$n rounds with net and disk ok after restoring round $at; last: $(grep WISP-LINUX-ALIVE snapshot-restored.log | tail -1)"

# Diff on top of the full memory file (the restored VM tracks dirty pages
# only if asked; this one was restored from a VM that did).
$W ctl --api-sock snap-b.sock pause && $W ctl --api-sock snap-b.sock snapshot create --snapshot-path diff.snap --mem-file-path vm.mem --diff \
  >diff.out 2>&1
if [ $? -ne 0 ]; then
  fail snapshot-diff "diff snapshot create failed: $(tr '\n' ' ' <diff.out)"; $W ctl --api-sock snap-b.sock stop; wait_exit $PID 30; exit 0
fi
at=$(last_round snapshot-restored)
$W ctl --api-sock snap-b.sock stop; wait_exit $PID 30
start_l2 snapshot-diff-restored --restore diff.snap --mem vm.mem --api-sock "$WORK/snap-c.sock"
i=0; while [ "$(alive_since snapshot-diff-restored "$at")" -lt 3 ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
n=$(alive_since snapshot-diff-restored "$at")
[ "$n" -ge 3 ]; verdict snapshot-diff $? "$n rounds with net and disk ok after restoring round $at; last: $(grep WISP-LINUX-ALIVE snapshot-diff-restored.log | tail -1)"
$W ctl --api-sock snap-c.sock stop; wait_exit $PID 30
rm -f vm.mem

# limit: 600
# Live migration over unix: and then tcp: (back the other way) while the
# guest streams from the bridge's HTTP server and writes its disk; after
# each migration the receiver's guest keeps its network and disk.
. "$JOB/lib.sh"
bridge_up
cd "$WORK" || exit 1
dd if=/dev/urandom of="$WORK/www/big" bs=1M count=16 2>/dev/null
dd if=/dev/zero of=mig-disk.raw bs=1M count=32 2>/dev/null
vm="--cpus 2 --memory 512M --disk path=$WORK/mig-disk.raw --net tap=wtap2,bridge=br0"
start_l2 migration-source $vm --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=alive wisp.disk=vda wisp.stream=1 $GUEST_NET" --api-sock "$WORK/mig-a.sock"
SRC=$PID
if ! wait_log migration-source 'WISP-LINUX-ALIVE 3 net=ok disk=ok' 180; then
  kill -9 $SRC; fail migration-unix "guest never alive before the migration"; fail migration-tcp "not run"; exit 0
fi
migrate() { # name from-log from-sock from-pid to-log to-sock uri
  start_l2 "$5" $vm --incoming "$7" --api-sock "$WORK/$6"
  DST=$PID
  i=0; while [ $i -lt 50 ]; do
    case "$7" in unix:*) [ -S "${7#unix:}" ] && break ;; tcp:*) netstat -ltn 2>/dev/null | grep -q ":${7##*:} " && break ;; esac
    sleep 0.2; i=$((i + 1))
  done
  $W ctl --api-sock "$WORK/$3" migrate --to "$7" >"$1.out" 2>&1
  mrc=$?
  at=$(last_round "$2")
  wait_exit "$4" 60; src_rc=$RC
  i=0; while [ "$(alive_since "$5" "$at")" -lt 3 ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
  n=$(alive_since "$5" "$at")
  [ "$mrc" = 0 ] && [ "$src_rc" = 0 ] && [ "$n" -ge 3 ]
  verdict "$1" $? "migrate exit $mrc ($(tr '\n' ' ' <"$1.out")), source exit $src_rc, $n rounds ok on the receiver after round $at; last: $(grep WISP-LINUX-ALIVE "$5.log" | tail -1)"
}
migrate migration-unix migration-source mig-a.sock $SRC migration-dest-unix mig-b.sock "unix:$WORK/mig.sock"
migrate migration-tcp migration-dest-unix mig-b.sock $DST migration-dest-tcp mig-c.sock "tcp:127.0.0.1:6001"
$W ctl --api-sock mig-c.sock stop; wait_exit $DST 30

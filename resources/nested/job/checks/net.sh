# limit: 500
# Network: ping both ways over a TAP on a bridge, then 64 MiB each way by
# HTTP, verified by md5 on both ends.
. "$JOB/lib.sh"
bridge_up
dd if=/dev/urandom of="$WORK/www/blob" bs=1M count=64 2>/dev/null
host_sum=$(md5sum "$WORK/www/blob" | cut -d' ' -f1)
rm -f "$WORK/www/done"
start_l2 net --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=netbulk $GUEST_NET" \
  --memory 512M --net tap=wtap0,bridge=br0
if ! wait_log net WISP-LINUX-NETBULK-READY 180; then
  kill -9 $PID; fail net-ping-out "guest never ready"; exit 0
fi
grep -q WISP-LINUX-PING-OK "$WORK/net.log"; verdict net-ping-out $? "guest pinged 10.77.0.1"
ping -c 3 -W 5 10.77.0.2 >/dev/null; verdict net-ping-in $? "L1 pinged 10.77.0.2"
guest_sum=$(marker_arg net WISP-LINUX-NETBULK-READY 1)
got=$(wget -q -O - http://10.77.0.2:8080/blob | md5sum | cut -d' ' -f1)
[ -n "$guest_sum" ] && [ "$got" = "$guest_sum" ]; verdict net-bulk-guest-to-host $? "guest $guest_sum, received $got"
touch "$WORK/www/done"
wait_log net WISP-LINUX-NETBULK-RX 300
rx=$(marker_arg net WISP-LINUX-NETBULK-RX 1)
[ "$rx" = "$host_sum" ]; verdict net-bulk-host-to-guest $? "sent $host_sum, guest received $rx"
wait_exit $PID 120; rc=$RC
[ "$rc" = 0 ] && grep -q WISP-LINUX-NETBULK-OK "$WORK/net.log"; verdict net-exit $? "rc=$rc"
rm -f "$WORK/www/blob"

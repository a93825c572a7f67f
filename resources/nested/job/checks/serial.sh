# limit: 200
# Serial console input: wisp's stdin is L1's console (a terminal); when the
# guest asks, this script says NESTED-TYPE-NOW on the console and the harness
# types a line into QEMU's serial port, which reaches the guest through wisp.
. "$JOB/lib.sh"
[ -c /dev/console ] && [ "$JOB" = /job ] || { echo "NESTED-CHECK serial-input SKIP no L1 console to type on"; exit 0; }
"$W" run --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=serialin" \
  >"$WORK/serial-input.log" 2>"$WORK/serial-input.err" </dev/console &
PID=$!
wait_log serial-input WISP-LINUX-SERIAL-WAIT 120 && echo "NESTED-TYPE-NOW"
wait_exit $PID 150; rc=$RC
got=$(marker_arg serial-input WISP-LINUX-SERIAL-IN-OK 1)
[ "$rc" = 0 ] && [ "$got" = "wisp-serial-input" ]
verdict serial-input $? "rc=$rc got=$got"

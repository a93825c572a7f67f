# limit: 500
# Lifecycle: Ctrl-Alt-Del, the ACPI power button (acpid in the guest), a
# guest reboot and a guest poweroff each end wisp with status 0.
. "$JOB/lib.sh"
boot() { # log test
  start_l2 "$1" --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=$2" --api-sock "$WORK/$1.sock"
}
boot lifecycle-ctrl-alt-del idle
if wait_log lifecycle-ctrl-alt-del WISP-LINUX-IDLE 120; then
  $W ctl --api-sock "$WORK/lifecycle-ctrl-alt-del.sock" ctrl-alt-del
  wait_exit $PID 60; rc=$RC
  [ "$rc" = 0 ] && grep -q 'reboot: Restarting system' "$WORK/lifecycle-ctrl-alt-del.log"
  verdict lifecycle-ctrl-alt-del $? "rc=$rc (the guest must log 'reboot: Restarting system')"
else
  kill -9 $PID; fail lifecycle-ctrl-alt-del "guest never idle"
fi

boot lifecycle-power-button acpid
if wait_log lifecycle-power-button WISP-LINUX-ACPID-READY 120; then
  $W ctl --api-sock "$WORK/lifecycle-power-button.sock" shutdown --timeout 60
  wait_exit $PID 90; rc=$RC
  [ "$rc" = 0 ] && grep -q WISP-LINUX-POWER-BUTTON-OK "$WORK/lifecycle-power-button.log"
  verdict lifecycle-power-button $? "rc=$rc"
else
  kill -9 $PID; fail lifecycle-power-button "acpid never ready"
fi

rc=$(run_l2 lifecycle-reboot 240 --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=reboot")
grep -q WISP-LINUX-REBOOTING "$WORK/lifecycle-reboot.log" && grep -q 'reboot: Restarting system' "$WORK/lifecycle-reboot.log" && [ "$rc" = 0 ]
verdict lifecycle-reboot $? "rc=$rc"

rc=$(run_l2 lifecycle-poweroff 240 --kernel $L2/vmlinuz --initrd $L2/initramfs.cpio.gz)
grep -q WISP-LINUX-DONE "$WORK/lifecycle-poweroff.log" && grep -q 'reboot: Power down' "$WORK/lifecycle-poweroff.log" && [ "$rc" = 0 ]
verdict lifecycle-poweroff $? "rc=$rc"

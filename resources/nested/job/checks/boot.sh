# limit: 400
# Boot: a bzImage and a vmlinux ELF; 1, 2 and 4 vCPUs; 128 MiB, 1 GiB and
# 4 GiB (with RAM above 4 GiB visible); each powers off (wisp exits 0).
. "$JOB/lib.sh"
boot_case() { # name kernel cpus mem min_kib max_kib high
  rc=$(run_l2 "$1" 240 --kernel "$2" --initrd $L2/initramfs.cpio.gz --cmdline "$CMDLINE wisp.test=boot" --cpus "$3" --memory "$4")
  cpus=$(field "$1" WISP-LINUX-BOOT cpus)
  kib=$(field "$1" WISP-LINUX-BOOT mem_kib)
  high=$(field "$1" WISP-LINUX-BOOT high)
  detail="rc=$rc cpus=$cpus mem_kib=$kib high=$high"
  if [ "$rc" = 0 ] && [ "$cpus" = "$3" ] && [ "${kib:-0}" -ge "$5" ] && [ "${kib:-0}" -le "$6" ] \
     && [ "$high" = "$7" ] && grep -q WISP-LINUX-DONE "$WORK/$1.log" && grep -q 'reboot: Power down' "$WORK/$1.log"; then
    pass "$1" "$detail"
  else
    fail "$1" "$detail"
  fi
}
boot_case boot-bzimage-1cpu-128m $L2/vmlinuz 1 128M 80000 131072 no
boot_case boot-elf-2cpu-1g $L2/vmlinux 2 1G 900000 1048576 no
boot_case boot-bzimage-4cpu-4g $L2/vmlinuz 4 4G 3800000 4194304 yes

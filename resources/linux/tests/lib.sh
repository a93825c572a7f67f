# Helpers for the guest's test scripts (sourced).
# arg NAME: the value of wisp.NAME=VALUE on the kernel command line.
arg() {
  for a in $(cat /proc/cmdline); do
    case "$a" in "wisp.$1="*) echo "${a#wisp.$1=}"; return 0 ;; esac
  done
  return 1
}
ok() { echo "WISP-LINUX-$1-OK${2:+ $2}"; }
fail() { echo "WISP-LINUX-$1-FAIL${2:+ $2}"; }
# net_up: eth0 up with wisp.ip=A/N.
net_up() {
  ip link set lo up
  ip link set eth0 up && ip addr add "$(arg ip)" dev eth0
}

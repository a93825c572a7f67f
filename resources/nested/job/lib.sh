# Helpers for the nested tier's checks, sourced by run.sh inside L1.
# Every check reports `NESTED-CHECK <name> PASS|FAIL <detail>`; the test
# harness (tests/nested.rs) asserts on those lines and on the L2 logs, which
# run.sh prints between NESTED-LOG-BEGIN/END lines.
JOB=${JOB:-/job}
W=${WISP:-$JOB/wisp}
L2=$JOB/l2
WORK=${WORK:-/tmp/work}
# wisp's default kernel command line; checks only append wisp.* arguments.
CMDLINE="console=ttyS0 reboot=k panic=1"
mkdir -p "$WORK"

pass() { echo "NESTED-CHECK $1 PASS${2:+ $2}"; }
fail() { echo "NESTED-CHECK $1 FAIL${2:+ $2}"; }
# check NAME CONDITION-DESCRIPTION: passes if the last command succeeded.
verdict() { if [ "$2" = 0 ]; then pass "$1" "$3"; else fail "$1" "$3"; fi; }

# run_l2 LOG TIMEOUT ARGS...: runs `wisp run ARGS` in the foreground with the
# guest console in $WORK/LOG.log; prints the exit status.
run_l2() {
  log=$1 t=$2; shift 2
  timeout "$t" "$W" run "$@" </dev/null >"$WORK/$log.log" 2>"$WORK/$log.err"
  rc=$?
  echo "$rc" >"$WORK/$log.rc"
  echo "$rc"
}
# start_l2 LOG ARGS...: starts `wisp run ARGS` in the background; sets PID.
start_l2() {
  log=$1; shift
  "$W" run "$@" </dev/null >"$WORK/$log.log" 2>"$WORK/$log.err" &
  PID=$!
}
# wait_log LOG PATTERN SECONDS: waits until the guest console shows PATTERN.
wait_log() {
  i=0
  while ! grep -q "$2" "$WORK/$1.log" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -gt $(($3 * 5)) ] && return 1
    sleep 0.2
  done
}
# wait_exit PID SECONDS: waits for a background wisp and sets RC to its exit
# status (124 when it had to be killed). Call it in this shell, not in $(...):
# only the parent can reap the child.
wait_exit() {
  i=0
  while kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; do
    i=$((i + 1))
    if [ "$i" -gt $(($2 * 5)) ]; then kill -9 "$1" 2>/dev/null; wait "$1" 2>/dev/null; RC=124; return; fi
    sleep 0.2
  done
  wait "$1"; RC=$?
}
# field LOG MARKER KEY: the value of KEY=... on the last MARKER line.
field() { grep "$2" "$WORK/$1.log" | tail -1 | tr ' ' '\n' | sed -n "s/^$3=//p" | tr -d '\r'; }
# marker_arg LOG MARKER N: the Nth word after MARKER on its last line.
marker_arg() { grep "$2" "$WORK/$1.log" | tail -1 | tr -d '\r' | sed "s/.*$2//" | awk "{print \$$3}"; }
# alloc_kib FILE: the space FILE occupies (not its length).
alloc_kib() { du -k "$1" | cut -f1; }
# bridge_up: br0 at 10.77.0.1/24, with an HTTP server on port 8080 serving
# $WORK/www (the peer of the network checks; nothing leaves L1).
bridge_up() {
  ip link show br0 >/dev/null 2>&1 && return 0
  ip link add br0 type bridge && ip addr add 10.77.0.1/24 dev br0 && ip link set br0 up
  mkdir -p "$WORK/www"
  httpd -p 10.77.0.1:8080 -h "$WORK/www"
}
GUEST_NET="wisp.ip=10.77.0.2/24 wisp.peer=10.77.0.1"
# alive_ok LOG N: the guest reported N consecutive rounds with network and
# disk working after the last line that matched "$ALIVE_AFTER" (a round number).
alive_since() {
  grep 'WISP-LINUX-ALIVE' "$WORK/$1.log" | tr -d '\r' | awk -v from="$2" '$2 > from && /net=ok disk=ok/ {n++} END {print n + 0}'
}
last_round() { grep 'WISP-LINUX-ALIVE' "$WORK/$1.log" | tail -1 | awk '{print $2}'; }

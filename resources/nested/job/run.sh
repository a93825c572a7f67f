#!/bin/sh
# Runs the checks listed in $JOB/checks.list (one name a line, from
# $JOB/checks/NAME.sh), each under a time limit, then prints every L2 log.
# JOB defaults to /job (inside L1); the harness sets it when it runs the
# checks directly on a VMX/SVM host.
export JOB=${JOB:-/job}
cd "$JOB" || exit 1
. "$JOB/lib.sh"
export WORK
for c in $(cat "$JOB/checks.list"); do
  echo "NESTED-BEGIN $c $(cut -d' ' -f1 /proc/uptime)"
  limit=$(sed -n 's/^# limit: //p' "$JOB/checks/$c.sh")
  timeout "${limit:-300}" sh "$JOB/checks/$c.sh" || echo "NESTED-CHECK $c FAIL script ended with status $? (limit ${limit:-300} s)"
  echo "NESTED-END $c $(cut -d' ' -f1 /proc/uptime)"
done
for f in "$WORK"/*.log "$WORK"/*.err; do
  [ -f "$f" ] || continue
  echo "NESTED-LOG-BEGIN $(basename "$f")"
  cat "$f"
  echo "NESTED-LOG-END $(basename "$f")"
done

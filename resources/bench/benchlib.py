# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the wisp-vs-QEMU benchmarks (boot.py, snapshot.py,
migration.py): where things are, building what is missing, summaries."""

import os
import shutil
import statistics
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_WISP = os.path.join(REPO, "target", "release", "wisp")
DEFAULT_GUEST = os.path.join(REPO, "resources", "guest", "build", "wisp-guest.elf")
MIB = 1 << 20


def ensure_built(a, prog):
    """Builds wisp and the test guest if the defaults are missing, resolves
    a.qemu, makes the paths absolute and checks /dev/kvm; exits naming `prog`
    on any problem."""
    if a.wisp == DEFAULT_WISP and not os.path.exists(a.wisp):
        print("building wisp (cargo build --release -p vmm) ...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "-p", "vmm"], cwd=REPO, check=True)
    if a.guest == DEFAULT_GUEST and not os.path.exists(a.guest):
        print("building the test guest (make -C resources/guest) ...", file=sys.stderr)
        subprocess.run(["make", "-C", os.path.join(REPO, "resources", "guest")], check=True)
    q = shutil.which(a.qemu)
    if q is None:
        sys.exit(f"{prog}: QEMU not found: {a.qemu}")
    a.qemu = q
    for what, p in (("wisp", a.wisp), ("guest", a.guest)):
        if not os.path.exists(p):
            sys.exit(f"{prog}: {what} not found: {p}")
    a.wisp = os.path.abspath(a.wisp)
    a.guest = os.path.abspath(a.guest)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit(f"{prog}: /dev/kvm not accessible")


def summary(vals):
    """(median, min, max) of the numbers in `vals` (NaN and non-numbers are
    skipped); NaNs if none."""
    vals = [v for v in vals if isinstance(v, (int, float)) and v == v]
    if not vals:
        nan = float("nan")
        return nan, nan, nan
    return statistics.median(vals), min(vals), max(vals)

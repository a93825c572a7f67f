# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the wisp-vs-QEMU benchmarks (boot.py, snapshot.py,
migration.py): where things are, building what is missing, summaries."""

import argparse
import os
import re
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


class RunError(Exception):
    """A benchmark run failed (the VMM misbehaved or the guest reported FAIL)."""


def parse_size(s):
    """A guest memory size such as 128M or 1G, in bytes (whole MiB, >= 16M)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)(?:i?B)?\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 128M, 1G)")
    mult = {"": MIB, "k": 1 << 10, "m": MIB, "g": 1 << 30}[m.group(2).lower()]
    n = int(m.group(1)) * mult
    if n < 16 * MIB or n % MIB:
        raise argparse.ArgumentTypeError(f"{s!r}: need a whole number of MiB >= 16M")
    return n


def print_failures(fails):
    """Lists failed runs (first line of each), if any."""
    if fails:
        print()
        print(f"{len(fails)} run(s) FAILED:")
        for f in fails:
            print(f"  {f.splitlines()[0]}")

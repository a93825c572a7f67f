#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Boot benchmark: wisp vs QEMU `-M microvm` on the wisp test guest.

For each round, both VMMs boot the same guest (order alternates per round so
host drift hits both alike) and we record:

  * timed run   : wall time from spawn to the first byte on the serial console
                  (the child's stdout pipe, read unbuffered) and to process
                  exit (guest ACPI power-off -> VMM exits);
  * memory probe: the same guest with `exit=halt`, so the VM stays up after
                  booting; once it has printed `halting` we read VmHWM and the
                  RSS of the guest-RAM mapping from /proc/PID/{status,smaps},
                  then SIGTERM it.  RSS overhead = VmHWM - guest RAM resident.

See resources/bench/README.md for why the peak RSS is not taken from
wait4()'s ru_maxrss.  Exits non-zero only if a run fails (bad exit status,
timeout, guest test failure), never because a goal is missed.
"""

import argparse
import os
import re
import select
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402  (helpers shared by the benchmarks)
    DEFAULT_GUEST, DEFAULT_WISP, MIB, RunError, ensure_built, parse_size,
    summary,
)

# Goals (wisp vs QEMU microvm).
GOAL_TIME_RATIO = 0.5
GOAL_OVERHEAD_MIB = 3.0


# ---------------------------------------------------------------------------
# VMM command lines


def wisp_cmd(a, mem, cmdline):
    return [a.wisp, "run", "--kernel", a.guest, "--cpus", str(a.cpus),
            "--memory", f"{mem // MIB}M", "--cmdline", cmdline, "--serial", "stdio"]


def qemu_cmd(a, mem, cmdline):
    return [a.qemu, "-M", "microvm,acpi=on", "-accel", "kvm",
            "-m", f"{mem // MIB}M", "-smp", str(a.cpus),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio", "-kernel", a.guest, "-append", cmdline]


VMMS = [("wisp", wisp_cmd), ("qemu", qemu_cmd)]


# ---------------------------------------------------------------------------
# Spawning and reading


class Child:
    """A VMM process with stdout on a pipe and stderr in a temp file."""

    def __init__(self, argv, tmpdir):
        r, w = os.pipe()  # both O_CLOEXEC; dup2 onto fd 1 clears it there
        self.errfile = tempfile.NamedTemporaryFile(dir=tmpdir, prefix="stderr-", delete=False)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_DUP2, self.errfile.fileno(), 2),
        ]
        self.t0 = time.perf_counter()
        self.pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        os.close(w)
        self.fd = r
        self.out = bytearray()
        self.t_first = None
        self.t_last = None
        self.eof = False
        self.status = None

    def read_until(self, deadline, stop=None):
        """Read stdout until EOF, `stop` (bytes) seen, or deadline (-> RunError)."""
        p = select.poll()
        p.register(self.fd, select.POLLIN | select.POLLHUP)
        while not self.eof and not (stop and stop in self.out):
            left = deadline - time.perf_counter()
            if left <= 0:
                raise RunError("timed out")
            if not p.poll(left * 1000):
                continue
            chunk = os.read(self.fd, 65536)
            now = time.perf_counter()
            if not chunk:
                self.eof = True
            else:
                if self.t_first is None:
                    self.t_first = now
                self.t_last = now
                self.out += chunk

    def reap(self, deadline):
        while True:
            pid, st, _ru = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise RunError("timed out waiting for exit")
            time.sleep(0.0005)

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.status = -9

    def close(self):
        os.close(self.fd)
        self.errfile.close()
        try:
            with open(self.errfile.name, "rb") as f:
                self.err = f.read()
        finally:
            os.unlink(self.errfile.name)

    def describe(self):
        tail = lambda b: b.decode(errors="replace").strip()[-600:]
        return f"stdout: ...{tail(self.out)!r}\nstderr: ...{tail(self.err)!r}"


def timed_run(a, name, mkcmd, tmpdir):
    argv = mkcmd(a, a.memory, f"tests={a.tests} expect_cpus={a.cpus}")
    c = Child(argv, tmpdir)
    try:
        # Block in wait4 right after EOF: the VMM closes its fds while exiting.
        c.read_until(c.t0 + a.timeout)
        t_exit = c.reap(c.t0 + a.timeout)
    except RunError as e:
        c.kill()
        c.close()
        raise RunError(f"{name}: {e}\n{c.describe()}")
    c.close()
    out = c.out.decode(errors="replace")
    if c.status != 0 or "FAIL" in out or " 0 failed" not in out or "powering off" not in out \
            or "poweroff failed" in out:
        raise RunError(f"{name}: exit status {c.status}, guest output not a clean "
                       f"pass + power-off\n{c.describe()}")
    return {"first_ms": (c.t_first - c.t0) * 1e3, "last_ms": (c.t_last - c.t0) * 1e3,
            "exit_ms": (t_exit - c.t0) * 1e3, "teardown_ms": (t_exit - c.t_last) * 1e3}


def read_status(pid):
    with open(f"/proc/{pid}/status") as f:
        kv = dict(l.split(":", 1) for l in f if ":" in l)
    kib = lambda k: int(kv[k].split()[0])
    return {k: kib(k) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")}


def guest_ram_kib(pid, mem):
    """RSS (KiB) of the mapping(s) backing guest RAM.

    Guest RAM is the large writable non-file mapping(s): anonymous (private or
    shared), memfd or /dev/zero.  Writable non-file mappings of >= 32 MiB
    (or >= the guest size if smaller) are summed; their total size must be the
    guest size (+ at most 16 MiB of alignment/ROM), else the split is unknown.
    """
    floor = min(32 * MIB, mem)
    total_size = rss = 0
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5].strip() if len(parts) > 5 else ""
                inode = parts[4]
                nonfile = (inode == "0" or path.startswith(("/memfd:", "/dev/zero"))
                           or path.startswith("[anon"))
                cur = (hi - lo) if ("w" in parts[1] and nonfile and hi - lo >= floor) else None
                if cur:
                    total_size += cur
            elif cur and line.startswith("Rss:"):
                rss += int(line.split()[1])
    if not (mem <= total_size <= mem + 16 * MIB):
        return None
    return rss


def probe_run(a, name, mkcmd, tmpdir, mem):
    argv = mkcmd(a, mem, f"tests={a.tests} expect_cpus={a.cpus} exit=halt")
    c = Child(argv, tmpdir)
    try:
        c.read_until(c.t0 + a.timeout, stop=b"wisp-guest: halting")
        if b"wisp-guest: halting" not in c.out:
            raise RunError("exited before the guest halted")
        time.sleep(a.settle)  # let the VMM finish handling the guest's last exits
        st = read_status(c.pid)
        guest = guest_ram_kib(c.pid, mem)
        os.kill(c.pid, signal.SIGTERM)
        c.read_until(time.perf_counter() + 10)
        c.reap(time.perf_counter() + 10)
    except (RunError, OSError) as e:
        c.kill()
        c.close()
        raise RunError(f"{name} (memory probe): {e}\n{c.describe()}")
    c.close()
    out = c.out.decode(errors="replace")
    if "FAIL" in out or " 0 failed" not in out:
        raise RunError(f"{name} (memory probe): guest test failed\n{c.describe()}")
    r = {"hwm_mib": st["VmHWM"] / 1024, "file_mib": st["RssFile"] / 1024,
         "rss_mib": st["VmRSS"] / 1024}
    if guest is None:
        print(f"  warning: {name}: could not identify the guest-RAM mapping "
              f"({mem // MIB} MiB); overhead not computed", file=sys.stderr)
        r.update(guest_mib=float("nan"), overhead_mib=float("nan"))
    else:
        r.update(guest_mib=guest / 1024, overhead_mib=(st["VmHWM"] - guest) / 1024)
    return r


# ---------------------------------------------------------------------------
# Setup


# ---------------------------------------------------------------------------
# Report


def fmt(v, unit):
    return "n/a" if v != v else (f"{v:.1f}" if unit == "ms" else f"{v:.2f}")


def report(a, res, big):
    rows = [
        ("first serial byte", "ms", "first_ms", "time"),
        ("exit (power-off)", "ms", "exit_ms", "time"),
        ("  last serial byte", "ms", "last_ms", None),
        ("  last byte -> exit", "ms", "teardown_ms", None),
        ("peak RSS (VmHWM)", "MiB", "hwm_mib", None),
        ("  guest RAM resident", "MiB", "guest_mib", None),
        ("  file-backed RSS", "MiB", "file_mib", None),
        ("VMM RSS overhead", "MiB", "overhead_mib", "rss"),
    ]
    print()
    print(f"boot benchmark: {a.rounds} rounds, {a.cpus} vCPU(s), {a.memory // MIB} MiB, "
          f"guest tests={a.tests}")
    print(f"  wisp: {a.wisp}")
    print(f"  qemu: {a.qemu} -M microvm,acpi=on -accel kvm")
    print(f"  guest: {a.guest}")
    print()
    hdr = (f"{'metric':<22} {'unit':<4} | {'wisp median [min-max]':<25} | "
           f"{'qemu median [min-max]':<25} | {'wisp/qemu':>9} | goal")
    print(hdr)
    print("-" * len(hdr))
    for label, unit, key, goal in rows:
        cells = []
        meds = {}
        for name, _ in VMMS:
            m, lo, hi = summary([r[key] for r in res[name]])
            meds[name] = m
            cells.append(f"{fmt(m, unit):>8} [{fmt(lo, unit)}-{fmt(hi, unit)}]")
        q = meds["qemu"]
        ratio = meds["wisp"] / q if q == q and q else float("nan")
        if goal == "time":
            g = f"<= {GOAL_TIME_RATIO}x qemu: " + ("met" if ratio <= GOAL_TIME_RATIO else "MISSED")
        elif goal == "rss":
            g = f"wisp <= {GOAL_OVERHEAD_MIB:g} MiB: " + (
                "met" if meds["wisp"] <= GOAL_OVERHEAD_MIB else "MISSED")
        else:
            g = ""
        rs = "n/a" if ratio != ratio else f"{ratio:.2f}"
        print(f"{label:<22} {unit:<4} | {cells[0]:<25} | {cells[1]:<25} | {rs:>9} | {g}")
    if big:
        print()
        print(f"memory scaling (one memory probe each at {a.memory // MIB} MiB vs "
              f"{a.big_memory // MIB} MiB guest):")
        for name, _ in VMMS:
            s, b = big[name]
            print(f"  {name:<5} peak RSS {s['hwm_mib']:6.2f} -> {b['hwm_mib']:6.2f} MiB, "
                  f"guest RAM resident {fmt(s['guest_mib'], 'MiB')} -> {fmt(b['guest_mib'], 'MiB')}, "
                  f"overhead {fmt(s['overhead_mib'], 'MiB')} -> {fmt(b['overhead_mib'], 'MiB')}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="rounds per VMM (default 10)")
    p.add_argument("--cpus", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--memory", type=parse_size, default=128 * MIB, help="guest RAM (default 128M)")
    p.add_argument("--wisp", default=DEFAULT_WISP, help="wisp binary (built if the default is missing)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument("--guest", default=DEFAULT_GUEST, help="guest ELF (built if the default is missing)")
    p.add_argument("--tests", default="cmdline", help="guest tests= list (default cmdline)")
    p.add_argument("--big-memory", type=lambda v: 0 if v.strip() == "0" else parse_size(v), default=1024 * MIB,
                   help="guest RAM of the extra scaling probe (default 1G; 0 to skip)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per VMM first (default 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-run timeout in s (default 60)")
    p.add_argument("--settle", type=float, default=0.2,
                   help="wait after the guest halts before reading RSS (default 0.2 s)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every run")
    a = p.parse_args()
    if a.rounds < 1 or a.cpus < 1:
        p.error("--rounds and --cpus must be >= 1")
    ensure_built(a, "boot.py")

    failures = 0
    res = {name: [] for name, _ in VMMS}
    with tempfile.TemporaryDirectory(prefix="wisp-bench-") as tmp:
        try:
            for _ in range(a.warmup):
                for name, mk in VMMS:
                    timed_run(a, name, mk, tmp)
            for rnd in range(a.rounds):
                order = VMMS if rnd % 2 == 0 else VMMS[::-1]
                row = {}
                for name, mk in order:
                    row[name] = timed_run(a, name, mk, tmp)
                for name, mk in order:
                    row[name].update(probe_run(a, name, mk, tmp, a.memory))
                for name, _ in VMMS:
                    res[name].append(row[name])
                if a.verbose:
                    print(f"round {rnd + 1}: " + "  ".join(
                        f"{n}: first {row[n]['first_ms']:.1f} ms last {row[n]['last_ms']:.1f} ms exit {row[n]['exit_ms']:.1f} ms "
                        f"hwm {row[n]['hwm_mib']:.2f} MiB" for n, _ in VMMS), file=sys.stderr)
                else:
                    print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
            big = None
            if a.big_memory:
                big = {}
                for name, mk in VMMS:
                    big[name] = (res[name][-1], probe_run(a, name, mk, tmp, a.big_memory))
        except RunError as e:
            print(f"boot.py: run failed: {e}", file=sys.stderr)
            failures += 1
    if all(res[n] for n, _ in VMMS):
        report(a, res, big if not failures else None)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Snapshot benchmark: wisp vs QEMU `-M microvm` on the wisp test guest.

For each guest memory size and round, both VMMs boot the test guest running
`tests=tick` with a memory pattern (a fraction of RAM touched, verified by the
guest itself), pause it, save it, and restore it twice in fresh processes:

  * create : wisp PATCH /vm Paused + PUT /snapshot/create (request -> 204);
             QEMU QMP stop + migrate "exec:cat > FILE" (request -> completed,
             and + fsync of the file, since wisp's create includes an fsync);
  * restore: wisp PUT /snapshot/load into a waiting `wisp run --api-sock`
             (request -> 204, and -> first new `tick` line); QEMU
             `-incoming defer` + QMP migrate-incoming (request -> RESUME event,
             and -> first new `tick`); and from process start: `wisp run
             --restore` vs `qemu ... -incoming "exec:cat FILE"` (spawn -> tick).

Every restored guest must continue with the next tick number, run through at
least one full pattern verification and print no FAIL.  A plain write+fsync of
the bytes wisp wrote gives the disk speed of the same run.  Exits non-zero only
if a run fails, never because a goal is missed.  See resources/bench/README.md.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402  (helpers shared by the benchmarks)
    DEFAULT_GUEST, DEFAULT_WISP, MIB, RunError, ensure_built, parse_size,
    print_failures, summary,
)

# Goals (from the snapshot issue).
GOAL_RESTORE_MS = 5.0        # wisp load request -> 204, at every memory size
GOAL_DISK_FRACTION = 0.8     # wisp's written MB/s >= 0.8 x write+fsync MB/s of the disk

TICK_RE = re.compile(rb"(?m)^tick (\d+) ok\r?\n")  # complete lines only


def parse_sizes(s):
    return [parse_size(x) for x in s.split(",") if x.strip()]


def pattern_mib(a, mem):
    """Touched MiB for a guest of `mem` bytes: `--touch` is N% of RAM or N MiB."""
    t = a.touch.strip()
    if t.endswith("%"):
        k = int(mem // MIB * float(t[:-1]) / 100)
    else:
        k = int(t.rstrip("MmiB"))
    k = max(1, min(k, mem // MIB - 12))  # the guest needs 10 MiB + K MiB (+ slack)
    return k


# ---------------------------------------------------------------------------
# Processes: stdout (the serial console) read by a thread, every chunk timestamped


class Child:
    def __init__(self, argv, tmpdir, name):
        self.name = name
        r, w = os.pipe()
        self.errfile = tempfile.NamedTemporaryFile(dir=tmpdir, prefix="stderr-", delete=False)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_DUP2, self.errfile.fileno(), 2),
        ]
        self.buf = bytearray()
        self.marks = []          # (end offset, perf_counter) per chunk read
        self.eof = False
        self.cv = threading.Condition()
        self.status = None
        self.t0 = time.perf_counter()
        self.pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        os.close(w)
        self.fd = r
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()

    def _reader(self):
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                chunk = b""
            now = time.perf_counter()
            with self.cv:
                if not chunk:
                    self.eof = True
                else:
                    self.buf += chunk
                    self.marks.append((len(self.buf), now))
                self.cv.notify_all()
            if not chunk:
                return

    def arrival(self, end):
        """When the byte at offset end-1 was read."""
        for off, t in self.marks:
            if off >= end:
                return t
        return None

    def wait_for(self, pred, deadline, what):
        """Waits until pred(bytes) returns a non-None value; returns it."""
        with self.cv:
            while True:
                v = pred(bytes(self.buf))
                if v is not None:
                    return v
                if b"FAIL" in self.buf:
                    raise RunError(f"{self.name}: guest FAIL while waiting for {what}")
                if self.eof:
                    raise RunError(f"{self.name}: VMM exited while waiting for {what}")
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise RunError(f"{self.name}: timed out waiting for {what}")
                self.cv.wait(min(left, 0.5))

    def snapshot(self):
        with self.cv:
            return bytes(self.buf)

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, st = os.waitpid(self.pid, 0)
            self.status = st
        self.thread.join(5)
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.errfile.close()
        try:
            with open(self.errfile.name, "rb") as f:
                self.err = f.read()
        finally:
            os.unlink(self.errfile.name)

    def describe(self):
        tail = lambda b: b.decode(errors="replace").strip()[-600:]
        return (f"  stdout: ...{tail(self.snapshot())!r}\n"
                f"  stderr: ...{tail(getattr(self, 'err', b''))!r}")


def wait_socket(path, deadline, child):
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
        pid, st = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            child.status = st
        if child.eof or pid:
            raise RunError(f"{child.name}: exited before its socket {path} came up")
        if time.perf_counter() > deadline:
            raise RunError(f"{child.name}: socket {path} did not come up")
        time.sleep(0.002)


# ---------------------------------------------------------------------------
# wisp API (HTTP/1.1 on a Unix socket) and QMP


class WispApi(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.sock_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.sock_path)
        self.sock = s

    def call(self, method, url, body):
        """Sends one request on the (already connected) socket; returns
        (status, body, t_sent, t_answered)."""
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        self.request(method, url, body=data, headers={"Content-Type": "application/json"})
        r = self.getresponse()
        out = r.read()
        return r.status, out, t0, time.perf_counter()


def wisp_call(api, method, url, body, name):
    st, out, t0, t1 = api.call(method, url, body)
    if st != 204:
        raise RunError(f"{name}: {method} {url} -> {st} {out.decode(errors='replace')}")
    return t0, t1


class Qmp:
    def __init__(self, sock, timeout):
        sock.settimeout(timeout)
        self.sock = sock
        self.events = []
        self.rbuf = b""
        greet = self._read()
        if "QMP" not in greet:
            raise RunError(f"qmp: unexpected greeting {greet}")
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.rbuf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RunError("qmp: connection closed")
            self.rbuf += chunk
        line, self.rbuf = self.rbuf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append((time.perf_counter(), r["event"]))
                continue
            if "error" in r:
                raise RunError(f"qmp {name}: {r['error']}")
            return r.get("return")

    def wait_event(self, name, deadline):
        while True:
            for t, e in self.events:
                if e == name:
                    return t
            self.sock.settimeout(max(0.001, deadline - time.perf_counter()))
            try:
                r = self._read()
            except socket.timeout:
                raise RunError(f"qmp: timed out waiting for event {name}")
            if "event" in r:
                self.events.append((time.perf_counter(), r["event"]))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Guest output checks


def last_tick(out):
    ticks = TICK_RE.findall(out)
    return int(ticks[-1]) if ticks else None


def tail_fragment(out):
    """The unfinished last line of the source's console (a restored guest completes it)."""
    i = out.rfind(b"\n")
    return out[i + 1:]


def next_tick_after(child, frag, start, n_expected, deadline, verify_every):
    """Waits for the restored guest's first tick line (returns its arrival time),
    checks it is `n_expected`, then waits until a full verification ran after it."""
    def first(buf):
        text = frag + buf[start:]
        m = TICK_RE.search(text)
        if not m:
            return None
        return int(m.group(1)), m.end() - len(frag) + start
    n, end = child.wait_for(first, deadline, "the first tick after restore")
    t = child.arrival(max(end, start + 1))
    if n != n_expected:
        raise RunError(f"{child.name}: first tick after restore is {n}, want {n_expected}")
    # One verification of the whole pattern happens every verify_every ticks.
    want = n_expected + max(verify_every, 1)
    child.wait_for(lambda b: True if (last_tick(frag + b[start:]) or 0) >= want else None,
                   deadline, f"tick {want} (pattern verified after restore)")
    if b"FAIL" in child.snapshot():
        raise RunError(f"{child.name}: guest printed FAIL after restore")
    return t


def st_alloc(path):
    return os.stat(path).st_blocks * 512


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# wisp


def wisp_base(a, d, tag):
    return [a.wisp, "run", "--serial", "stdio", "--runtime-dir", os.path.join(d, "run"),
            "--level", "Info", "--log-path", os.path.join(d, f"wisp-{tag}.log")]


def read_log(d, tag):
    try:
        with open(os.path.join(d, f"wisp-{tag}.log"), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def run_wisp(a, d, mem, cmdline):
    r = {}
    snap = os.path.join(d, "wisp.snap")
    memf = os.path.join(d, "wisp.mem")
    dl = lambda: time.perf_counter() + a.timeout
    # Source VM.
    sock = os.path.join(d, "wisp-src.sock")
    c = Child(wisp_base(a, d, "src") + ["--api-sock", sock, "--kernel", a.guest,
                                       "--memory", f"{mem // MIB}M", "--cmdline", cmdline],
              d, "wisp source")
    try:
        wait_socket(sock, dl(), c).close()
        c.wait_for(lambda b: True if (last_tick(b) or 0) >= 2 else None, dl(), "tick 2")
        api = WispApi(sock, a.timeout)
        api.connect()
        wisp_call(api, "PATCH", "/vm", {"state": "Paused"}, c.name)
        time.sleep(0.05)  # console output of the last instructions before the pause
        out = c.snapshot()
        n = last_tick(out)
        frag = tail_fragment(out)
        t0, t1 = wisp_call(api, "PUT", "/snapshot/create",
                           {"snapshot_type": "Full", "snapshot_path": snap,
                            "mem_file_path": memf}, c.name)
        api.close()
    except (RunError, OSError) as e:
        c.kill()
        raise RunError(f"{e}\n{c.describe()}\n{read_log(d, 'src')[-600:]}")
    c.kill()
    r["create_ms"] = (t1 - t0) * 1e3
    log = read_log(d, "src")
    m = re.search(r"(\d+) bytes of memory written .* in ([\d.]+) ms", log)
    r["written"] = int(m.group(1)) if m else float("nan")
    r["create_log_ms"] = float(m.group(2)) if m else float("nan")
    r["mem_alloc"] = st_alloc(memf)
    r["state_size"] = os.stat(snap).st_size
    # Disk speed right after the create: write+fsync of as many bytes as wisp wrote.
    nbytes = r["written"] if r["written"] == r["written"] else r["mem_alloc"]
    r["disk_mbs"] = disk_speed(d, nbytes)
    r["dd_mbs"] = dd_speed(d, nbytes)
    if a.cold:
        drop_cache(memf)
        drop_cache(snap)

    # Restore 1: PUT /snapshot/load into a waiting VMM.
    sock2 = os.path.join(d, "wisp-dst.sock")
    c = Child(wisp_base(a, d, "dst") + ["--api-sock", sock2], d, "wisp restore (API)")
    try:
        wait_socket(sock2, dl(), c).close()
        api = WispApi(sock2, a.timeout)
        api.connect()
        start = len(c.snapshot())
        t0, t1 = wisp_call(api, "PUT", "/snapshot/load",
                           {"snapshot_path": snap,
                            "mem_backend": {"backend_type": "File", "backend_path": memf},
                            "resume_vm": True}, c.name)
        t2 = next_tick_after(c, frag, start, n + 1, dl(), a.verify_every)
        api.close()
    except (RunError, OSError) as e:
        c.kill()
        raise RunError(f"{e}\n{c.describe()}\n{read_log(d, 'dst')[-600:]}")
    c.kill()
    r["load_ms"] = (t1 - t0) * 1e3
    r["load_tick_ms"] = (t2 - t0) * 1e3
    m = re.search(r"restored in ([\d.]+) ms", read_log(d, "dst"))
    r["load_log_ms"] = float(m.group(1)) if m else float("nan")
    if a.cold:
        drop_cache(memf)
        drop_cache(snap)

    # Restore 2: a new process with --restore.
    c = Child(wisp_base(a, d, "cli") + ["--restore", snap, "--mem", memf], d,
              "wisp restore (--restore)")
    try:
        t2 = next_tick_after(c, frag, 0, n + 1, c.t0 + a.timeout, a.verify_every)
    except (RunError, OSError) as e:
        c.kill()
        raise RunError(f"{e}\n{c.describe()}\n{read_log(d, 'cli')[-600:]}")
    c.kill()
    r["spawn_tick_ms"] = (t2 - c.t0) * 1e3

    for p in (snap, memf):
        os.unlink(p)
    return r


def disk_speed(d, nbytes):
    path = os.path.join(d, "disk.bin")
    block = os.urandom(MIB)
    left = nbytes
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while left > 0:
            left -= os.write(fd, block[:min(left, MIB)])
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    os.unlink(path)
    os.sync()  # let the unlink's discards (ext4 -o discard) happen now, untimed
    return nbytes / 1e6 / dt


def dd_speed(d, nbytes):
    """dd if=/dev/zero of=F bs=1M count=N oflag=direct: the device without the page cache."""
    path = os.path.join(d, "dd.bin")
    n = max(1, -(-int(nbytes) // MIB))
    t0 = time.perf_counter()
    p = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={n}",
                        "oflag=direct", "status=none"], capture_output=True)
    dt = time.perf_counter() - t0
    if os.path.exists(path):
        os.unlink(path)
    os.sync()
    if p.returncode != 0:
        return float("nan")
    return n * MIB / 1e6 / dt


# ---------------------------------------------------------------------------
# QEMU


def qemu_base(a, mem, cmdline, qmp=None):
    argv = [a.qemu, "-M", "microvm,acpi=on", "-accel", "kvm", "-m", f"{mem // MIB}M",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", a.guest, "-append", cmdline]
    if qmp:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv


def run_qemu(a, d, mem, cmdline):
    r = {}
    mig = os.path.join(d, "qemu.mig")
    dl = lambda: time.perf_counter() + a.timeout
    q1 = os.path.join(d, "qmp-src.sock")
    c = Child(qemu_base(a, mem, cmdline, q1), d, "qemu source")
    try:
        qmp = Qmp(wait_socket(q1, dl(), c), a.timeout)
        c.wait_for(lambda b: True if (last_tick(b) or 0) >= 2 else None, dl(), "tick 2")
        # QEMU 7.2 limits migration to 32 MiB/s by default; a save to a file should not be.
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        qmp.cmd("stop")
        time.sleep(0.05)
        out = c.snapshot()
        n = last_tick(out)
        frag = tail_fragment(out)
        t0 = time.perf_counter()
        qmp.cmd("migrate", uri=f"exec:cat > {mig}")
        while True:
            st = qmp.cmd("query-migrate")
            if st.get("status") == "completed":
                t1 = time.perf_counter()
                break
            if st.get("status") in ("failed", "cancelled"):
                raise RunError(f"qemu: migration {st.get('status')}: {st}")
            if time.perf_counter() > t0 + a.timeout:
                raise RunError("qemu: migration timed out")
            time.sleep(0.001)
        fd = os.open(mig, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        t2 = time.perf_counter()
        qmp.close()
    except (RunError, OSError) as e:
        c.kill()
        raise RunError(f"{e}\n{c.describe()}")
    c.kill()
    r["create_ms"] = (t1 - t0) * 1e3
    r["create_sync_ms"] = (t2 - t0) * 1e3
    r["written"] = os.stat(mig).st_size
    r["mem_alloc"] = st_alloc(mig)
    if a.cold:
        drop_cache(mig)

    # Restore 1: -incoming defer, then QMP migrate-incoming and cont.
    q2 = os.path.join(d, "qmp-dst.sock")
    c = Child(qemu_base(a, mem, cmdline, q2) + ["-incoming", "defer"], d, "qemu restore (QMP)")
    try:
        qmp = Qmp(wait_socket(q2, dl(), c), a.timeout)
        start = len(c.snapshot())
        t0 = time.perf_counter()
        qmp.cmd("migrate-incoming", uri=f"exec:cat {mig}")
        t1 = qemu_cont(qmp, dl())
        t2 = next_tick_after(c, frag, start, n + 1, dl(), a.verify_every)
        qmp.close()
    except (RunError, OSError) as e:
        c.kill()
        raise RunError(f"{e}\n{c.describe()}")
    c.kill()
    r["load_ms"] = (t1 - t0) * 1e3
    r["load_tick_ms"] = (t2 - t0) * 1e3
    if a.cold:
        drop_cache(mig)

    # Restore 2: a new process with -incoming "exec:cat FILE" (+ QMP cont).
    q3 = os.path.join(d, "qmp-cli.sock")
    c = Child(qemu_base(a, mem, cmdline, q3) + ["-incoming", f"exec:cat {mig}"], d,
              "qemu restore (-incoming)")
    try:
        qmp = Qmp(wait_socket(q3, c.t0 + a.timeout, c), a.timeout)
        qemu_cont(qmp, c.t0 + a.timeout)
        t2 = next_tick_after(c, frag, 0, n + 1, c.t0 + a.timeout, a.verify_every)
        qmp.close()
    except (RunError, OSError) as e:
        c.kill()
        raise RunError(f"{e}\n{c.describe()}")
    c.kill()
    r["spawn_tick_ms"] = (t2 - c.t0) * 1e3
    os.unlink(mig)
    return r


def qemu_cont(qmp, deadline):
    """Waits for the incoming migration to finish, then resumes the VM (the source
    was stopped, and QEMU carries that run state over, so the destination stays
    paused even without -S).  Returns when the RESUME event arrived."""
    while True:
        st = qmp.cmd("query-status").get("status")
        if st != "inmigrate":
            break
        if time.perf_counter() > deadline:
            raise RunError("qemu: incoming migration timed out")
        time.sleep(0.0005)
    if st not in ("paused", "postmigrate", "running"):
        raise RunError(f"qemu: after incoming migration the VM is {st!r} "
                       f"({qmp.cmd('query-migrate')})")
    if st != "running":
        qmp.cmd("cont")
    return qmp.wait_event("RESUME", deadline)


VMMS = [("wisp", run_wisp), ("qemu", run_qemu)]


# ---------------------------------------------------------------------------
# Setup and report


def fmt(v, unit):
    if v != v:
        return "n/a"
    if unit in ("MiB",):
        return f"{v:.1f}"
    if unit == "MB/s":
        return f"{v:.0f}"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def derive(r, mem):
    r = dict(r)
    r["mem_mbs"] = mem / 1e6 / (r["create_ms"] / 1e3)
    r["wr_mbs"] = r["written"] / 1e6 / (r["create_ms"] / 1e3)
    r["written_mib"] = r["written"] / MIB
    r["alloc_mib"] = r["mem_alloc"] / MIB
    r.setdefault("create_sync_ms", r["create_ms"])  # wisp's create already fsyncs
    return r


ROWS = [
    # label, unit, key, ratio?
    ("create: request -> done", "ms", "create_ms", True),
    ("create: durable (+fsync qemu)", "ms", "create_sync_ms", True),
    ("  MB/s of guest memory", "MB/s", "mem_mbs", True),
    ("  MB/s written", "MB/s", "wr_mbs", True),
    ("  bytes written", "MiB", "written_mib", True),
    ("  file allocated (st_blocks)", "MiB", "alloc_mib", True),
    ("  wisp log: dump time", "ms", "create_log_ms", False),
    ("  disk write+fsync, same size", "MB/s", "disk_mbs", False),
    ("  disk dd oflag=direct, same size", "MB/s", "dd_mbs", False),
    ("restore: load req -> 204/RESUME", "ms", "load_ms", True),
    ("  wisp log: restored in", "ms", "load_log_ms", False),
    ("restore: load req -> next tick", "ms", "load_tick_ms", True),
    ("restore: spawn -> next tick", "ms", "spawn_tick_ms", True),
]


def report(a, results, fails):
    print()
    print(f"snapshot benchmark: {a.rounds} round(s) per size, 1 vCPU, tick_ms={a.tick_ms} "
          f"verify_every={a.verify_every}, touched={a.touch}{' , cold page cache' if a.cold else ''}")
    print(f"  wisp: {a.wisp}")
    print(f"  qemu: {a.qemu} -M microvm,acpi=on -accel kvm (migration to exec:cat, "
          f"max-bandwidth unlimited)")
    print(f"  guest: {a.guest}")
    print(f"  files in: {a.dir or tempfile.gettempdir()}")
    goals = []
    for mem in a.sizes:
        res = {name: [derive(r, mem) for r in results[mem][name]] for name, _ in VMMS}
        print()
        print(f"== guest {mem // MIB} MiB, pattern {pattern_mib(a, mem)} MiB touched "
              f"({len(res['wisp'])} wisp / {len(res['qemu'])} qemu good rounds) ==")
        hdr = (f"{'metric':<34} {'unit':<4} | {'wisp median [min-max]':<24} | "
               f"{'qemu median [min-max]':<24} | wisp/qemu")
        print(hdr)
        print("-" * len(hdr))
        meds = {}
        for label, unit, key, ratio in ROWS:
            cells = []
            for name, _ in VMMS:
                m, lo, hi = summary([r.get(key, float("nan")) for r in res[name]])
                meds[(name, key)] = m
                cells.append(f"{fmt(m, unit):>7} [{fmt(lo, unit)}-{fmt(hi, unit)}]"
                             if m == m else "-")
            w, q = meds[("wisp", key)], meds[("qemu", key)]
            rs = f"{w / q:.2f}" if ratio and w == w and q == q and q else ""
            print(f"{label:<34} {unit:<4} | {cells[0]:<24} | {cells[1]:<24} | {rs:>9}")
        load = meds[("wisp", "load_ms")]
        wr, disk = meds[("wisp", "wr_mbs")], meds[("wisp", "disk_mbs")]
        goals.append((mem, load, wr, disk))
    print()
    print("goals:")
    for mem, load, wr, disk in goals:
        g1 = "n/a" if load != load else ("met" if load < GOAL_RESTORE_MS else "MISSED")
        g2 = "n/a" if wr != wr or disk != disk else (
            "met" if wr >= GOAL_DISK_FRACTION * disk else "MISSED")
        print(f"  {mem // MIB:>5} MiB: restore (load request -> 204) {fmt(load, 'ms')} ms "
              f"< {GOAL_RESTORE_MS:g} ms: {g1};  create {fmt(wr, 'MB/s')} MB/s written vs disk "
              f"{fmt(disk, 'MB/s')} MB/s (>= {GOAL_DISK_FRACTION:g}x): {g2}")
    print_failures(fails)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds per size (default 5)")
    p.add_argument("--sizes", type=parse_sizes, default=[128 * MIB, 1024 * MIB, 4096 * MIB],
                   help="guest memory sizes, comma-separated (default 128M,1G,4G)")
    p.add_argument("--touch", default="10%",
                   help="guest memory pattern: N%% of RAM or N (MiB) (default 10%%)")
    p.add_argument("--tick-ms", type=int, default=5, help="guest tick period (default 5)")
    p.add_argument("--verify-every", type=int, default=5,
                   help="guest verifies the pattern every N ticks (default 5)")
    p.add_argument("--wisp", default=DEFAULT_WISP, help="wisp binary (built if the default is missing)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument("--guest", default=DEFAULT_GUEST, help="guest ELF (built if the default is missing)")
    p.add_argument("--dir", default=None, help="directory for snapshot files (default: $TMPDIR)")
    p.add_argument("--cold", action="store_true",
                   help="evict snapshot files from the page cache before each restore")
    p.add_argument("--timeout", type=float, default=120.0, help="per step, in s (default 120)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every run")
    a = p.parse_args()
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    for mem in a.sizes:
        if mem // MIB < 24:
            p.error("sizes must be >= 24M (the tick guest needs 10 MiB + its pattern)")
    ensure_built(a, "snapshot.py")

    results = {mem: {name: [] for name, _ in VMMS} for mem in a.sizes}
    fails = []
    with tempfile.TemporaryDirectory(prefix="wisp-snapbench-", dir=a.dir) as tmp:
        for mem in a.sizes:
            k = pattern_mib(a, mem)
            cmdline = (f"tests=tick tick_ms={a.tick_ms} pattern_mib={k} "
                       f"verify_every={a.verify_every}")
            for rnd in range(a.rounds):
                order = VMMS if rnd % 2 == 0 else VMMS[::-1]
                for name, fn in order:
                    d = os.path.join(tmp, f"{name}-{mem // MIB}-{rnd}")
                    os.mkdir(d)
                    try:
                        r = fn(a, d, mem, cmdline)
                        results[mem][name].append(r)
                        if a.verbose:
                            print(f"{mem // MIB}M round {rnd} {name}: "
                                  + ", ".join(f"{k2}={v:.2f}" for k2, v in r.items()),
                                  file=sys.stderr)
                    except (RunError, OSError) as e:
                        msg = f"{mem // MIB}M round {rnd} {name}: {e}"
                        print(f"FAILED: {msg}", file=sys.stderr)
                        fails.append(msg)
                    finally:
                        shutil.rmtree(d, ignore_errors=True)
                        os.sync()  # the unlinks' discards before the next timed step
    report(a, results, fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()

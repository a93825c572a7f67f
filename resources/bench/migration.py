#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Live-migration benchmark: wisp vs QEMU `-M microvm` on the wisp test guest.

Both VMMs run the same 1 GiB test guest (`tests=tick`, a memory pattern the
guest rewrites and verifies itself) and migrate it on the same host to a
receiver started the same way, over `unix:` and/or `tcp:` loopback:

  * idle : pattern_mib=8, 1 dirty page per 10 ms tick (~0.4 MiB/s);
  * busy : pattern_mib=256, 256 dirty pages per 5 ms tick (~200 MiB/s),
           max_downtime_ms (wisp) = downtime-limit (QEMU) = --max-downtime.

wisp: `wisp run --incoming URI` receiver, source `PUT /migration/send`, progress
from `GET /migration` (polled), totals from the source's log line `migrated to
URI: B bytes in T ms, downtime D ms`.  QEMU: receiver `-incoming defer` + QMP
migrate-incoming, source migrate-set-parameters (downtime-limit, max-bandwidth
1 TiB/s) + migrate, polled query-migrate (total-time, downtime, ram.transferred,
ram.dirty-sync-count).  A run that does not converge (wisp gives up by itself;
QEMU is cancelled after --converge-timeout s) is recorded as not converged.

Each receiver must print the tick right after the source's last one, then run a
full pattern verification, and no FAIL.  A raw socket copy of 1 GiB (Python
sendall between two processes) gives the link bandwidth of the same run.  Exits
non-zero only if a run fails, never because a goal is missed.  See
resources/bench/README.md.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from snapshot import (  # noqa: E402  (shared helpers of the snapshot benchmark)
    TICK_RE, Child, Qmp, WispApi, last_tick, next_tick_after,
    qemu_base, qemu_cont, read_log, tail_fragment, wait_socket, wisp_base,
)
from benchlib import (  # noqa: E402
    DEFAULT_GUEST, DEFAULT_WISP, MIB, RunError, ensure_built, print_failures, summary,
)

MEM = 1024 * MIB
GOAL_IDLE_DOWNTIME_MS = 10.0
GOAL_TOTAL_FACTOR = 1.25     # total <= 1.25 x (guest RAM / link bandwidth)

SCENARIOS = {
    # name: (cmdline args, ticks to wait for before migrating, verify_every)
    "idle": ("tick_ms=10 pattern_mib=8 dirty_pages_per_tick=1", 20, 20),
    "busy": ("tick_ms=5 pattern_mib=256 dirty_pages_per_tick=256", 100, 100),
}

MIGRATED_RE = re.compile(r"migrated to \S+: (\d+) bytes in ([\d.]+) ms, downtime ([\d.]+) ms")
RECEIVED_RE = re.compile(r"migration received: (\d+) pages in ([\d.]+) ms")


def cmdline_of(scen):
    args, _, every = SCENARIOS[scen]
    return f"tests=tick {args} verify_every={every}"


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_uri(transport, d):
    if transport == "unix":
        return "unix:" + os.path.join(d, "mig.sock")
    return f"tcp:127.0.0.1:{free_port()}"


def reap(child):
    """Child.kill once (it may be called again from a finally block)."""
    if not getattr(child, "reaped", False):
        child.reaped = True
        child.kill()


def last_tick_arrival(child):
    """(n, arrival time) of the last complete `tick N ok` line of a child's console."""
    out = child.snapshot()
    ms = list(TICK_RE.finditer(out))
    if not ms:
        raise RunError(f"{child.name}: no tick on the console")
    m = ms[-1]
    return int(m.group(1)), child.arrival(m.end())


def minflt(pid):
    """Minor page faults of a process so far (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def wait_ticks(child, n, deadline):
    child.wait_for(lambda b: True if (last_tick(b) or 0) >= n else None, deadline, f"tick {n}")


# ---------------------------------------------------------------------------
# wisp


def wisp_passes(polls, max_downtime):
    """Pre-copy passes after the full copy, from GET /migration polls.  `iteration`
    is set at each dirty check, before the pass it starts; the last check (the one
    that converged) is rarely seen, since the API does not answer during the
    downtime and the source exits right after.  So: the last seen `iteration`, +1
    if that check had not converged yet (a lower bound if polls missed checks)."""
    if not polls:
        return float("nan")
    last = polls[-1]
    n = last.get("iteration", 0)
    if last.get("phase") == "PreCopy" and last.get("remaining_dirty_pages", 0) and \
            last.get("expected_downtime_ms", 0) > max_downtime:
        n += 1
    return n


def run_wisp(a, d, scen, transport):
    r = {"converged": True}
    uri = make_uri(transport, d)
    cmdline = cmdline_of(scen)
    _, warm, every = SCENARIOS[scen]
    dl = lambda: time.perf_counter() + a.timeout
    kids = []
    try:
        dst = Child(wisp_base(a, d, "dst") + ["--incoming", uri, "--memory", f"{MEM // MIB}M"],
                    d, "wisp receiver")
        kids.append(dst)
        deadline = dl()
        while "waiting for an incoming migration" not in read_log(d, "dst"):
            if dst.eof or time.perf_counter() > deadline:
                raise RunError(f"wisp receiver did not start listening on {uri}")
            time.sleep(0.005)
        sock = os.path.join(d, "wisp-src.sock")
        src = Child(wisp_base(a, d, "src") + ["--api-sock", sock, "--kernel", a.guest,
                                             "--memory", f"{MEM // MIB}M", "--cmdline", cmdline],
                    d, "wisp source")
        kids.append(src)
        wait_socket(sock, dl(), src).close()
        wait_ticks(src, warm, dl())
        api = WispApi(sock, a.timeout)
        api.connect()
        body = {"uri": uri, "max_downtime_ms": a.max_downtime}
        if a.auto_converge:
            body["auto_converge"] = True
        flt0 = minflt(src.pid)
        st, out, t0, _ = api.call("PUT", "/migration/send", body)
        if st != 204:
            raise RunError(f"wisp source: PUT /migration/send -> {st} {out!r}")
        polls = []
        deadline = dl()
        t1 = None
        while t1 is None:
            pid, status, ru = os.wait4(src.pid, os.WNOHANG)
            if pid:
                t1 = time.perf_counter()
                src.status = status
                r["src_minflt"] = ru.ru_minflt - flt0
                break
            try:
                api.request("GET", "/migration")
                resp = api.getresponse()
                out = resp.read()
                if resp.status == 200:
                    polls.append(json.loads(out))
            except (OSError, http.client.HTTPException, ValueError):  # the source going away
                api.close()
                try:
                    api = WispApi(sock, a.timeout)
                    api.connect()
                except OSError:
                    pass
            if polls and polls[-1].get("state") in ("Failed", "Cancelled"):
                err = polls[-1].get("error") or ""
                if "converge" in err.lower():
                    r["converged"] = False
                    r["error"] = err
                    r["iterations"] = max(p.get("iteration", 0) for p in polls)
                    r["dirty_mibs"] = polls[-1].get("dirty_mib_per_s", float("nan"))
                    r["bw_mibs"] = polls[-1].get("bandwidth_mib_per_s", float("nan"))
                    r["total_ms"] = (time.perf_counter() - t0) * 1e3
                    return r
                raise RunError(f"wisp source: migration {polls[-1].get('state')}: {err}")
            if time.perf_counter() > deadline:
                raise RunError(f"wisp source: migration did not finish (last {polls[-1:]})")
            time.sleep(a.poll_ms / 1e3)
        api.close()
        if a.verbose > 1:
            for q in polls:
                print(f"  poll: {json.dumps(q)}", file=sys.stderr)
        reap(src)  # reaped already: joins the console reader (all output read)
        if not os.WIFEXITED(src.status) or os.WEXITSTATUS(src.status) != 0:
            raise RunError(f"wisp source exited with status {src.status}")
        n, t_last = last_tick_arrival(src)
        frag = tail_fragment(src.snapshot())
        t_first = next_tick_after(dst, frag, 0, n + 1, dl(), every)
        log = read_log(d, "src")
        m = MIGRATED_RE.search(log)
        if not m:
            raise RunError(f"wisp source: no 'migrated to' line in its log:\n{log[-600:]}")
        r["bytes"] = int(m.group(1))
        r["total_ms"] = float(m.group(2))
        r["downtime_ms"] = float(m.group(3))
        r["harness_ms"] = (t1 - t0) * 1e3
        r["gap_ms"] = (t_first - t_last) * 1e3
        sent = [p for p in polls if p.get("state") == "Sending"]
        r["iterations"] = wisp_passes(sent, a.max_downtime)
        last = sent[-1] if sent else {}
        # 0 = not published yet when last polled (an idle guest goes from the
        # full copy straight into the downtime, where the API does not answer)
        r["dirty_mibs"] = last.get("dirty_mib_per_s") or float("nan")
        r["bw_mibs"] = last.get("bandwidth_mib_per_s") or float("nan")
        m = RECEIVED_RE.search(read_log(d, "dst"))
        r["recv_ms"] = float(m.group(2)) if m else float("nan")
        return r
    except (RunError, OSError) as e:
        msg = "\n".join(f"{k.name}:\n{k.describe()}" for k in kids)
        raise RunError(f"{e}\n{msg}\nsrc log: {read_log(d, 'src')[-800:]}\n"
                       f"dst log: {read_log(d, 'dst')[-800:]}") from None
    finally:
        for k in kids:
            reap(k)


# ---------------------------------------------------------------------------
# QEMU


def run_qemu(a, d, scen, transport):
    r = {"converged": True}
    uri = make_uri(transport, d)
    cmdline = cmdline_of(scen)
    _, warm, every = SCENARIOS[scen]
    dl = lambda: time.perf_counter() + a.timeout
    kids, qmps = [], []
    try:
        q2 = os.path.join(d, "qmp-dst.sock")
        dst = Child(qemu_base(a, MEM, cmdline, q2) + ["-incoming", "defer"], d, "qemu receiver")
        kids.append(dst)
        qd = Qmp(wait_socket(q2, dl(), dst), a.timeout)
        qmps.append(qd)
        qd.cmd("migrate-incoming", uri=uri)
        q1 = os.path.join(d, "qmp-src.sock")
        src = Child(qemu_base(a, MEM, cmdline, q1), d, "qemu source")
        kids.append(src)
        qs = Qmp(wait_socket(q1, dl(), src), a.timeout)
        qmps.append(qs)
        qs.cmd("migrate-set-parameters", **{"downtime-limit": a.max_downtime,
                                            "max-bandwidth": 1 << 40})
        if a.auto_converge:
            qs.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": "auto-converge", "state": True}])
        wait_ticks(src, warm, dl())
        flt0 = minflt(src.pid)
        t0 = time.perf_counter()
        qs.cmd("migrate", uri=uri)
        last, max_rate = {}, 0
        while True:
            st = qs.cmd("query-migrate")
            s = st.get("status")
            if s == "active":
                last = st
                # QEMU computes the dirty rate about once a second; keep the largest seen
                max_rate = max(max_rate, st.get("ram", {}).get("dirty-pages-rate", 0))
            if s == "completed":
                t1 = time.perf_counter()
                break
            if s in ("failed", "cancelled"):
                raise RunError(f"qemu: migration {s}: {st}")
            if time.perf_counter() - t0 > a.converge_timeout:
                qs.cmd("migrate_cancel")
                ram = last.get("ram", {})
                r["converged"] = False
                r["iterations"] = ram.get("dirty-sync-count", float("nan"))
                r["dirty_mibs"] = max_rate * 4096 / MIB if max_rate else float("nan")
                r["bw_mibs"] = ram.get("mbps", float("nan")) * 1e6 / 8 / MIB
                r["total_ms"] = (time.perf_counter() - t0) * 1e3
                return r
            time.sleep(a.poll_ms / 1e3)
        ram = st.get("ram", {})
        r["src_minflt"] = minflt(src.pid) - flt0
        time.sleep(0.1)  # console bytes in flight from the (now paused) source
        n, t_last = last_tick_arrival(src)
        frag = tail_fragment(src.snapshot())
        qemu_cont(qd, dl())
        t_first = next_tick_after(dst, frag, 0, n + 1, dl(), every)
        r["bytes"] = ram.get("transferred", float("nan"))
        r["total_ms"] = float(st.get("total-time", float("nan")))
        r["downtime_ms"] = float(st.get("downtime", float("nan")))
        r["harness_ms"] = (t1 - t0) * 1e3
        r["gap_ms"] = (t_first - t_last) * 1e3
        r["iterations"] = ram.get("dirty-sync-count", float("nan"))
        r["dirty_mibs"] = max_rate * 4096 / MIB if max_rate else float("nan")
        r["bw_mibs"] = ram.get("mbps", float("nan")) * 1e6 / 8 / MIB
        return r
    except (RunError, OSError) as e:
        msg = "\n".join(f"{k.name}:\n{k.describe()}" for k in kids)
        raise RunError(f"{e}\n{msg}") from None
    finally:
        for q in qmps:
            q.close()
        for k in kids:
            reap(k)


VMMS = [("wisp", run_wisp), ("qemu", run_qemu)]


# ---------------------------------------------------------------------------
# Link bandwidth: 1 GiB through the same kind of socket, two processes

_READER = r"""
import socket, sys
kind, addr = sys.argv[1], sys.argv[2]
if kind == "unix":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(addr)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM); s.connect(("127.0.0.1", int(addr)))
buf = bytearray(4 << 20); n = 0
while True:
    k = s.recv_into(buf)
    if not k: break
    n += k
s.sendall(str(n).encode())
"""


def link_mibs(transport, d, nbytes=MEM):
    if transport == "unix":
        path = os.path.join(d, "link.sock")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        addr = path
    else:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        addr = str(ls.getsockname()[1])
    ls.listen(1)
    p = subprocess.Popen([sys.executable, "-c", _READER, transport, addr])
    try:
        ls.settimeout(30)
        c, _ = ls.accept()
        block = memoryview(os.urandom(4 << 20))
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            k = min(left, len(block))
            c.sendall(block[:k])
            left -= k
        c.shutdown(socket.SHUT_WR)
        got = int(c.recv(64) or b"0")
        dt = time.perf_counter() - t0
        c.close()
        if got != nbytes:
            return float("nan")
        return nbytes / MIB / dt
    finally:
        ls.close()
        p.kill()
        p.wait()
        if transport == "unix" and os.path.exists(addr):
            os.unlink(addr)


# ---------------------------------------------------------------------------
# Setup and report


def fmt(v):
    if v != v:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def derive(r):
    r = dict(r)
    if "bytes" in r:
        r["wire_mib"] = r["bytes"] / MIB
        r["wire_rate"] = r["bytes"] / MIB / (r["total_ms"] / 1e3)
        r["mem_rate"] = MEM / MIB / (r["total_ms"] / 1e3)
    return r


ROWS = [
    # label, unit, key, ratio?
    ("converged (runs)", "", "converged", False),
    ("total: VMM's own", "ms", "total_ms", True),
    ("total: request -> done seen", "ms", "harness_ms", True),
    ("downtime: VMM's own", "ms", "downtime_ms", True),
    ("downtime: console tick gap", "ms", "gap_ms", True),
    ("  wisp receiver log: received in", "ms", "recv_ms", False),
    ("bytes on the wire", "MiB", "wire_mib", True),
    ("  wire rate (bytes / total)", "MiB/s", "wire_rate", True),
    ("  guest RAM / total", "MiB/s", "mem_rate", True),
    ("source minor faults (migration)", "", "src_minflt", True),
    ("passes after 1st (wisp) / syncs", "", "iterations", True),
    ("dirty rate seen by the VMM", "MiB/s", "dirty_mibs", True),
    ("bandwidth seen by the VMM", "MiB/s", "bw_mibs", True),
]


def report(a, results, links, fails):
    print()
    print(f"live-migration benchmark: {a.rounds} round(s), 1 vCPU, {MEM // MIB} MiB guest, "
          f"max downtime {a.max_downtime} ms{', auto-converge' if a.auto_converge else ''}")
    print(f"  wisp : {a.wisp}")
    print(f"  qemu : {a.qemu} -M microvm,acpi=on -accel kvm (max-bandwidth 1 TiB/s)")
    print(f"  guest: {a.guest}")
    for scen in a.scenarios:
        print(f"    {scen}: {cmdline_of(scen)}")
    goals = []
    for scen in a.scenarios:
        for tr in a.transports:
            res = {n: [derive(r) for r in results[(scen, tr)][n]] for n, _ in VMMS}
            link = statistics.median(links[tr]) if links[tr] else float("nan")
            print()
            print(f"== {scen}, {tr}: ({len(res['wisp'])} wisp / {len(res['qemu'])} qemu good "
                  f"rounds; link {fmt(link)} MiB/s, 1 GiB in {fmt(MEM / MIB / link * 1e3)} ms) ==")
            hdr = (f"{'metric':<34} {'unit':<5} | {'wisp median [min-max]':<24} | "
                   f"{'qemu median [min-max]':<24} | wisp/qemu")
            print(hdr)
            print("-" * len(hdr))
            meds = {}
            for label, unit, key, ratio in ROWS:
                cells = []
                for name, _ in VMMS:
                    if key == "converged":
                        rr = res[name]
                        cells.append(f"{sum(1 for r in rr if r['converged'])}/{len(rr)}")
                        continue
                    conv = [r for r in res[name] if r["converged"]]
                    vals = [r.get(key, float("nan")) for r in (conv or res[name])]
                    m, lo, hi = summary(vals)
                    meds[(name, key)] = m
                    cells.append(f"{fmt(m):>7} [{fmt(lo)}-{fmt(hi)}]" if m == m else "-")
                rs = ""
                if ratio:
                    w, q = meds[("wisp", key)], meds[("qemu", key)]
                    rs = f"{w / q:.2f}" if w == w and q == q and q else ""
                print(f"{label:<34} {unit:<5} | {cells[0]:<24} | {cells[1]:<24} | {rs:>9}")
            goals.append((scen, tr, meds, link, res["wisp"]))
    print()
    print("goals (wisp medians):")
    for scen, tr, meds, link, rw in goals:
        dt, tot = meds[("wisp", "downtime_ms")], meds[("wisp", "total_ms")]
        bar = MEM / MIB / link * 1e3 * GOAL_TOTAL_FACTOR
        tgoal = "n/a" if tot != tot or bar != bar else ("met" if tot <= bar else "MISSED")
        if scen == "idle":
            g = "n/a" if dt != dt else ("met" if dt < GOAL_IDLE_DOWNTIME_MS else "MISSED")
            dgoal = f"downtime {fmt(dt)} ms < {GOAL_IDLE_DOWNTIME_MS:g} ms: {g}"
        else:
            conv = all(r["converged"] for r in rw) and rw
            dts = [r["downtime_ms"] for r in rw if r["converged"]]
            within = sum(1 for v in dts if v <= a.max_downtime)
            dgoal = (f"converged {'all' if conv else 'NOT all'}; downtime {fmt(dt)} ms, "
                     f"{within}/{len(rw)} runs <= {a.max_downtime} ms: "
                     f"{'met' if conv and within == len(rw) else 'MISSED'}")
        print(f"  {scen:<4} {tr:<4}: {dgoal}; total {fmt(tot)} ms <= {GOAL_TOTAL_FACTOR:g} x "
              f"1 GiB / link ({fmt(bar)} ms): {tgoal} "
              f"(achieved {fmt(meds[('wisp', 'mem_rate')])} MiB/s of guest RAM, "
              f"{fmt(meds[('wisp', 'wire_rate')])} MiB/s on the wire)")
    print_failures(fails)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds per case (default 5)")
    p.add_argument("--transport", choices=["unix", "tcp", "both"], default="both",
                   help="migration transport (default both)")
    p.add_argument("--scenario", choices=["idle", "busy", "both"], default="both",
                   help="guest workload (default both)")
    p.add_argument("--idle", default=None, metavar="ARGS",
                   help=f"idle guest's tick arguments (default {SCENARIOS['idle'][0]!r})")
    p.add_argument("--busy", default=None, metavar="ARGS",
                   help=f"busy guest's tick arguments (default {SCENARIOS['busy'][0]!r})")
    p.add_argument("--max-downtime", type=int, default=100,
                   help="wisp max_downtime_ms = QEMU downtime-limit, ms (default 100)")
    p.add_argument("--auto-converge", action="store_true",
                   help="wisp auto_converge and QEMU's auto-converge capability")
    p.add_argument("--converge-timeout", type=float, default=30.0,
                   help="cancel a QEMU migration still running after this many s (default 30)")
    p.add_argument("--poll-ms", type=float, default=10.0,
                   help="progress polling period, ms (default 10)")
    p.add_argument("--wisp", default=DEFAULT_WISP, help="wisp binary (built if the default is missing)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument("--guest", default=DEFAULT_GUEST, help="guest ELF (built if the default is missing)")
    p.add_argument("--timeout", type=float, default=60.0, help="per step, in s (default 60)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="print every run (-vv: and every wisp progress poll)")
    a = p.parse_args()
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if not 1 <= a.max_downtime <= 60000:
        p.error("--max-downtime must be in 1..60000 (wisp's range)")
    if a.busy:
        SCENARIOS["busy"] = (a.busy,) + SCENARIOS["busy"][1:]
    if a.idle:
        SCENARIOS["idle"] = (a.idle,) + SCENARIOS["idle"][1:]
    a.transports = ["unix", "tcp"] if a.transport == "both" else [a.transport]
    a.scenarios = ["idle", "busy"] if a.scenario == "both" else [a.scenario]
    ensure_built(a, "migration.py")

    results = {(s, t): {n: [] for n, _ in VMMS} for s in a.scenarios for t in a.transports}
    links = {t: [] for t in a.transports}
    fails = []
    with tempfile.TemporaryDirectory(prefix="wisp-migbench-") as tmp:
        for t in a.transports:
            links[t].append(link_mibs(t, tmp))
        for scen in a.scenarios:
            for tr in a.transports:
                for rnd in range(a.rounds):
                    order = VMMS if rnd % 2 == 0 else VMMS[::-1]
                    for name, fn in order:
                        d = os.path.join(tmp, f"{name}-{scen}-{tr}-{rnd}")
                        os.mkdir(d)
                        try:
                            r = fn(a, d, scen, tr)
                            results[(scen, tr)][name].append(r)
                            if a.verbose:
                                print(f"{scen} {tr} round {rnd} {name}: "
                                      + ", ".join(f"{k}={v:.2f}" if isinstance(v, float)
                                                  else f"{k}={v}" for k, v in r.items()),
                                      file=sys.stderr)
                        except (RunError, OSError) as e:
                            msg = f"{scen} {tr} round {rnd} {name}: {e}"
                            print(f"FAILED: {msg}", file=sys.stderr)
                            fails.append(msg)
                        finally:
                            shutil.rmtree(d, ignore_errors=True)
        for t in a.transports:
            links[t].append(link_mibs(t, tmp))
    report(a, results, links, fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()

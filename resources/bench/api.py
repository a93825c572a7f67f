#!/usr/bin/env python3
"""API benchmark for wisp (stdlib only).

1. Ready time: start `wisp run --api-sock S` and poll until `GET /` answers 200;
   report wall time and the VMM's CPU time at that moment (sum of every thread's
   /proc/PID/task/TID/schedstat run time, nanosecond resolution).
   Firecracker's published bar is 8 CPU ms to a ready socket; wisp's goal is 4.
2. Latency under load: C concurrent keep-alive clients each send R `GET /`
   requests; report p50/p99/max round-trip latency and requests/s.

Usage: resources/bench/api.py [--rounds N] [--clients C] [--requests R] [--wisp PATH]
"""
import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(self.path)
        self.sock = s


def cpu_ns(pid):
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def ready_round(wisp, d):
    sock = os.path.join(d, "api.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    t0 = time.perf_counter()
    p = subprocess.Popen([wisp, "run", "--api-sock", sock, "--runtime-dir", os.path.join(d, "run")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                c = UnixHTTPConnection(sock)
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                if r.status == 200:
                    wall = time.perf_counter() - t0
                    cpu = cpu_ns(p.pid)
                    return wall * 1e3, cpu / 1e6
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            if p.poll() is not None:
                raise RuntimeError(f"wisp exited early: {p.stderr.read().decode()}")
            time.sleep(0.0002)
    finally:
        p.terminate()
        p.wait()


def load(wisp, d, clients, requests):
    sock = os.path.join(d, "load.sock")
    p = subprocess.Popen([wisp, "run", "--api-sock", sock, "--runtime-dir", os.path.join(d, "run")],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock):
            time.sleep(0.001)
        time.sleep(0.05)
        lats, errors, lock = [], [0], threading.Lock()

        def client():
            c = UnixHTTPConnection(sock)
            mine = []
            for _ in range(requests):
                t = time.perf_counter()
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                mine.append(time.perf_counter() - t)
                if r.status != 200:
                    with lock:
                        errors[0] += 1
            with lock:
                lats.extend(mine)

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client) for _ in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        el = time.perf_counter() - t0
        lats.sort()
        q = lambda f: lats[min(len(lats) - 1, int(f * len(lats)))] * 1e3
        return {"n": len(lats), "errors": errors[0], "p50": q(0.5), "p99": q(0.99),
                "max": lats[-1] * 1e3, "rps": len(lats) / el}
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--wisp", default=os.path.join(ROOT, "target/release/wisp"))
    a = ap.parse_args()
    if not os.path.exists(a.wisp):
        subprocess.run(["cargo", "build", "--release", "-p", "vmm"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as d:
        walls, cpus = [], []
        for _ in range(a.rounds):
            w, c = ready_round(a.wisp, d)
            walls.append(w)
            cpus.append(c)
        print(f"ready: wall median {statistics.median(walls):.2f} ms [{min(walls):.2f}-{max(walls):.2f}], "
              f"VMM CPU median {statistics.median(cpus):.2f} ms [{min(cpus):.2f}-{max(cpus):.2f}] "
              f"(goal <= 4 CPU ms; Firecracker's bar 8): "
              f"{'met' if statistics.median(cpus) <= 4 else 'missed'}")
        r = load(a.wisp, d, a.clients, a.requests)
        print(f"load: {a.clients} clients x {a.requests} GET /: {r['n']} ok, {r['errors']} errors, "
              f"p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms, max {r['max']:.3f} ms, {r['rps']:.0f} req/s")
        if r["errors"]:
            sys.exit(1)


if __name__ == "__main__":
    main()

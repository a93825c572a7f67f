# SPDX-License-Identifier: Apache-2.0
"""Drives wisp with an unchanged third-party Firecracker client library.

The library is pyrecracker (PyPI, pinned in requirements.txt). Its VMManager
starts the VMM itself as `sudo firecracker --api-sock SOCK` (found on PATH),
with the process's stdout and stderr in a log file; its FirecrackerClient
sends Firecracker's REST requests over the socket. Here `firecracker` on PATH
is a symlink to wisp and `sudo` a pass-through (wisp needs no privilege), so
the library runs wisp exactly as it would run Firecracker.

What the library is used for:
  VMManager(...)              starts the VMM (the `firecracker` on PATH)
  VMManager.start()           PUT /actions InstanceStart (also its error path)
  FirecrackerClient.put_machine_config / put_boot_source / put_drives
  VMManager.pause()/resume()  PATCH /vm Paused/Resumed (also an error path)
  VMManager.stop()            PUT /actions SendCtrlAltDel, then SIGTERM
pyrecracker has no GET requests, so the VM's state and configuration are
checked independently with plain HTTP over the socket (GET /, /vm/config,
/machine-config, /version) and the guest's serial output is read from the log
file the library writes.

Usage: test_sdk.py --wisp WISP --guest GUEST_ELF --workdir DIR
Exits 0 when every check passed; prints what failed otherwise.
"""

import argparse
import array
import http.client
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback

from requests.exceptions import HTTPError

import pyrecracker
from pyrecracker.client import FirecrackerClient
from pyrecracker.client_types import (
    BootSource,
    CacheType,
    Drive,
    IOEngine,
    MachineConfiguration,
)
from pyrecracker.vm import VMError, VMManager

# The test guest's blk_read pattern: the 8-byte word at offset o is o ^ KEY.
PATTERN_KEY = 0x7769737000000000


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)
    print(f"ok: {what}", flush=True)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def get(sock, path):
    """An independent GET (not through the library): returns (status, JSON)."""
    conn = UnixHTTPConnection(sock)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        return resp.status, (json.loads(body) if body else None)
    finally:
        conn.close()


def state(sock):
    status, body = get(sock, "/")
    if status != 200:
        raise CheckFailed(f"GET / answered {status}: {body}")
    return body["state"]


def wait_until(what, pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise CheckFailed(f"timed out after {timeout} s waiting for {what}")


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def pids_with_arg(arg):
    """PIDs of live processes whose command line contains `arg`."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{d}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if arg.encode() in argv and st != "Z":
            found.append(int(d))
    return found


def make_pattern_image(path, size):
    words = array.array("Q", ((i * 8) ^ PATTERN_KEY for i in range(size // 8)))
    if sys.byteorder != "little":
        words.byteswap()
    with open(path, "wb") as f:
        f.write(words.tobytes())


def run(args):
    work = os.path.abspath(args.workdir)
    bindir = os.path.join(work, "bin")
    os.makedirs(bindir, exist_ok=True)
    # The library runs `sudo firecracker --api-sock ...` through PATH.
    os.symlink(os.path.abspath(args.wisp), os.path.join(bindir, "firecracker"))
    sudo = os.path.join(bindir, "sudo")
    with open(sudo, "w") as f:
        f.write('#!/bin/sh\n# pass-through: wisp needs no privilege\nexec "$@"\n')
    os.chmod(sudo, 0o755)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    sock = os.path.join(work, "firecracker.sock")
    log = os.path.join(work, "logs", "firecracker.log")
    disk = os.path.join(work, "disk.img")
    make_pattern_image(disk, 1 << 20)
    print(f"pyrecracker {getattr(pyrecracker, '__version__', '0.6.4')} from "
          f"{os.path.dirname(pyrecracker.__file__)}", flush=True)

    # The library starts the VMM itself.
    vm = VMManager(socket_path=sock, kernel_image_path=args.guest,
                   firecracker_logs_path=log)
    # It does not wait for the socket; a client of Firecracker has to.
    wait_until("the API socket", lambda: os.path.exists(sock) and
               socket.socket(socket.AF_UNIX).connect_ex(sock) == 0, 20)
    pids = pids_with_arg(sock)
    check(len(pids) == 1, f"exactly one VMM process serves {sock} (pids {pids})")
    pid = pids[0]
    exe = os.path.realpath(f"/proc/{pid}/exe")
    check(os.path.samefile(exe, args.wisp),
          f"the library started wisp through the `firecracker` on PATH ({exe})")

    status, ver = get(sock, "/version")
    check(status == 200 and "firecracker_version" in ver, f"GET /version: {ver}")
    check(state(sock) == "Not started", "state is 'Not started' before configuration")

    # The library's error path: starting with no boot source is a 400 that the
    # library turns into a VMError carrying the HTTP error.
    try:
        vm.start()
    except VMError as e:
        check("400" in str(e), f"start without a boot source raised VMError: {e}")
    else:
        raise CheckFailed("start without a boot source did not fail")
    check(state(sock) == "Not started", "a refused start changes nothing")

    # Configure through the library's client (the requests VMManager.configure()
    # makes, without the host TAP setup that configure() insists on).
    client = FirecrackerClient(sock)
    check(client.socket_path == sock, "FirecrackerClient on the API socket")
    client.put_machine_config(MachineConfiguration(
        vcpu_count=2, mem_size_mib=128, smt=False, track_dirty_pages=False))
    client.put_boot_source(BootSource(
        kernel_image_path=args.guest,
        boot_args="tests=cmdline,madt,smp,blk_read expect_cpus=2 exit=halt"))
    client.put_drives(Drive(
        drive_id="rootfs", is_root_device=True, path_on_host=disk,
        is_read_only=True, cache_type=CacheType.UNSAFE, io_engine=IOEngine.SYNC))
    print("ok: PUT /machine-config, /boot-source, /drives/rootfs through the library",
          flush=True)

    # A bad request is a 4xx with a fault message, which the library raises
    # as requests' HTTPError; the configuration before it stays.
    try:
        client.put_machine_config(MachineConfiguration(vcpu_count=2, mem_size_mib=0))
    except HTTPError as e:
        r = e.response
        check(r is not None and r.status_code == 400
              and "mem_size_mib" in r.json().get("fault_message", ""),
              f"mem_size_mib 0 is refused with a fault message: {r.text}")
    else:
        raise CheckFailed("PUT /machine-config with mem_size_mib 0 was accepted")

    status, mc = get(sock, "/machine-config")
    check(status == 200 and mc["vcpu_count"] == 2 and mc["mem_size_mib"] == 128,
          f"GET /machine-config: {mc}")

    vm.start()
    wait_until("the guest to halt (or fail) on the serial console",
               lambda: "wisp-guest: halting" in read(log) or "FAIL" in read(log), 60)
    out = read(log)
    lines = [l.rstrip() for l in out.splitlines()]
    check("PASS madt" in lines, "the guest printed 'PASS madt' (2 CPUs in its MADT)")
    check("PASS smp" in lines, "the guest printed 'PASS smp' (every vCPU came online)")
    check("PASS blk_read" in lines, "the guest printed 'PASS blk_read' (the drive)")
    check("wisp-guest: 4 passed, 0 failed" in lines and "FAIL" not in out,
          "the guest reported 4 passed, 0 failed")
    check(state(sock) == "Running", "state is 'Running' after InstanceStart")

    vm.pause()
    check(state(sock) == "Paused", "VMManager.pause() -> state 'Paused'")
    # As Firecracker: PATCH /vm to the state the VM is in succeeds.
    try:
        vm.pause()
    except VMError as e:
        raise CheckFailed(f"pausing a paused VM failed: {e}")
    check(state(sock) == "Paused", "a repeated pause succeeds, state 'Paused'")
    vm.resume()
    check(state(sock) == "Running", "VMManager.resume() -> state 'Running'")
    try:
        vm.resume()
    except VMError as e:
        raise CheckFailed(f"resuming a running VM failed: {e}")
    check(state(sock) == "Running", "a repeated resume succeeds, state 'Running'")

    status, cfg = get(sock, "/vm/config")
    check(status == 200, "GET /vm/config")
    check(cfg["machine-config"]["vcpu_count"] == 2, "vm/config: vcpu_count 2")
    check(cfg["boot-source"]["kernel_image_path"] == args.guest,
          "vm/config: the kernel the library sent")
    drives = {d["drive_id"]: d for d in cfg["drives"]}
    check(drives.get("rootfs", {}).get("path_on_host") == disk
          and drives["rootfs"]["is_read_only"] is True,
          f"vm/config: the drive the library sent ({cfg['drives']})")

    # stop(): SendCtrlAltDel, a pause, then SIGTERM to the process it started,
    # removal of the socket and of its (never created) TAP device. The test
    # guest halts with interrupts off, so Ctrl-Alt-Del does not end it and the
    # SIGTERM does. Point the TAP clean-up at a name that does not exist.
    vm.host_dev_name = f"wispsdk{os.getpid() % 100000}"
    vm.host_env_cleanup_pause = 1
    vm.stop()
    wait_until("the VMM process to end", lambda: pid not in pids_with_arg(sock), 10)
    print("ok: VMManager.stop() ended the VMM process", flush=True)
    check(not os.path.exists(sock), "the API socket is gone")
    tail = read(log)
    check("wisp: stopped by SIGTERM" in tail, "wisp reports it was stopped by SIGTERM")
    check("panicked" not in tail, "no panic in wisp's output")


def kill_vmm(sock):
    """Ends the VMM the library started for this test, if it still runs."""
    for pid in pids_with_arg(sock):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--wisp", required=True)
    p.add_argument("--guest", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING,
                        format="library log: %(message)s")
    log = os.path.join(os.path.abspath(args.workdir), "logs", "firecracker.log")
    try:
        run(args)
    except Exception as e:  # report any failure with the VMM's output
        kill_vmm(os.path.join(os.path.abspath(args.workdir), "firecracker.sock"))
        if not isinstance(e, CheckFailed):
            traceback.print_exc(file=sys.stdout)
        print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        if isinstance(e, HTTPError) and e.response is not None:
            print(f"response: {e.response.status_code} {e.response.text}")
        print("---- VMM output (serial + stderr) ----")
        print(read(log))
        return 1
    print("sdk: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

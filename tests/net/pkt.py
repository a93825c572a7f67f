#!/usr/bin/env python3
"""Host side of the virtio-net tests, run inside the test's network namespace.

  pkt.py capture IFACE COUNT TIMEOUT_S   count the guest's 0x88b5 burst frames on IFACE,
                                         verify each payload, print "captured N good M bad sizes A..B"
  pkt.py send IFACE COUNT DST_MAC [GAP_MS]
                                         send COUNT 0x88b6 frames (sizes 60..1514) to DST_MAC,
                                         GAP_MS (default 2) apart

Frame format (resources/guest/README.md): Ethernet header, 4-byte big-endian seq,
then payload byte i (4 <= i < len-14) = (i*13 + seq*7 + (i>>8)) & 0xff.
"""
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003


def pat(seq, i):
    return (i * 13 + seq * 7 + (i >> 8)) & 0xFF


def payload(seq, plen):
    return struct.pack(">I", seq) + bytes(pat(seq, i) for i in range(4, plen))


def capture(iface, count, timeout):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((iface, 0))
    s.settimeout(0.5)
    print("ready", flush=True)
    good, bad, sizes, seen = 0, 0, [], set()
    end = time.time() + timeout
    while good < count and time.time() < end:
        try:
            f = s.recv(65536)
        except socket.timeout:
            continue
        if len(f) < 18 or f[12:14] != b"\x88\xb5":
            continue
        seq = struct.unpack(">I", f[14:18])[0]
        if f[14:] != payload(seq, len(f) - 14):
            bad += 1
        elif seq not in seen:
            seen.add(seq)
            good += 1
            sizes.append(len(f))
        # A valid frame with a seq already seen (another sender's) is not counted.
    lo, hi = (min(sizes), max(sizes)) if sizes else (0, 0)
    print(f"captured {good} good {bad} bad sizes {lo}..{hi}", flush=True)


def send(iface, count, dst, gap_ms=2.0):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    src = open(f"/sys/class/net/{iface}/address").read().strip()
    hdr = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x88\xb6"
    for seq in range(count):
        flen = 60 + seq * (1514 - 60) // max(count - 1, 1)
        s.send(hdr + payload(seq, flen - 14))
        time.sleep(gap_ms / 1000)
    print(f"sent {count}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4], *map(float, sys.argv[5:6]))

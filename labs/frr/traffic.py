#!/usr/bin/env python3
"""A steady UDP stream with sequence numbers, and its receiver's longest gap.

    traffic.py send DEST PORT RATE SECONDS
    traffic.py recv PORT SECONDS      -> prints: received=N longest_gap_ms=G
Bounded in count and time; sends only where it is told (the namespaces the
side-by-side script created).
"""
import socket
import struct
import sys
import time


def send(dest, port, rate, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    period = 1.0 / rate
    start = time.monotonic()
    total = int(rate * seconds)
    for seq in range(total):
        due = start + seq * period
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        try:
            s.sendto(struct.pack("!Q", seq), (dest, port))
        except OSError:
            pass  # no route for a moment: that is the outage being measured


def recv(port, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.2)
    end = time.monotonic() + seconds
    last = None
    longest = 0.0
    received = 0
    while time.monotonic() < end:
        try:
            data, _ = s.recvfrom(64)
        except socket.timeout:
            continue
        now = time.monotonic()
        received += 1
        if last is not None:
            longest = max(longest, now - last)
        last = now
    print(f"received={received} longest_gap_ms={longest * 1000:.0f}")


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
    else:
        recv(int(sys.argv[2]), float(sys.argv[3]))

#!/usr/bin/env python3
"""Measures how long the disk takes to flush one small write, the way Postgres flushes its WAL.

Every acked message waits for such a flush (synchronous commit), so its latency is the floor
under the end-to-end latency of every scenario. Writes an 8 KiB page in place in a
preallocated file (as Postgres writes into its preallocated WAL segments) and times
fdatasync, COUNT times at RATE per second, in DIR (the filesystem Postgres's data lives on).

usage: disk_probe.py DIR [COUNT] [RATE]    prints JSON
"""
import json
import os
import sys
import tempfile
import time

directory = sys.argv[1]
count = int(sys.argv[2]) if len(sys.argv) > 2 else 500
rate = float(sys.argv[3]) if len(sys.argv) > 3 else 50.0
page = 8192
pages = 128

fd, path = tempfile.mkstemp(prefix="disk-probe-", dir=directory)
try:
    os.write(fd, b"\0" * page * pages)
    os.fsync(fd)
    latencies = []
    start = time.monotonic()
    for i in range(count):
        os.pwrite(fd, bytes([i % 256]) * page, (i % pages) * page)
        began = time.perf_counter()
        os.fdatasync(fd)
        latencies.append((time.perf_counter() - began) * 1000)
        # Paced from the start, so a slow flush does not push the rest back.
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
finally:
    os.close(fd)
    os.unlink(path)

latencies.sort()


def at(q):
    return round(latencies[min(len(latencies) - 1, int(len(latencies) * q))], 3)


print(json.dumps({
    "directory": directory,
    "flushes": count,
    "per_second": rate,
    "page_bytes": page,
    "fdatasync_ms": {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(latencies[-1], 3)},
}))

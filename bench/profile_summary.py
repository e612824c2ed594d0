#!/usr/bin/env python3
"""Sums a gateway CPU profile by where the time goes.

    profile_summary.py PROFILE.folded LOADGEN.json > summary.json

PROFILE.folded is `perf script | inferno-collapse-perf --all`: one call stack per line, root
first, frames separated by `;`, kernel frames suffixed `_[k]`, then the stack's weight
(cpu-clock nanoseconds). LOADGEN.json is the load generator's report of the profiled run.

Each sample is charged to one category. In the kernel, to the system call it is part of; on
loopback, `send()` also delivers the bytes into the receiving socket (in softirq), and that part
is counted apart. In user space, to the first frame from the leaf up that belongs to a component
the gateway uses, past the standard library's own frames (`core::`, `alloc::`, `std::`, libc's
`mem*`), so that a copy or a drop is charged to whoever asked for it.
"""
import json
import re
import sys
from collections import Counter

SEND = "kernel: send() to sockets, the sending side (TCP, IP)"
# On loopback the sender's system call also runs the receiving socket's side, in softirq;
# over a network that work happens on the client's machine.
SEND_LOOPBACK = "kernel: send() to sockets, the receiving side (loopback delivery in softirq)"
SYSCALLS = {
    "sendto": SEND,
    "sendmsg": SEND,
    "write": SEND,
    "writev": SEND,
    "recvfrom": "kernel: recv() from sockets",
    "recvmsg": "kernel: recv() from sockets",
    "read": "kernel: recv() from sockets",
    "epoll_wait": "kernel: epoll_wait (waiting for work, switching threads)",
    "epoll_pwait": "kernel: epoll_wait (waiting for work, switching threads)",
    "futex": "kernel: futex (waking and parking worker threads)",
}
OTHER_SYSCALL = "kernel: other system calls"
KERNEL_OTHER = "kernel: interrupts, softirq and page faults outside system calls"

# (prefix of a frame's crate path, category), first match wins.
COMPONENTS = [
    (("mi_", "_mi_", "mimalloc"), "allocator (mimalloc)"),
    (("tungstenite", "tokio_tungstenite", "axum::extract::ws"), "WebSocket framing (tungstenite)"),
    (("serde_json", "serde"), "JSON (serde_json)"),
    (("redis", "combine"), "Redis client (redis-rs)"),
    (("tokio_postgres", "postgres_protocol", "postgres_types", "deadpool"), "Postgres client (tokio-postgres)"),
    (("metrics",), "metrics"),
    (("tracing",), "tracing"),
    (("chat_gateway", "chat_protocol"), "the gateway's own code (sessions, rooms, queues)"),
    (("tokio", "futures", "hyper", "axum", "bytes", "parking_lot"), "tokio runtime: tasks, wakers, channels, timers"),
]
OTHER_USER = "user space: other"
# Frames that are charged to their caller.
PASS_THROUGH = ("core::", "alloc::", "std::", "__mem", "__rust", "hashbrown::")

SYSCALL_FRAME = re.compile(r"^__(?:x64|se)_sys_(\w+)_\[k\]$")


def crate_path(frame):
    """The frame's path without generic wrapping: `<a::B<T> as c::D>::f` -> `a::B<T> as c::D>::f`."""
    return frame.lstrip("<&*")


def categorize(frames):
    kernel = [f for f in frames if f.endswith("_[k]")]
    if frames[-1].endswith("_[k]"):
        for f in kernel:
            m = SYSCALL_FRAME.match(f)
            if m:
                category = SYSCALLS.get(m.group(1), OTHER_SYSCALL)
                if category == SEND and "net_rx_action_[k]" in kernel:
                    return SEND_LOOPBACK
                return category
        return KERNEL_OTHER
    for f in reversed(frames):
        path = crate_path(f)
        if path.startswith(PASS_THROUGH):
            continue
        for prefixes, name in COMPONENTS:
            if path.startswith(prefixes):
                return name
        # The first Rust frame that is not the standard library decides, even if unknown.
        if "::" in path:
            return OTHER_USER
    return OTHER_USER


def leaf_name(frame):
    return frame[: -len("_[k]")] + " (kernel)" if frame.endswith("_[k]") else frame


def main():
    folded, load_path = sys.argv[1], sys.argv[2]
    by_category, by_leaf = Counter(), Counter()
    total = kernel = 0
    with open(folded) as f:
        for line in f:
            stack, _, weight = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            weight = int(weight)
            frames = stack.split(";")[1:]  # the first is the thread's name
            if not frames:
                continue
            total += weight
            kernel += weight if frames[-1].endswith("_[k]") else 0
            by_category[categorize(frames)] += weight
            by_leaf[leaf_name(frames[-1])] += weight
    if total == 0:
        sys.exit("profile_summary: %s holds no samples" % folded)
    with open(load_path) as f:
        load = json.load(f)
    best = max(load["steps"], key=lambda s: s.get("deliveries_per_sec") or 0) if load.get("steps") else None
    summary = {
        "sampled_cpu_seconds": total / 1e9,
        "kernel_share": kernel / total,
        "categories": [{"name": n, "share": w / total} for n, w in by_category.most_common()],
        "top_functions": [{"name": n, "share": w / total} for n, w in by_leaf.most_common(12)],
        "load": {
            "plan": load["plan"],
            "ratio": load["deliveries"]["ratio"],
            "gateway_cpu_seconds": load["gateway"]["cpu_seconds"],
            "deliveries_per_cpu_second": load["gateway"]["deliveries_per_cpu_second"],
            "busiest_step": best,
        },
    }
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")


main()

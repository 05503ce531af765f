"""Free ports for the services our checks, tests and benchmarks start (a Ray head, `launch.py serve`).

A port picked by binding to port 0 comes from the kernel's ephemeral range, the same range every outgoing
connection draws its local port from. Between the pick and the service's own bind, a Ray head opens
hundreds of connections, and one of them can take the port: Ray's dashboard agent then fails to bind and
`ray job submit` answers "No available agent" until it gives up. So we pick outside that range, and
outside the range `ray start` gives its workers (`--min-worker-port`/`--max-worker-port`), and keep only
ports that bind on every interface right now. Where no such range is left, we fall back to the kernel's
pick. (No Ray imported here.)
"""
from __future__ import annotations

import itertools
import random
import socket
from pathlib import Path

FIRST_PORT = 20000                   # above the well-known and registered services most hosts run
RAY_WORKER_PORTS = range(10002, 20000)  # `ray start`'s default worker port range
LINUX_EPHEMERAL = range(32768, 61000)   # Linux's default ip_local_port_range


def ephemeral_ports(path: str | Path = "/proc/sys/net/ipv4/ip_local_port_range") -> range:
    """The range outgoing connections take their local ports from (Linux's default where unreadable)."""
    try:
        low, high = (int(x) for x in Path(path).read_text().split())
    except (OSError, ValueError):
        return LINUX_EPHEMERAL
    return range(low, high + 1)


def _binds(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # bind only, never listen: the wildcard clashes with a bind on any address
        except OSError:
            return False
    return True


def _kernel_pick() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int = 1, ephemeral: range | None = None) -> list[int]:
    """`n` distinct ports that bind now, outside the ephemeral and Ray worker ranges where possible."""
    ephemeral = ephemeral_ports() if ephemeral is None else ephemeral
    candidates = [p for p in range(FIRST_PORT, 65536) if p not in ephemeral and p not in RAY_WORKER_PORTS]
    random.SystemRandom().shuffle(candidates)
    picked = list(itertools.islice((p for p in candidates if _binds(p)), n))  # stops at the n-th that binds
    while len(picked) < n:  # no room outside the ranges (or all of it taken): the kernel's pick
        port = _kernel_pick()
        if port not in picked:
            picked.append(port)
    return picked


def free_port() -> int:
    return free_ports(1)[0]


if __name__ == "__main__":  # `python -m cluster.ports N`: N free ports on one line, for shell scripts
    import sys

    print(*free_ports(int(sys.argv[1]) if len(sys.argv) > 1 else 1))

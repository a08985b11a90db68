"""The Ray worker pods' preStop hook: drain this Ray node before Kubernetes stops the pod.

KubeRay runs `ray start --block` under `bash -c`, so bash is PID 1 and the SIGTERM Kubernetes
sends on deletion never reaches Ray (PID 1 ignores signals it has no handler for); 30 s later
everything is killed, the engine mid-request. Ray drains a node when `ray start` itself gets
SIGTERM: the node is marked draining, Serve starts a replacement for each replica there on
another node, stops the old one once the replacement runs (or at once when the deployment has
scaled down), and the raylet exits when idle. So this hook sends `ray start` that SIGTERM and
waits for it to exit; `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S` on the container bounds Ray's
wait, the pod's termination grace period this hook's.

    python3 -m llama4_serving.drain --timeout 600
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

PROC = Path("/proc")


def is_ray_start(argv: Sequence[str]) -> bool:
    """Whether a command line is `ray start ... --block` (the pod's Ray node): `ray` may be a
    script run by Python (`python3 /usr/local/bin/ray start ...`)."""
    for index, arg in enumerate(argv[:-1]):
        if Path(arg).name == "ray" and argv[index + 1] == "start":
            return "--block" in argv[index + 2 :]
    return False


def command_lines(proc: Path = PROC) -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every process this user can read."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if raw:
            yield int(entry.name), [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def ray_start_pids(proc: Path = PROC) -> list[int]:
    return [pid for pid, argv in command_lines(proc) if is_ray_start(argv)]


def alive(pid: int) -> bool:
    """Whether `pid` still runs: an exited process its parent has not reaped yet (a zombie)
    has stopped too."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # `pid (comm) state ...`; comm may hold spaces and parentheses, the state follows the last.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def drain(timeout_s: float, proc: Path = PROC, poll_s: float = 1.0) -> bool:
    """SIGTERM `ray start` and wait up to `timeout_s` for it to exit. True when it exited (or
    none ran), False when time ran out."""
    pids = ray_start_pids(proc)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def main(argv: Sequence[str] | None = None, proc: Path = PROC) -> int:
    """The hook. In the pod's container /proc lists the container's processes only."""
    parser = argparse.ArgumentParser(
        prog="python3 -m llama4_serving.drain",
        description=(
            "Drain this pod's Ray node (SIGTERM to `ray start --block`: Serve moves its "
            "replicas away first) and wait until Ray has stopped."
        ),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for Ray to stop (default: 600)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    stopped = drain(args.timeout, proc)
    elapsed = time.monotonic() - started
    # The kubelet shows a hook's output only when it fails (in the pod's events).
    if stopped:
        print(f"Ray node drained and stopped in {elapsed:.0f} s", file=sys.stderr)
        return 0
    print(f"Ray node still running after {args.timeout:.0f} s of draining", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""The Ray worker pods' preStop hook: it finds `ray start --block`, hands it the SIGTERM that
KubeRay's PID 1 swallows, and waits until Ray has stopped. Real processes; the hook looks at a
/proc of its own that lists only them (this machine runs real Ray nodes' pods it must not stop)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llama4_serving.drain import alive, drain, is_ray_start, main, ray_start_pids

# Stands in for `ray start --block`: says it is ready, then on SIGTERM takes a moment (Ray's
# drain) and exits; or ignores SIGTERM, as a node that never finishes draining.
RAY_NODE = """
import signal, sys, time
def drained(signum, frame):
    time.sleep(0.3)
    sys.exit(1)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[-1] == "stuck" else drained)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""
RAY_START = ["/usr/bin/python3", "/usr/local/bin/ray", "start", "--address=h:6379", "--block"]


@contextmanager
def ray_node(proc: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """A `ray start --block` stand-in, listed in `proc` with the command line of Ray's."""
    process = subprocess.Popen(
        [sys.executable, "-c", RAY_NODE, *extra], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        listed = proc / str(process.pid)
        listed.mkdir(parents=True)
        (listed / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in RAY_START))
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (RAY_START, True),
        (["ray", "start", "--head", "--block"], True),
        (["ray", "start", "--address=h:6379"], False),  # returns at once: not the pod's node
        (["ray", "stop"], False),
        (["python3", "-m", "llama4_serving.drain", "--timeout=600"], False),
        (["/bin/bash", "-lc", "--", "ulimit -n 65536; ray start --block"], False),
        ([], False),
    ],
)
def test_only_a_blocking_ray_start_is_the_ray_node(argv: list[str], expected: bool) -> None:
    assert is_ray_start(argv) is expected


def test_the_ray_node_is_found_among_other_processes(tmp_path: Path) -> None:
    other = tmp_path / "1"
    other.mkdir()
    (other / "cmdline").write_bytes(b"/bin/bash\0-lc\0--\0ray start --block\0")
    (tmp_path / "self").mkdir()
    (tmp_path / "42").mkdir()  # exited meanwhile: no cmdline left
    with ray_node(tmp_path) as node:
        assert ray_start_pids(tmp_path) == [node.pid]


def test_drain_stops_ray_and_returns_once_it_exited(tmp_path: Path) -> None:
    with ray_node(tmp_path) as node:
        assert drain(timeout_s=30, proc=tmp_path, poll_s=0.05) is True
        assert node.wait(timeout=5) == 1  # it exited on the SIGTERM, not killed
        assert not alive(node.pid)


def test_drain_gives_up_at_its_timeout_when_ray_does_not_stop(tmp_path: Path) -> None:
    with ray_node(tmp_path, "stuck") as node:
        assert drain(timeout_s=0.5, proc=tmp_path, poll_s=0.05) is False
        assert node.poll() is None  # still running: the kubelet's grace period ends it


def test_the_hook_says_whether_ray_stopped_in_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with ray_node(tmp_path / "stuck", "stuck"):
        assert main(["--timeout=0.3"], proc=tmp_path / "stuck") == 1
    assert "still running after" in capsys.readouterr().err
    with ray_node(tmp_path / "draining"):
        assert main(["--timeout=30"], proc=tmp_path / "draining") == 0
    assert "drained and stopped" in capsys.readouterr().err

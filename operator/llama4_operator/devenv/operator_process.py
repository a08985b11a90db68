"""The operator as a local process that tests and benchmarks start, kill and restart: each start
logs to a file of its own, and each stop first reads the process' peak resident memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llama4_operator.devenv.cluster import free_port

LLAMA4CTL = str(Path(sys.executable).with_name("llama4ctl"))
STOP_TIMEOUT_S = 15


@dataclass
class OperatorProcess:
    """`llama4ctl operator --all-namespaces` against one cluster; its pid is the Python process
    itself, so /proc reports the operator's own memory."""

    kubeconfig: Path
    log_dir: Path
    metrics_port: int = field(default_factory=free_port)
    resync_interval_s: float | None = None  # None: the operator's default
    extra_args: tuple[str, ...] = ()  # e.g. ("--peering=NAME", "--peering-priority=100")
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    peak_rss_mb: list[float] = field(default_factory=list)  # one per stopped process

    def start(self) -> None:
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        resync = [f"--resync-interval={self.resync_interval_s:g}"] if self.resync_interval_s else []
        with (self.log_dir / f"operator-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [
                    LLAMA4CTL,
                    "operator",
                    "--all-namespaces",
                    f"--kubeconfig={self.kubeconfig}",
                    f"--metrics-port={self.metrics_port}",
                    *resync,
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def peak_rss(self) -> float:
        """VmHWM of the running process, in MB (10^6 bytes)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
        raise RuntimeError("no VmHWM in /proc status")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node dies."""
        if self.process is not None and self.running():
            self._record_peak()
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        if self.process is not None and self.running():
            self._record_peak()
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        """Every start's log, oldest first."""
        logs = sorted(self.log_dir.glob("operator-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def _record_peak(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):  # exited between check and read
            self.peak_rss_mb.append(self.peak_rss())

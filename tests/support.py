"""Helpers shared by the cluster tests: polling, the pinned kubectl, the operator as a process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama4_operator.devenv import operator_process as devenv_operator
from llama4_operator.devenv import tools as devtools

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "manifests" / "crd" / "serving.llama4.dev_llama4deployments.yaml"
LLAMA4CTL = str(Path(sys.executable).with_name("llama4ctl"))


def llama4ctl(*args: str, timeout_s: float = 400) -> subprocess.CompletedProcess[str]:
    """Run the installed `llama4ctl` as a user would; never raises on a non-zero exit."""
    return subprocess.run(
        [LLAMA4CTL, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def wait_for(condition: Callable[[], Any], timeout_s: float = 60, what: str = "") -> Any:
    """Poll until `condition()` is truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class Kubectl:
    kubeconfig: Path
    binary: Path = field(default_factory=lambda: devtools.tool("kubernetes").binary("kubectl"))

    def run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout if check else result.stdout + result.stderr

    def apply(self, manifest: dict[str, Any] | str, namespace: str, check: bool = True) -> str:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.run("apply", "-n", namespace, "-f", "-", input=text, check=check)

    def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        result = subprocess.run(
            [
                str(self.binary),
                f"--kubeconfig={self.kubeconfig}",
                "get",
                kind,
                name,
                "-n",
                namespace,
                "-o",
                "yaml",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(f"kubectl get {kind} {name} failed: {result.stderr}")
        loaded: dict[str, Any] = yaml.safe_load(result.stdout)
        return loaded


@dataclass
class OperatorProcess(devenv_operator.OperatorProcess):
    """The operator as users run it, resyncing often so tests converge fast."""

    resync_interval_s: float | None = 3

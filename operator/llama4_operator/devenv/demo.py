"""The local demo: the control plane with simulated GPU nodes, the operator, and the sample
Llama4Deployments, shown as the operator checks their fit and places them.

Everything it starts is a component of the local cluster, so `llama4ctl dev cluster down` (or
Ctrl-C in the foreground) stops all of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from llama4_operator.devenv import tools as devtools
from llama4_operator.devenv.cluster import LOOPBACK, Component, LocalCluster, free_port

REPOSITORY = Path(__file__).resolve().parents[3]
CRD = REPOSITORY / "manifests" / "crd" / "serving.llama4.dev_llama4deployments.yaml"
SAMPLES = ("scout.yaml", "maverick.yaml")
NAMESPACE = "llama4-demo"


class DemoError(RuntimeError):
    """A demo step failed; the message names it."""


class Demo:
    def __init__(self, cluster: LocalCluster, console: Console) -> None:
        self.cluster = cluster
        self.console = console
        self.kubectl_binary = devtools.tool("kubernetes").binary("kubectl")

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [str(self.kubectl_binary), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self) -> None:
        if not CRD.exists():
            raise DemoError(f"the CRD is missing at {CRD}; run the demo from a checkout")
        self.kubectl("apply", "--server-side", "-f", str(CRD))
        self._wait_established("llama4deployments.serving.llama4.dev")
        self.console.log("[green]✓[/] Llama4Deployment CRD installed")
        if "llama4-operator" not in self.cluster.running_processes():
            self._start_operator()
        namespace = self.kubectl("create", "namespace", NAMESPACE, "--dry-run=client", "-o=json")
        self.kubectl("apply", "-f", "-", stdin=namespace)
        for sample in SAMPLES:
            path = REPOSITORY / "manifests" / "samples" / sample
            self.kubectl("apply", "-n", NAMESPACE, "-f", str(path))
            self.console.log(f"applied manifests/samples/{sample} in namespace {NAMESPACE}")

    def _wait_established(self, crd: str, timeout_s: float = 60) -> None:
        # `kubectl wait` fails outright while the new CRD has no status yet, so poll instead.
        query = '-o=jsonpath={.status.conditions[?(@.type=="Established")].status}'
        deadline = time.monotonic() + timeout_s
        while self.kubectl("get", "crd", crd, query) != "True":
            if time.monotonic() > deadline:
                raise DemoError(f"CRD {crd} not Established after {timeout_s:.0f} s")
            time.sleep(0.5)

    def _start_operator(self) -> None:
        port = free_port()
        llama4ctl = str(Path(sys.executable).with_name("llama4ctl"))
        self.cluster.start_component(
            Component(
                "llama4-operator",
                [
                    llama4ctl,
                    "operator",
                    "--all-namespaces",
                    f"--kubeconfig={self.cluster.kubeconfig}",
                    f"--metrics-port={port}",
                    "--resync-interval=5",
                ],
                env={"PYTHONUNBUFFERED": "1"},
            ),
            ready=lambda: httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=2).is_success,
            port=port,
        )
        self.console.log(f"operator metrics: http://{LOOPBACK}:{port}/metrics")

    def deployments(self) -> list[dict[str, Any]]:
        listed: dict[str, Any] = json.loads(self.kubectl("get", "l4d", "-n", NAMESPACE, "-o=json"))
        items: list[dict[str, Any]] = listed["items"]
        return items

    def wait_until_placed(self, timeout_s: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self.console.status("waiting for the operator to check fit and place replicas ..."):
            while time.monotonic() < deadline:
                items = self.deployments()
                if items and all(item.get("status", {}).get("placement") for item in items):
                    return items
                time.sleep(1)
        raise DemoError(
            f"the operator placed nothing within {timeout_s:.0f} s; "
            f"see {self.cluster.directory / 'logs' / 'llama4-operator.log'}"
        )

    def _wait_for_pods(self, items: list[dict[str, Any]], timeout_s: float = 90) -> None:
        """KubeRay makes one head pod and the workers of each placed replica."""
        expected = sum(
            1 + sum(len(r["workers"]) for r in item["status"]["placement"].get("replicas", []))
            for item in items
        )
        deadline = time.monotonic() + timeout_s
        with self.console.status(f"waiting for KubeRay's {expected} pods ...") as status:
            while time.monotonic() < deadline:
                pods = json.loads(self.kubectl("get", "pods", "-n", NAMESPACE, "-o=json"))
                running = sum(p["status"].get("phase") == "Running" for p in pods["items"])
                status.update(f"waiting for KubeRay's pods: {running}/{expected} running")
                if running >= expected:
                    return
                time.sleep(1)
        self.console.log(f"[yellow]KubeRay has not made all {expected} pods yet")

    def show(self, items: list[dict[str, Any]]) -> None:
        self.console.print(self.kubectl("get", "l4d", "-n", NAMESPACE))
        table = Table("deployment", "fit", "GPUs / replica", "replica", "workers (node x GPUs)")
        for item in items:
            status = item["status"]
            fit = status.get("fit", {})
            for replica in status["placement"].get("replicas", []):
                workers = ", ".join(f"{w['node']} x{w['gpus']}" for w in replica["workers"])
                table.add_row(
                    item["metadata"]["name"],
                    "fits" if fit.get("fits") else "[red]does not fit",
                    str(fit.get("gpusPerReplica", "")),
                    str(replica["index"]),
                    workers,
                )
        self.console.print(table)
        for item in items:
            message = item["status"].get("fit", {}).get("message", "")
            self.console.print(f"[bold]{item['metadata']['name']}[/]: {message}")
        self._wait_for_pods(items)
        self.console.print(
            "\nPods KubeRay made, on the nodes the placement chose (KWOK runs no containers):"
        )
        self.console.print(self.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide"))
        self.console.print(
            f"Watch:  .venv/bin/llama4ctl dev kubectl get l4d -n {NAMESPACE} -w\n"
            f"Scale:  .venv/bin/llama4ctl dev kubectl scale l4d/maverick -n {NAMESPACE} "
            "--replicas=2"
        )

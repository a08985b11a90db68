"""Operator scale and chaos benchmark on the real local control plane (KWOK simulated GPU nodes).

Scale: N Llama4Deployments (a mix of the Scout and Maverick samples) created at once on a cluster
of M simulated 8 x H100 nodes, with the operator running as `llama4ctl operator` (default settings
but for the metrics port): time until every one is reconciled (status.observedGeneration ==
metadata.generation with a Fits condition), p50/p99 of create-to-reconciled per resource, and
the operator's peak resident memory (VmHWM).

Chaos: every deployment's spec is changed, and the operator is SIGKILLed at seeded random points
while it works through them, then restarted; after the last restart: time until all converge,
and whether any deployment ended with a duplicate child or without its status.

Run: .venv/bin/python benchmarks/reliability/run.py [--nodes 1000] [--deployments 100]
     [--kills 3] [--seed 7]   (see README.md in this folder)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubernetes import client, utils, watch
from rich.console import Console
from rich.table import Table

from llama4_operator.api.models import Llama4DeploymentSpec
from llama4_operator.devenv import tools as devtools
from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster
from llama4_operator.devenv.nodes import NodePool
from llama4_operator.devenv.operator_process import OperatorProcess
from llama4_operator.kube import Kube
from llama4_operator.renderers.children import Owner, RayPodSettings
from llama4_operator.renderers.deployment import Previous, desired_state

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "manifests" / "crd" / "serving.llama4.dev_llama4deployments.yaml"
SAMPLES = REPO / "manifests" / "samples"
GROUP, VERSION, PLURAL = "serving.llama4.dev", "v1alpha1", "llama4deployments"
DEPLOYMENT_LABEL = "serving.llama4.dev/deployment"
NAMESPACE = "bench"
TARGET_ALL_S = 60.0
TARGET_RSS_MB = 300.0
# What one deployment owns (docs/api.md, "Children"): two Services, one ConfigMap, one RayService.
EXPECTED_CHILDREN = {"Service": 2, "ConfigMap": 1, "RayService": 1}

console = Console(stderr=True, log_path=False)
Json = dict[str, Any]


def manifests(count: int, seed: int) -> list[Json]:
    """`count` deployments: 3 in 4 the Scout sample (1-3 replicas of one GPU), the rest the
    Maverick sample (1 replica of 8 GPUs); small enough that all of them fit the cluster."""
    scout = yaml.safe_load((SAMPLES / "scout.yaml").read_text())
    maverick = yaml.safe_load((SAMPLES / "maverick.yaml").read_text())
    rng = random.Random(seed)
    result = []
    for index in range(count):
        if index % 4 == 3:
            manifest = json.loads(json.dumps(maverick))
            manifest["metadata"]["name"] = f"maverick-{index:03d}"
        else:
            manifest = json.loads(json.dumps(scout))
            manifest["metadata"]["name"] = f"scout-{index:03d}"
            manifest["spec"]["replicas"] = rng.randint(1, 3)
        manifest["metadata"]["namespace"] = NAMESPACE
        result.append(manifest)
    return result


def is_reconciled(obj: Json) -> bool:
    status = obj.get("status") or {}
    conditions = {c.get("type") for c in status.get("conditions") or []}
    return status.get("observedGeneration") == obj["metadata"].get("generation") and (
        "Fits" in conditions
    )


class ReconciledWatch:
    """Watches every Llama4Deployment in a thread and notes when each is first seen reconciled
    at (or after) a wanted generation."""

    def __init__(self, api_client: Any) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.lock = threading.Lock()
        self.wanted: dict[str, int] = {}  # name -> generation that must be observed
        self.reconciled_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def expect(self, name: str, generation: int) -> None:
        with self.lock:
            self.wanted[name] = generation
            self.reconciled_at.pop(name, None)

    def _note(self, obj: Json) -> None:
        name = obj["metadata"]["name"]
        with self.lock:
            wanted = self.wanted.get(name)
            if wanted is None or name in self.reconciled_at:
                return
            if obj["metadata"]["generation"] >= wanted and is_reconciled(obj):
                self.reconciled_at[name] = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                listed = self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURAL
                )
                for item in listed["items"]:
                    self._note(item)
                for event in stream.stream(
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    NAMESPACE,
                    PLURAL,
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=30,
                ):
                    if self._stop.is_set():
                        return
                    self._note(event["object"])
            except Exception as error:  # reconnect, whatever broke the stream
                console.log(f"watch restarted: {error}")
                time.sleep(0.5)

    def wait_all(self, names: list[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if all(n in self.reconciled_at for n in names):
                    return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self._stop.set()


@contextmanager
def cluster_with_operator(
    nodes: int, workdir: Path
) -> Iterator[tuple[LocalCluster, OperatorProcess]]:
    cluster = LocalCluster(
        ClusterConfig(
            name="bench-reliability",
            pools=(NodePool(count=nodes),),
            kuberay=False,  # no pods needed; the RayService CRD is installed below
            state_dir=workdir / "cluster",
        ),
        console=console,
    )
    with cluster:
        api_client = cluster.api_client()
        kuberay = devtools.ensure_tools(["kuberay"], console=console)["kuberay"]
        for crd in [CRD, *sorted((kuberay.home / "crds").glob("*.yaml"))]:
            utils.create_from_yaml(api_client, str(crd))
        cluster.wait_established(["llama4deployments.serving.llama4.dev", "rayservices.ray.io"])
        core = client.CoreV1Api(api_client)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        (workdir / "operator").mkdir()
        operator = OperatorProcess(cluster.kubeconfig, workdir / "operator")
        operator.start()
        try:
            yield cluster, operator
        finally:
            operator.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class ScaleResult:
    all_reconciled_s: float | None
    per_resource_s: list[float]
    unreconciled: int


def run_scale(api_client: Any, watcher: ReconciledWatch, deployments: list[Json]) -> ScaleResult:
    custom = client.CustomObjectsApi(api_client)
    created_at: dict[str, float] = {}

    def create(manifest: Json) -> None:
        name = manifest["metadata"]["name"]
        watcher.expect(name, 1)
        created_at[name] = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, manifest)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, deployments))
    names = list(created_at)
    done = watcher.wait_all(names, timeout_s=600)
    per_resource = [
        watcher.reconciled_at[n] - created_at[n] for n in names if n in watcher.reconciled_at
    ]
    return ScaleResult(
        all_reconciled_s=max(watcher.reconciled_at.values()) - start if done else None,
        per_resource_s=per_resource,
        unreconciled=len(names) - len(per_resource),
    )


def stage_times(kubeconfig: Path, manifest: Json, repeats: int = 3) -> dict[str, float]:
    """Where one reconciliation's time goes, timed here with the operator's own code: reading
    the cluster's GPU nodes (every Node, bound Pod and Llama4Deployment; then again within the
    operator's Node-list lifetime, as most reconciliations do) and planning plus rendering.
    Best of `repeats`, in seconds."""
    name = manifest["metadata"]["name"]
    read: list[float] = []
    read_nodes_cached: list[float] = []
    for _ in range(repeats):
        kube = Kube.from_kubeconfig(str(kubeconfig))  # a new one lists the Nodes again
        for times in (read, read_nodes_cached):
            started = time.perf_counter()
            nodes = asyncio.run(kube.gpu_nodes(NAMESPACE, name))
            times.append(time.perf_counter() - started)
    spec = Llama4DeploymentSpec.model_validate(manifest["spec"])
    owner = Owner(name=name, namespace=NAMESPACE, uid="benchmark")
    settings = RayPodSettings(image="benchmark", ray_version="2")
    plan = []
    for _ in range(repeats):
        started = time.perf_counter()
        desired_state(owner, spec, nodes, settings, Previous())
        plan.append(time.perf_counter() - started)
    return {
        "read GPU nodes": min(read),
        "read GPU nodes, Node list cached": min(read_nodes_cached),
        "plan and render": min(plan),
    }


@dataclass
class ChaosResult:
    kills: int
    converge_after_last_restart_s: float | None
    duplicates: list[str]
    missing_status: list[str]


def run_chaos(
    api_client: Any,
    watcher: ReconciledWatch,
    operator: OperatorProcess,
    deployments: list[Json],
    kills: int,
    seed: int,
) -> ChaosResult:
    """Change every deployment's spec (one more replica for Scout, 8 more redundant expert slots
    for Maverick), SIGKILL the operator at random moments while it works, restart it each time."""
    custom = client.CustomObjectsApi(api_client)
    rng = random.Random(seed)
    for manifest in deployments:
        name = manifest["metadata"]["name"]
        if name.startswith("scout"):
            patch: Json = {"spec": {"replicas": manifest["spec"]["replicas"] + 1}}
        else:
            patch = {"spec": {"placement": {"redundantExpertSlots": 24}}}
        updated = custom.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, name, patch
        )
        watcher.expect(name, updated["metadata"]["generation"])
    for _ in range(kills):
        time.sleep(rng.uniform(0.5, 6.0))  # seeded: the same run kills at the same moments
        operator.kill()
        operator.start()
    restarted = time.monotonic()
    names = [m["metadata"]["name"] for m in deployments]
    done = watcher.wait_all(names, timeout_s=600)
    # 0 when every deployment was already reconciled before the last restart.
    converged = max(0.0, max(watcher.reconciled_at.get(n, restarted) for n in names) - restarted)
    duplicates, missing = audit(api_client, names)
    return ChaosResult(kills, converged if done else None, duplicates, missing)


def audit(api_client: Any, names: list[str]) -> tuple[list[str], list[str]]:
    """Children per owner beyond the expected one of each, and deployments without status."""
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    counts: Counter[tuple[str, str]] = Counter()
    for kind, items in (
        ("Service", core.list_namespaced_service(NAMESPACE).to_dict()["items"]),
        ("ConfigMap", core.list_namespaced_config_map(NAMESPACE).to_dict()["items"]),
        (
            "RayService",
            custom.list_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices")["items"],
        ),
    ):
        for item in items:
            owner = (item["metadata"].get("labels") or {}).get(DEPLOYMENT_LABEL)
            if owner:
                counts[(owner, kind)] += 1
    duplicates = [
        f"{owner}: {counts[(owner, kind)]} {kind}"
        for owner in names
        for kind, expected in EXPECTED_CHILDREN.items()
        if counts[(owner, kind)] != expected
    ]
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
    missing = [
        item["metadata"]["name"]
        for item in listed
        if not is_reconciled(item) or not (item.get("status") or {}).get("placement")
    ]
    return duplicates, missing


def reconcile_stats(metrics_port: int) -> tuple[float, float]:
    """(reconciliations run, seconds spent in them) from the operator's own histogram."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    values = {
        line.split()[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("llama4_operator_reconcile_duration_seconds_")
    }
    return (
        values.get("llama4_operator_reconcile_duration_seconds_count", 0.0),
        values.get("llama4_operator_reconcile_duration_seconds_sum", 0.0),
    )


def report(
    nodes: int,
    scale: ScaleResult,
    chaos: ChaosResult,
    peak_rss_mb: float,
    reconciles: tuple[float, float],
    stages: dict[str, float],
) -> None:
    table = Table(
        title=f"Operator reliability: {len(scale.per_resource_s)} deployments, "
        f"{nodes} simulated 8-GPU nodes"
    )
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("target", justify="right")
    table.add_column("met")

    def row(figure: str, measured: str, target: str, met: bool | None) -> None:
        table.add_row(figure, measured, target, "-" if met is None else ("yes" if met else "NO"))

    total = scale.all_reconciled_s
    row(
        "all reconciled after create (s)",
        "not all" if total is None else f"{total:.1f}",
        f"<= {TARGET_ALL_S:.0f}",
        total is not None and total <= TARGET_ALL_S,
    )
    if scale.per_resource_s:
        row("per resource p50 (s)", f"{percentile(scale.per_resource_s, 0.5):.1f}", "", None)
        row("per resource p99 (s)", f"{percentile(scale.per_resource_s, 0.99):.1f}", "", None)
        row("per resource mean (s)", f"{statistics.fmean(scale.per_resource_s):.1f}", "", None)
    row("not reconciled", str(scale.unreconciled), "0", scale.unreconciled == 0)
    count, seconds = reconciles
    row("reconciliations run (scale phase)", f"{count:.0f}", "", None)
    if count:
        row("mean time in one reconciliation (s)", f"{seconds / count:.2f}", "", None)
    for stage, seconds in stages.items():
        row(f"  of which: {stage} (s, measured apart)", f"{seconds:.2f}", "", None)
    row(
        "operator peak RSS, VmHWM (MB)",
        f"{peak_rss_mb:.0f}",
        f"< {TARGET_RSS_MB:.0f}",
        peak_rss_mb < TARGET_RSS_MB,
    )
    converged = chaos.converge_after_last_restart_s
    row("chaos: operator SIGKILLs survived", str(chaos.kills), "", None)
    row(
        "chaos: converged after last restart (s)",
        "not all" if converged is None else f"{converged:.1f}",
        "",
        converged is not None,
    )
    row(
        "chaos: owners with wrong child counts",
        str(len(chaos.duplicates)),
        "0",
        not chaos.duplicates,
    )
    row(
        "chaos: deployments without status",
        str(len(chaos.missing_status)),
        "0",
        not chaos.missing_status,
    )
    Console().print(table)
    for problem in chaos.duplicates[:10] + chaos.missing_status[:10]:
        console.print(f"[red]{problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llama4-bench-reliability-"))
    deployments = manifests(args.deployments, args.seed)
    try:
        with cluster_with_operator(args.nodes, workdir) as (cluster, operator):
            api_client = cluster.api_client()
            watcher = ReconciledWatch(api_client)
            console.log(f"creating {len(deployments)} Llama4Deployments")
            scale = run_scale(api_client, watcher, deployments)
            reconciles = reconcile_stats(operator.metrics_port)
            peak_scale = operator.peak_rss()
            maverick = next(m for m in deployments if m["metadata"]["name"].startswith("maverick"))
            stages = stage_times(cluster.kubeconfig, maverick)
            console.log(f"scale phase done; chaos: {args.kills} operator kills")
            chaos = run_chaos(api_client, watcher, operator, deployments, args.kills, args.seed)
            watcher.stop()
            operator.stop()
        peak = max([peak_scale, *operator.peak_rss_mb])
        report(args.nodes, scale, chaos, peak, reconciles, stages)
    finally:
        if args.keep:
            console.log(f"logs kept in {workdir}")
        else:
            import shutil  # noqa: PLC0415

            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

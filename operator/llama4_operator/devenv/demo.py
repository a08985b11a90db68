"""The local demo: a real control plane with simulated GPU nodes and a real kubelet node, a
real local Ray cluster, Prometheus, and the operator (installed by Helm from the image built here,
running as pods on the real node, in external-Ray mode) serving a tiny Llama 4 with the default
engine, vLLM (its CPU build, through Ray Serve LLM), which answers OpenAI requests while the
operator places and scales it. Without a real node the operator runs as a local process.

Everything it starts is a component of the local cluster, so `llama4ctl dev cluster down` (or
Ctrl-C in the foreground) stops all of it. `PlacementDemo` is the earlier, model-free demo: the
Scout and Maverick samples placed on 16 simulated 8-GPU nodes through KubeRay.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llama4_operator.devenv import images, real_nodes
from llama4_operator.devenv import tools as devtools
from llama4_operator.devenv.cluster import LOOPBACK, Component, LocalCluster, free_port
from llama4_operator.devenv.local_prometheus import ScrapeTargets, start_prometheus
from llama4_operator.devenv.local_ray import FAKE_GPU, LocalRay, RayClusterStarter, RayNodes
from llama4_operator.devenv.operator_process import LLAMA4CTL
from llama4_operator.monitoring.rules import GENERATED_TOKENS_RATE, READY_REPLICAS
from llama4_operator.renderers.children import MODELS_MOUNT_PATH

REPOSITORY = Path(__file__).resolve().parents[3]
CRD = REPOSITORY / "manifests" / "crd" / "serving.llama4.dev_llama4deployments.yaml"
CHART = REPOSITORY / "helm" / "llama4-operator"
OPERATOR_NAMESPACE = "llama4-system"
OPERATOR_RELEASE = "llama4-operator"
OPERATOR_METRICS_PORT = 8080  # the chart's default
TINY_SAMPLE = REPOSITORY / "manifests" / "samples" / "tiny-vllm.yaml"
PLACEMENT_SAMPLES = ("scout.yaml", "maverick.yaml")
NAMESPACE = "llama4-demo"
WEIGHTS_CLAIM = "tiny-weights"
ServingMode = Literal["rayservice", "external"]
# Ray pods sized for one 2-CPU real node: the head and two 1-GPU workers fit beside the two
# operator pods. CPU is requested, not limited: engines use idle cores instead of being
# throttled at 600m (a vLLM engine then builds in about a minute instead of two).
LOCAL_RAY_POD_VALUES = (
    "--set=operator.rayPods.head.cpu=500m",
    "--set=operator.rayPods.head.memory=3Gi",
    "--set=operator.rayPods.workerPerGpu.cpu=600m",
    "--set=operator.rayPods.workerPerGpu.memory=6Gi",
    "--set=operator.rayPods.cpuLimit=false",
)
SUMMARY_FILE = "demo.json"  # in the cluster's state directory: what the demo started, for tools
PROMPT = "Mixture of experts models route each token to"
# GENERATED_TOKENS_RATE is recorded by the project's rules, which the demo's Prometheus loads.
QUERIES = (
    'sum by (job) (up{job=~"llama4-.*|ray"})',
    f'sum by (name) ({GENERATED_TOKENS_RATE}{{namespace="{NAMESPACE}"}})',
    f'{READY_REPLICAS}{{namespace="{NAMESPACE}"}}',
)


class DemoError(RuntimeError):
    """A demo step failed; the message names it."""


class Kube:
    """The pinned kubectl against the demo's cluster, and the operator as a cluster component."""

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

    def install_crd(self) -> None:
        if not CRD.exists():
            raise DemoError(f"the CRD is missing at {CRD}; run the demo from a checkout")
        self.kubectl("apply", "--server-side", "-f", str(CRD))
        self.cluster.wait_established(["llama4deployments.serving.llama4.dev"])
        self.console.log("[green]✓[/] Llama4Deployment CRD installed")

    def create_namespace(self, namespace: str) -> None:
        manifest = self.kubectl("create", "namespace", namespace, "--dry-run=client", "-o=json")
        self.kubectl("apply", "-f", "-", stdin=manifest)

    def start_operator(self, port: int, *extra_args: str) -> None:
        """The operator as a local process (a component of the cluster), not a Helm-installed
        pod: no container image can be built or pulled for the simulated nodes."""
        self.cluster.start_component(
            Component(
                "llama4-operator",
                [
                    LLAMA4CTL,
                    "operator",
                    "--all-namespaces",
                    f"--kubeconfig={self.cluster.kubeconfig}",
                    f"--metrics-port={port}",
                    "--resync-interval=5",
                    *extra_args,
                ],
                env={"PYTHONUNBUFFERED": "1"},
            ),
            ready=lambda: httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=2).is_success,
            port=port,
        )
        self.console.log(f"operator metrics: http://{LOOPBACK}:{port}/metrics")

    def install_operator(self, *operator_values: str) -> list[str]:
        """The operator as users install it: the image built here (loaded into the real nodes'
        containerd), the Helm chart into a namespace enforcing the restricted Pod Security
        profile, two replicas on the real node. Returns the pods' metrics addresses."""
        self.console.rule("The operator image, built here, and the chart")
        image = images.operator_image(progress=lambda step: self.console.log(f"image: {step}"))
        self.cluster.load_image(image.archive)
        self.console.log(f"[green]✓[/] {image.name} loaded into the real node")
        self.create_namespace(OPERATOR_NAMESPACE)
        self.kubectl(
            "label", "--overwrite", "namespace", OPERATOR_NAMESPACE,
            "pod-security.kubernetes.io/enforce=restricted",
        )  # fmt: skip
        repository, tag = image.name.rsplit(":", 1)
        selector = json.dumps({real_nodes.REAL_NODE_LABEL: "true"})
        with self.console.status("helm install (waiting for the operator pods to be Ready) ..."):
            result = subprocess.run(
                [
                    str(devtools.tool("helm").binary()),
                    f"--kubeconfig={self.cluster.kubeconfig}",
                    "upgrade", "--install", OPERATOR_RELEASE, str(CHART),
                    "--namespace", OPERATOR_NAMESPACE, "--wait", "--timeout=300s",
                    f"--set=image.repository={repository}",
                    f"--set=image.tag={tag}",
                    "--set=image.pullPolicy=Never",
                    f"--set-json=nodeSelector={selector}",
                    *operator_values,
                ],
                capture_output=True,
                text=True,
                timeout=360,
                check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise DemoError(f"helm install of the operator failed: {result.stderr.strip()}")
        listed = self.kubectl(
            "get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "json",
            "-l", f"app.kubernetes.io/instance={OPERATOR_RELEASE}",
        )  # fmt: skip
        pods = json.loads(listed)["items"]
        for pod in pods:
            self.console.log(
                f"[green]✓[/] operator pod {pod['metadata']['name']} "
                f"{pod['status']['phase']} on {pod['spec']['nodeName']}"
            )
        return [f"{pod['status']['podIP']}:{OPERATOR_METRICS_PORT}" for pod in pods]

    def wait_for_service(self, name: str, namespace: str, timeout_s: float = 120) -> Any:
        """The Service once the operator has made it (its first reconcile renders it)."""
        deadline = time.monotonic() + timeout_s
        with self.console.status(f"waiting for the operator to create Service {name} ..."):
            while True:
                listed = json.loads(self.kubectl("get", "services", "-n", namespace, "-o=json"))[
                    "items"
                ]
                found = [s for s in listed if s["metadata"]["name"] == name]
                if found:
                    return found[0]
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"the operator made no Service {name} in {namespace} within "
                        f"{timeout_s:.0f} s: see `kubectl describe l4d {name} -n {namespace}`"
                    )
                time.sleep(0.5)

    def deployments(self, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        listed: dict[str, Any] = json.loads(self.kubectl("get", "l4d", "-n", namespace, "-o=json"))
        items: list[dict[str, Any]] = listed["items"]
        return items


def demo_operator_values(prometheus_url: str) -> tuple[str, ...]:
    """Helm values of the demo's operator in either mode: fake GPUs, the autoscaler reading
    token rates from the demo's Prometheus, a 5 s resync so changes show at once."""
    return (
        f"--set=operator.rayAcceleratorResource={FAKE_GPU}",
        f"--set=operator.prometheusUrl={prometheus_url}",
        "--set=operator.resyncIntervalSeconds=5",
    )


def tiny_name() -> str:
    name: str = yaml.safe_load(TINY_SAMPLE.read_text())["metadata"]["name"]
    return name


def tiny_manifest(model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """The tiny vLLM sample with its checkpoint where the Ray workers read it, and autoscaling
    between 1 and 2 replicas with a per-replica target low enough (10 tokens/s) that the demo's
    load scales it up while you watch."""
    manifest: dict[str, Any] = yaml.safe_load(TINY_SAMPLE.read_text())
    model = manifest["spec"]["model"]
    model["weights"]["uri"] = str(model_dir)
    model["architecture"]["vocabSize"] = vocab_size
    manifest["spec"]["autoscaling"] = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 2,
        "targetTokensPerSecond": 10,
        "coldStartSeconds": 90,  # vLLM builds its engine in about a minute here
        "scaleDownDelaySeconds": 60,
    }
    return manifest


def write_tiny_checkpoint(directory: Path) -> int:
    """Write the tiny checkpoint both engines load; returns its vocabulary size. Readable by
    everyone: the Ray pods run as uid 1000 and mount it from the host (`weights_volume`)."""
    # Imports torch and transformers: only here, never when the CLI loads.
    from llama4_serving.tiny import engine_tiny_architecture, write_tiny_model  # noqa: PLC0415

    vocab_size = write_tiny_model(directory, engine_tiny_architecture()).vocab_size
    for path in (directory, *directory.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return vocab_size


def weights_volume(model_dir: Path, namespace: str, claim: str = WEIGHTS_CLAIM) -> list[Any]:
    """A hostPath PersistentVolume over the checkpoint the host wrote (the real nodes share the
    host's filesystem), pre-bound to the claim the Ray pods mount read-only at /models."""
    volume = f"{namespace}-{claim}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(model_dir), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


def on_real_node(manifest: dict[str, Any], claim: str = WEIGHTS_CLAIM) -> dict[str, Any]:
    """The tiny manifest in RayService mode: its Ray pods on the real node, the checkpoint from
    the claim `weights_volume` binds (mounted at /models)."""
    spec = manifest["spec"]
    spec["model"]["weights"].update({"uri": MODELS_MOUNT_PATH, "volumeClaimName": claim})
    spec.setdefault("resources", {})["nodeSelector"] = {real_nodes.REAL_NODE_LABEL: "true"}
    return manifest


def deployment_row(item: dict[str, Any]) -> tuple[str, ...]:
    """What `kubectl get l4d` shows, plus where the replicas were placed."""
    status = item.get("status") or {}
    ready = next(
        (c["status"] for c in status.get("conditions", []) if c.get("type") == "Ready"), ""
    )
    replicas = (status.get("placement") or {}).get("replicas") or []
    nodes = ", ".join(
        f"{worker['node']} x{worker['gpus']}"
        for replica in replicas
        for worker in replica["workers"]
    )
    return (
        item["metadata"]["name"],
        str(item["spec"].get("replicas", "")),
        str(status.get("readyReplicas", 0)),
        f"{float(status.get('tokensPerSecond', 0)):.1f}",
        ready or "-",
        nodes or "-",
    )


ROW_HEADER = ("NAME", "REPLICAS", "READY", "TOKENS/S", "READY?", "PLACED ON (node x GPUs)")


def format_row(row: tuple[str, ...]) -> str:
    widths = (10, 9, 6, 9, 7, 0)
    return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


@dataclass
class LoadStats:
    answered: int = 0
    failed: int = 0
    tokens: int = 0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, tokens: int | None, error: str = "") -> None:
        with self.lock:
            if tokens is None:
                self.failed += 1
                self.last_error = error
            else:
                self.answered += 1
                self.tokens += tokens


@dataclass(frozen=True)
class DemoEndpoints:
    openai_base_url: str
    model: str
    prometheus_url: str
    ray_dashboard_url: str
    operator_metrics_url: str

    def save(self, directory: Path) -> None:
        (directory / SUMMARY_FILE).write_text(json.dumps(self.__dict__, indent=2))


def chat(base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 120) -> Any:
    response = httpx.post(
        f"{base_url}/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        },
        timeout=timeout_s,
    )
    response.raise_for_status()
    return response.json()


class ServingDemo:
    """The demo's steps, each shown as it happens."""

    def __init__(
        self,
        cluster: LocalCluster,
        console: Console,
        *,
        load_seconds: float = 45,
        concurrency: int = 4,
        ray_nodes: RayNodes | None = None,
        mode: ServingMode = "rayservice",
    ) -> None:
        self.cluster = cluster
        self.console = console
        self.kube = Kube(cluster, console)
        self.load_seconds = load_seconds
        self.concurrency = concurrency
        self.ray_nodes = ray_nodes or RayNodes()
        self.mode = mode

    # -- set-up ------------------------------------------------------------------------------

    def start(self) -> DemoEndpoints:
        if self.mode == "rayservice":
            if not self.cluster.real_node_names():
                raise DemoError("RayService mode runs the Ray pods on a real node: --real-nodes 1")
            return self._start_ray_service()
        return self._start_external()

    def _start_ray_service(self) -> DemoEndpoints:
        """The mode users run: the operator (pods) renders a RayService, KubeRay starts the
        Ray head and worker pods on the real node from the Ray image built here, and the
        endpoint is the deployment's Service."""
        self.console.rule("The Ray image, built here: Ray, the serving package, vLLM's CPU build")
        ray_image = images.ray_image(progress=lambda step: self.console.log(f"image: {step}"))
        self.cluster.load_image(ray_image.archive)
        self.console.log(f"[green]✓[/] {ray_image.name} loaded into the real node")
        self.kube.install_crd()
        self.kube.create_namespace(NAMESPACE)
        name = tiny_name()
        gateway = self.cluster.api_address
        operator_pods_file = self.cluster.directory / "operator-targets.json"
        operator_pods_file.write_text("[]")
        prometheus_url = start_prometheus(
            self.cluster,
            ScrapeTargets(
                operator=operator_pods_file,
                namespace=NAMESPACE,
                ray_pod_dns_names=(f"{name}-metrics.{NAMESPACE}.svc.cluster.local",),
            ),
            host=gateway,
        )
        self.console.log(f"Prometheus: {prometheus_url}")
        pod_targets = self.kube.install_operator(
            f"--set=operator.servingImage={ray_image.name}",
            *LOCAL_RAY_POD_VALUES,
            *demo_operator_values(prometheus_url),
        )
        operator_pods_file.write_text(json.dumps([{"targets": pod_targets}]))
        self.console.rule("A tiny Llama 4 on vLLM (CPU build), in a RayService on the real node")
        model = self._apply_tiny(ray_service=True)
        service = self.kube.wait_for_service(name, NAMESPACE)
        port = service["spec"]["ports"][0]["port"]
        endpoints = DemoEndpoints(
            openai_base_url=f"http://{service['spec']['clusterIP']}:{port}/v1",
            model=str(model["spec"]["model"].get("servedModelName") or name),
            prometheus_url=prometheus_url,
            # Token-protected: `kubectl port-forward svc/<name>-head-svc 8265` and the token in
            # the Secret KubeRay made (see docs/serving.md).
            ray_dashboard_url=f"http://{name}-head-svc.{NAMESPACE}.svc.cluster.local:8265",
            operator_metrics_url=f"http://{pod_targets[0]}/metrics",
        )
        endpoints.save(self.cluster.directory)
        self._wait_ready(name, endpoints, timeout_s=900)
        return endpoints

    def _start_external(self) -> DemoEndpoints:
        # With a real node the operator runs there as pods, which reach Ray's dashboard and
        # Prometheus on the cluster's bridge address (the host's side of the node network).
        in_cluster = bool(self.cluster.real_node_names())
        host = self.cluster.api_address if in_cluster else LOOPBACK
        self.console.rule("Ray: a head and fake-GPU worker raylets")
        ray = RayClusterStarter(self.cluster, self.ray_nodes, dashboard_host=host).start()
        self.console.log(f"Ray dashboard: {ray.dashboard_url}")
        self.console.rule("Prometheus, and the operator in external-Ray mode")
        self.kube.install_crd()
        self.kube.create_namespace(NAMESPACE)
        operator_port = free_port()
        # The tiny sample's app answers under external_route_prefix: /namespace/name.
        app_url = f"{ray.serve_url}/{NAMESPACE}/{tiny_name()}"
        # Prometheus finds the operator pods in a file the install writes (their pod IPs).
        operator_pods_file = self.cluster.directory / "operator-targets.json"
        operator_pods_file.write_text("[]")
        operator_target: str | Path = (
            operator_pods_file if in_cluster else f"{LOOPBACK}:{operator_port}"
        )
        prometheus_url = start_prometheus(
            self.cluster,
            ScrapeTargets(
                operator=operator_target,
                namespace=NAMESPACE,
                ray_discovery_file=ray.metrics_discovery_file,
            ),
            host=host,
        )
        self.console.log(f"Prometheus: {prometheus_url}")
        if in_cluster:
            pod_targets = self.kube.install_operator(
                f"--set=operator.externalRayDashboard={ray.dashboard_url}",
                *demo_operator_values(prometheus_url),
            )
            operator_pods_file.write_text(json.dumps([{"targets": pod_targets}]))
            operator_metrics_url = f"http://{pod_targets[0]}/metrics"
        else:
            self.kube.start_operator(operator_port, *self._operator_args(ray, prometheus_url))
            operator_metrics_url = f"http://{LOOPBACK}:{operator_port}/metrics"
        self.console.rule("A tiny Llama 4 on vLLM (CPU build), through Ray Serve LLM")
        model = self._apply_tiny()
        endpoints = DemoEndpoints(
            openai_base_url=f"{app_url}/v1",
            model=str(model["spec"]["model"].get("servedModelName") or model["metadata"]["name"]),
            prometheus_url=prometheus_url,
            ray_dashboard_url=ray.dashboard_url,
            operator_metrics_url=operator_metrics_url,
        )
        endpoints.save(self.cluster.directory)
        self._wait_ready(str(model["metadata"]["name"]), endpoints)
        return endpoints

    @staticmethod
    def _operator_args(ray: LocalRay, prometheus_url: str) -> list[str]:
        return [
            f"--external-ray-dashboard={ray.dashboard_url}",
            f"--ray-accelerator-resource={FAKE_GPU}",
            f"--prometheus-url={prometheus_url}",  # the autoscaler reads token rates there
        ]

    def _apply_tiny(self, *, ray_service: bool = False) -> dict[str, Any]:
        model_dir = self.cluster.directory / "tiny-model"
        with self.console.status("writing the tiny checkpoint and tokenizer (loads torch) ..."):
            manifest = tiny_manifest(model_dir, write_tiny_checkpoint(model_dir))
        self.console.log(f"[green]✓[/] tiny checkpoint written to {model_dir}")
        where = "weights.uri patched"
        if ray_service:
            manifest = on_real_node(manifest)
            volume = weights_volume(model_dir, NAMESPACE)
            self.kube.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(volume))
            where = (
                f"weights from claim {WEIGHTS_CLAIM} (a hostPath volume), Ray pods on the real node"
            )
        self.kube.kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump(manifest))
        self.console.log(
            f"applied manifests/samples/tiny-vllm.yaml in namespace {NAMESPACE} "
            f"({where}, autoscaling 1..2 replicas at 10 tokens/s each)"
        )
        return manifest

    def _wait_ready(self, name: str, endpoints: DemoEndpoints, timeout_s: float = 600) -> None:
        """Until the deployment is Ready and answers; shows each change of its row."""
        deadline = time.monotonic() + timeout_s
        self.console.print(format_row(ROW_HEADER))
        last: tuple[str, ...] = ()
        with self.console.status(
            "the operator checks the fit, places the replica and deploys it "
            "to Ray Serve; the replica loads the model ..."
        ) as status:
            while time.monotonic() < deadline:
                items = [i for i in self.kube.deployments() if i["metadata"]["name"] == name]
                if items:
                    row = deployment_row(items[0])
                    if row != last:
                        self.console.print(format_row(row))
                        last = row
                    if row[4] == "True" and self._answers(endpoints):
                        self.console.log(f"[green]✓[/] {name} is Ready")
                        return
                    status.update(_waiting_message(items[0]))
                time.sleep(1)
        if self.mode == "rayservice":
            raise DemoError(
                f"{name} was not Ready within {timeout_s:.0f} s; see `kubectl describe l4d "
                f"{name} -n {NAMESPACE}`, the RayService's events and its pods' logs "
                f"(llama4ctl dev kubectl get pods -n {NAMESPACE})"
            )
        raise DemoError(
            f"{name} was not Ready within {timeout_s:.0f} s; see "
            f"{self.cluster.directory / 'logs' / 'llama4-operator.log'} and Ray's logs in "
            f"{RayClusterStarter(self.cluster).temp_dir / 'session_latest' / 'logs'}"
        )

    @staticmethod
    def _answers(endpoints: DemoEndpoints) -> bool:
        try:
            return httpx.get(f"{endpoints.openai_base_url}/models", timeout=5).is_success
        except httpx.HTTPError:
            return False

    # -- the show ----------------------------------------------------------------------------

    def show_endpoint(self, endpoints: DemoEndpoints) -> None:
        base, model = endpoints.openai_base_url, endpoints.model
        self.console.rule("The OpenAI-compatible endpoint")
        self.console.print(f"[bold]OpenAI base URL:[/] {base}   [bold]model:[/] {model}\n")
        body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24}
        )
        self.console.print(
            f"curl -s {base}/chat/completions -H 'Content-Type: application/json' \\\n"
            f"  -d '{body}'\n",
            markup=False,
            highlight=False,
        )
        self.console.print(
            "from openai import OpenAI\n"
            f'client = OpenAI(base_url="{base}", api_key="unused")\n'
            f"reply = client.chat.completions.create(model={model!r}, max_tokens=24,\n"
            f'    messages=[{{"role": "user", "content": {PROMPT!r}}}])\n'
            "print(reply.choices[0].message.content)\n",
            markup=False,
            highlight=False,
        )
        started = time.monotonic()
        answer = self._ask_with_openai(base, model)
        self.console.print(
            f"[bold]The answer[/] ({time.monotonic() - started:.1f} s; random weights, so the "
            f"words are arbitrary but every token came out of the model's forward pass):"
        )
        self.console.print(repr(answer), markup=False)

    @staticmethod
    def _ask_with_openai(base_url: str, model: str) -> str:
        try:
            from openai import OpenAI  # noqa: PLC0415  (a dev extra; httpx does the same)
        except ImportError:
            reply = chat(base_url, model, PROMPT, 24)
            return str(reply["choices"][0]["message"]["content"])
        client = OpenAI(base_url=base_url, api_key="unused", timeout=120)
        completion = client.chat.completions.create(
            model=model, max_tokens=24, messages=[{"role": "user", "content": PROMPT}]
        )
        return completion.choices[0].message.content or ""

    def drive_load(self, endpoints: DemoEndpoints) -> LoadStats:
        """`concurrency` clients send chat requests for `load_seconds` while the deployment's
        row is printed whenever it changes (replicas, readiness, tokens/s, placement)."""
        self.console.rule(
            f"Load: {self.concurrency} concurrent clients for {self.load_seconds:.0f} s"
        )
        stats = LoadStats()
        stop = threading.Event()
        self.console.print(format_row(ROW_HEADER))
        progress = Progress(
            TextColumn("[bold]load"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[summary]}"),
            console=self.console,
        )
        with progress, self._clients(endpoints, stats, stop):
            task = progress.add_task("load", total=self.load_seconds, summary="")
            started = time.monotonic()
            last: dict[str, tuple[str, ...]] = {}
            while (elapsed := time.monotonic() - started) < self.load_seconds:
                for item in self.kube.deployments():
                    row = deployment_row(item)
                    if last.get(row[0]) != row:
                        progress.console.print(format_row(row))
                        last[row[0]] = row
                with stats.lock:
                    summary = (
                        f"{stats.answered} answered, {stats.failed} failed, "
                        f"{stats.tokens / max(elapsed, 1e-3):.1f} tokens/s"
                    )
                progress.update(task, completed=elapsed, summary=summary)
                time.sleep(1)
            stop.set()
            progress.update(task, completed=self.load_seconds)
        if stats.failed:
            self.console.print(f"[yellow]last error: {stats.last_error}")
        return stats

    @contextmanager
    def _clients(
        self, endpoints: DemoEndpoints, stats: LoadStats, stop: threading.Event
    ) -> Iterator[None]:
        def client(index: int) -> None:
            prompts = ("Hello, world!", PROMPT, "Kubernetes operators reconcile", "Ray Serve")
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    try:
                        response = http.post(
                            f"{endpoints.openai_base_url}/chat/completions",
                            json={
                                "model": endpoints.model,
                                "messages": [
                                    {"role": "user", "content": prompts[index % len(prompts)]}
                                ],
                                "max_tokens": 32,
                            },
                        )
                        response.raise_for_status()
                        stats.record(int(response.json()["usage"]["completion_tokens"]))
                    except (httpx.HTTPError, KeyError, ValueError) as error:
                        stats.record(None, f"{type(error).__name__}: {error}")
                        stop.wait(1)

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for index in range(self.concurrency):
                pool.submit(client, index)
            try:
                yield
            finally:
                stop.set()

    def show_monitoring(self, endpoints: DemoEndpoints) -> None:
        url = endpoints.prometheus_url
        self.console.rule("Prometheus")
        self.console.print(f"Prometheus: {url}  (targets: {url}/targets, rules: {url}/rules)")
        table = Table("PromQL", "now", title="a few queries")
        for query in QUERIES:
            table.add_row(query, _query(url, query))
        self.console.print(table)
        self.console.print(
            f"Ray dashboard: {endpoints.ray_dashboard_url}   "
            f"operator metrics: {endpoints.operator_metrics_url}\n"
            f"Watch:  .venv/bin/llama4ctl dev kubectl get l4d -n {NAMESPACE} -w\n"
            f"Scale:  .venv/bin/llama4ctl dev kubectl scale l4d/tiny -n {NAMESPACE} --replicas=2"
            "  (autoscaling owns spec.replicas while enabled)"
        )


def _waiting_message(item: dict[str, Any]) -> str:
    conditions = (item.get("status") or {}).get("conditions") or []
    pending = [c for c in conditions if c.get("status") != "True" and c.get("message")]
    detail = pending[0]["message"] if pending else "waiting for the operator"
    return f"waiting for tiny to be Ready: {detail[:120]}"


def _query(prometheus_url: str, query: str) -> str:
    try:
        response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": query}, timeout=5)
        results = response.json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError) as error:
        return f"({type(error).__name__})"
    if not results:
        return "(no data yet)"
    return ", ".join(f"{_labels(r['metric'])}={float(r['value'][1]):.3g}" for r in results[:4])


def _labels(metric: dict[str, str]) -> str:
    shown = {k: v for k, v in metric.items() if k != "__name__"}
    return "{" + ",".join(f"{k}={v}" for k, v in shown.items()) + "}"


class PlacementDemo:
    """The model-free demo: Scout and Maverick placed on 16 simulated 8-GPU nodes, with the pods
    KubeRay makes on exactly those nodes (KWOK runs no containers)."""

    def __init__(self, cluster: LocalCluster, console: Console) -> None:
        self.cluster = cluster
        self.console = console
        self.kube = Kube(cluster, console)

    def start(self) -> None:
        self.kube.install_crd()
        if "llama4-operator" not in self.cluster.running_processes():
            self.kube.start_operator(free_port())
        self.kube.create_namespace(NAMESPACE)
        for sample in PLACEMENT_SAMPLES:
            path = REPOSITORY / "manifests" / "samples" / sample
            self.kube.kubectl("apply", "-n", NAMESPACE, "-f", str(path))
            self.console.log(f"applied manifests/samples/{sample} in namespace {NAMESPACE}")

    def wait_until_placed(self, timeout_s: float = 120) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        with self.console.status("waiting for the operator to check fit and place replicas ..."):
            while time.monotonic() < deadline:
                items = self.kube.deployments()
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
                pods = json.loads(self.kube.kubectl("get", "pods", "-n", NAMESPACE, "-o=json"))
                running = sum(p["status"].get("phase") == "Running" for p in pods["items"])
                status.update(f"waiting for KubeRay's pods: {running}/{expected} running")
                if running >= expected:
                    return
                time.sleep(1)
        self.console.log(f"[yellow]KubeRay has not made all {expected} pods yet")

    def show(self, items: list[dict[str, Any]]) -> None:
        self.console.print(self.kube.kubectl("get", "l4d", "-n", NAMESPACE))
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
        self.console.print(self.kube.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide"))
        self.console.print(
            f"Watch:  .venv/bin/llama4ctl dev kubectl get l4d -n {NAMESPACE} -w\n"
            f"Scale:  .venv/bin/llama4ctl dev kubectl scale l4d/maverick -n {NAMESPACE} "
            "--replicas=2"
        )

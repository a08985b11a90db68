"""RayService mode for real, the mode users run: the operator, installed by Helm as pods on a real
kubelet node, renders a RayService for a tiny `engine: vllm` Llama4Deployment; KubeRay starts
the Ray head and worker pods there from the Ray image built here (Ray, the serving package,
vLLM's CPU build); the Serve application becomes healthy, the resource Ready through its
RayService, and the OpenAI endpoint answers through the resource's Service. Scaling 1 -> 2 -> 1
keeps serving every request (the retired worker pod drains its Ray node, whichever replica Serve
chose to stop), and a worker pod killed under load is replaced by KubeRay while
the resource reports it (Degraded) and every request ends with an answer or an error.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import yaml
from rich.console import Console

from llama4_operator.devenv import images
from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster
from llama4_operator.devenv.demo import (
    LOCAL_RAY_POD_VALUES,
    NAMESPACE,
    Kube,
    on_real_node,
    tiny_manifest,
    weights_volume,
    write_tiny_checkpoint,
)
from llama4_operator.devenv.local_ray import FAKE_GPU
from llama4_operator.devenv.nodes import NodePool
from llama4_operator.handlers.status import pod_ready
from support import Kubectl, wait_for

# The first test also waits for the module's set-up: the Ray image loaded into the node and
# the first vLLM engine built, several minutes on 2 shared cores.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

NAME = "tiny"
REQUEST_TIMEOUT_S = 60  # spec.serving.requestTimeoutSeconds: the Serve proxy's 408 after this
# A tiny model's answer on a running engine takes well under a second, even on busy cores.
READY_ANSWER_S = 20
CLIENT_TIMEOUT_S = 150  # well past it: a client that waits this long saw a request hang
# Two kubectl calls and a YAML parse per look: while an engine builds on the same two cores,
# look every few seconds.
SERVING_POLL_S = 5.0


@dataclass
class Deployed:
    cluster: LocalCluster
    kubectl: Kubectl
    base_url: str
    ray_image: str

    def deployment(self) -> dict[str, Any]:
        found = self.kubectl.get("llama4deployment", NAME, NAMESPACE)
        assert found is not None
        return found

    def conditions(self) -> dict[str, dict[str, str]]:
        status = self.deployment().get("status") or {}
        return {c["type"]: c for c in status.get("conditions", [])}

    def worker_pods(self) -> list[dict[str, Any]]:
        listed = self.kubectl.run(
            "get", "pods", "-n", NAMESPACE, "-o", "json",
            "-l", f"serving.llama4.dev/deployment={NAME},ray.io/node-type=worker",
        )  # fmt: skip
        pods: list[dict[str, Any]] = yaml.safe_load(listed)["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


SERVE_PLACEMENT = """
import json, os, urllib.request
request = urllib.request.Request(
    "http://localhost:8265/api/serve/applications/",
    headers={"Authorization": "Bearer " + os.environ.get("RAY_AUTH_TOKEN", "")},
)
details = json.load(urllib.request.urlopen(request, timeout=10))
print(json.dumps({
    name: [(replica["state"], replica.get("node_ip")) for replica in deployment["replicas"]]
    for app in details["applications"].values()
    for name, deployment in app["deployments"].items()
}))
"""


def serve_placement(deployed: Deployed) -> str:
    """Where Serve runs each replica (state, node IP), and the pods' IPs: for the log."""
    listed = deployed.kubectl.run(
        "get", "pods", "-n", NAMESPACE, "-o", "json", "-l", f"serving.llama4.dev/deployment={NAME}"
    )  # fmt: skip
    pods = yaml.safe_load(listed)["items"]
    ips = {p["metadata"]["labels"].get("ray.io/group"): p["status"].get("podIP") for p in pods}
    head = next(p["metadata"]["name"] for p in pods if "head" in p["metadata"]["name"])
    try:
        replicas = deployed.kubectl.run(
            "exec", "-n", NAMESPACE, head, "-c", "ray-head", "--", "python3", "-c", SERVE_PLACEMENT
        ).strip()
    except Exception as error:  # only for the log
        replicas = f"unread: {error}"
    return f"pods {ips}, replicas {replicas}"


def ready(pod: dict[str, Any]) -> bool:
    return pod_ready(pod.get("status") or {})


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    state = tmp_path_factory.mktemp("rayservice")
    cluster = LocalCluster(
        ClusterConfig(
            name="rayservice",
            pools=(NodePool(count=1),),
            kuberay=True,
            real_nodes=1,
            state_dir=state / "cluster",
        )
    )
    with cluster:
        kube = Kube(cluster, Console(stderr=True))
        ray_image = images.ray_image()
        cluster.load_image(ray_image.archive)
        kube.install_crd()
        kube.create_namespace(NAMESPACE)
        kube.install_operator(
            f"--set=operator.servingImage={ray_image.name}",
            f"--set=operator.rayAcceleratorResource={FAKE_GPU}",
            "--set=operator.resyncIntervalSeconds=5",
            *LOCAL_RAY_POD_VALUES,
        )
        kubectl = Kubectl(cluster.kubeconfig)
        model_dir = state / "model"
        manifest = on_real_node(tiny_manifest(model_dir, write_tiny_checkpoint(model_dir)))
        del manifest["spec"]["autoscaling"]  # the tests scale by hand
        manifest["spec"]["serving"]["requestTimeoutSeconds"] = REQUEST_TIMEOUT_S
        for volume in weights_volume(model_dir, NAMESPACE):
            kubectl.apply(volume, NAMESPACE)
        kubectl.apply(manifest, NAMESPACE)
        service = kube.wait_for_service(NAME, NAMESPACE)
        port = service["spec"]["ports"][0]["port"]
        found = Deployed(
            cluster,
            kubectl,
            f"http://{service['spec']['clusterIP']}:{port}/v1",
            ray_image.name,
        )
        # Ray pods start, then vLLM builds its engine (a minute or two on 2 shared cores).
        wait_for(
            lambda: found.conditions().get("Ready", {}).get("status") == "True",
            900,
            "tiny Ready through its RayService",
        )
        yield found


@dataclass
class Outcomes:
    """How each request of a load ended: an HTTP status, or the client's exception."""

    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: float = field(default_factory=time.monotonic)
    failures: list[str] = field(default_factory=list)  # when each non-200 came, for the log

    def add(self, outcome: str) -> None:
        with self.lock:
            self.counts[outcome] += 1
            if outcome != "200":
                self.failures.append(f"{outcome} at {time.monotonic() - self.started:.0f} s")


@contextmanager
def load(base_url: str, clients: int = 3, pause_s: float = 0.5) -> Iterator[Outcomes]:
    """`clients` threads sending chat requests until the block ends, each pausing `pause_s`
    between requests; every outcome counted. Back-to-back requests would keep both cores busy
    and starve a second engine building beside the first (10 minutes and more)."""
    outcomes = Outcomes()
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
            while not stop.is_set():
                try:
                    response = client.post(
                        f"{base_url}/chat/completions",
                        json={
                            "model": NAME,
                            "messages": [{"role": "user", "content": "Hello"}],
                            "max_tokens": 16,
                        },
                    )
                    outcomes.add(str(response.status_code))
                except httpx.HTTPError as error:
                    outcomes.add(type(error).__name__)
                stop.wait(pause_s)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in threads), "a request never ended"


def test_the_ray_pods_run_on_the_real_node_and_the_endpoint_answers(deployed: Deployed) -> None:
    ray_service = deployed.kubectl.get("rayservice", NAME, NAMESPACE)
    assert ray_service is not None
    kuberay = {c["type"]: c["status"] for c in ray_service["status"]["conditions"]}
    assert kuberay["Ready"] == "True"
    listed = deployed.kubectl.run(
        "get", "pods", "-n", NAMESPACE, "-o", "json", "-l", f"serving.llama4.dev/deployment={NAME}"
    )  # fmt: skip
    pods = yaml.safe_load(listed)["items"]
    kinds = sorted(p["metadata"]["labels"]["ray.io/node-type"] for p in pods)
    assert kinds == ["head", "worker"]
    for pod in pods:
        assert pod["spec"]["nodeName"] == "real-node-0"
        assert pod["spec"]["containers"][0]["image"] == deployed.ray_image
        assert ready(pod), pod["metadata"]["name"]
    condition = deployed.conditions()["Ready"]
    assert condition["reason"] == "ServeApplicationRunning", condition
    assert deployed.deployment()["status"]["readyReplicas"] == 1

    client = openai.OpenAI(base_url=deployed.base_url, api_key="unused", timeout=120)
    assert NAME in [model.id for model in client.models.list()]
    reply = client.chat.completions.create(
        model=NAME, max_tokens=8, messages=[{"role": "user", "content": "Hello, world!"}]
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    assert reply.choices[0].message.content


def _scale(deployed: Deployed, replicas: int) -> None:
    deployed.kubectl.run(
        "scale", f"llama4deployment/{NAME}", "-n", NAMESPACE, f"--replicas={replicas}"
    )


def _serving(deployed: Deployed, replicas: int) -> bool:
    status = deployed.deployment().get("status") or {}
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    workers = deployed.worker_pods()
    return (
        conditions.get("Ready") == "True"
        and conditions.get("Progressing") == "False"
        and status.get("readyReplicas") == replicas
        and len(workers) == replicas
        and all(ready(pod) for pod in workers)
    )


def test_scaling_one_two_one_through_the_ray_service_keeps_serving(deployed: Deployed) -> None:
    # Two clients: the second engine builds on the same two cores while the first serves
    # (5 to 10 minutes here).
    with load(deployed.base_url, clients=2) as outcomes:
        _scale(deployed, 2)
        wait_for(lambda: _serving(deployed, 2), 900, "two replicas serving", SERVING_POLL_S)
        scaled_up = time.monotonic() - outcomes.started
        groups = sorted(p["metadata"]["labels"]["ray.io/group"] for p in deployed.worker_pods())
        assert groups == ["r0-w0", "r1-w0"]
        print(f"with two replicas: {serve_placement(deployed)}")
        _scale(deployed, 1)
        wait_for(lambda: _serving(deployed, 1), 300, "back to one replica serving", SERVING_POLL_S)
        scaled_down = time.monotonic() - outcomes.started
        print(f"back to one replica: {serve_placement(deployed)}")
        settled = outcomes.counts["200"]
        wait_for(lambda: outcomes.counts["200"] >= settled + 5, 60, "answers after the scale-down")
    print(
        f"requests while scaling 1 -> 2 -> 1: {dict(outcomes.counts)}; two serving at "
        f"{scaled_up:.0f} s, one at {scaled_down:.0f} s; failures: {outcomes.failures}"
    )
    assert set(outcomes.counts) == {"200"}, outcomes.counts
    assert outcomes.counts["200"] > 20


def test_a_worker_pod_killed_under_load_is_replaced_and_no_request_hangs(
    deployed: Deployed,
) -> None:
    wait_for(lambda: _serving(deployed, 1), 300, "one replica serving", SERVING_POLL_S)
    [worker] = deployed.worker_pods()
    with load(deployed.base_url) as outcomes:
        wait_for(lambda: outcomes.counts["200"] >= 3, 60, "answers before the fault")
        deployed.kubectl.run(
            "delete", "pod", worker["metadata"]["name"], "-n", NAMESPACE,
            "--grace-period=0", "--force",
        )  # fmt: skip

        def degraded() -> dict[str, str] | None:
            condition = deployed.conditions()["Degraded"]
            return condition if condition["status"] == "True" else None

        lost = wait_for(degraded, 60, "Degraded for the lost worker")
        assert lost["reason"] == "RayWorkerLost", lost
        assert "r0-w0" in lost["message"]
        wait_for(
            lambda: _serving(deployed, 1),
            600,
            "Ready again on a replacement worker",
            SERVING_POLL_S,
        )
        # Ready means the engine answers: KubeRay says the application is healthy a minute
        # before vLLM has rebuilt its engine on the new pod, which the operator must not trust.
        started = time.monotonic()
        reply = httpx.post(
            f"{deployed.base_url}/chat/completions",
            json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=READY_ANSWER_S,
        )
        assert reply.status_code == 200, reply.text
        print(f"first answer after Ready came back: {time.monotonic() - started:.1f} s")
        answered_before = outcomes.counts["200"]
        wait_for(lambda: outcomes.counts["200"] >= answered_before + 3, 120, "answers after")
    [replacement] = deployed.worker_pods()
    assert replacement["metadata"]["name"] != worker["metadata"]["name"]
    assert deployed.conditions()["Degraded"]["status"] == "False"
    # Every request ended with an HTTP answer: 200, or an error status while the replica was
    # gone (500 for those in flight, 408 past requestTimeoutSeconds); none hung.
    print(f"requests around the lost worker: {dict(outcomes.counts)}")
    assert all(outcome.isdigit() for outcome in outcomes.counts), outcomes.counts
    assert set(outcomes.counts) <= {"200", "408", "500", "502", "503"}, outcomes.counts


def test_the_workers_mount_the_weights_claim_and_declare_the_accelerator(
    deployed: Deployed,
) -> None:
    ray_service = deployed.kubectl.get("rayservice", NAME, NAMESPACE)
    assert ray_service is not None
    [group] = [
        g
        for g in ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if g["groupName"] == "r0-w0"
    ]
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "tiny-weights"
    assert group["rayStartParams"] == {"num-gpus": "0", "resources": f"'{{\"{FAKE_GPU}\":1}}'"}

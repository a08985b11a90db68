"""The README's main job, `llama4ctl dev demo`, as a user runs it (detached, so the test can
look around and then stop it the way the README says): the tiny model, served by the default
engine (vLLM) in a RayService whose Ray head and worker pods run on the cluster's real kubelet
node from the Ray image built here, answers OpenAI requests through the endpoint the demo
printed (the deployment's Service); the operator (two Helm-installed pods from the image built
here, on the same node) reports it Ready and placed, the demo's load makes the autoscaler add a
replica (read from Prometheus, which scrapes the operator and the Ray pods), and `cluster down`
leaves no process behind, the containers' included. It runs where a user's shell holds a Ray
token file, which a Ray on the host would act on: the demo must not depend on it."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from llama4_operator.devenv import real_nodes
from llama4_operator.devenv.cluster import CLUSTER_ENV, ClusterConfig, LocalCluster
from llama4_operator.devenv.demo import NAMESPACE, SUMMARY_FILE
from llama4_operator.devenv.local_prometheus import target_health
from support import llama4ctl, process_running, wait_for

pytestmark = pytest.mark.cluster


def _processes() -> dict[int, tuple[str, Path, bytes]]:
    """pid -> (command line, working directory, environment) of every readable process."""
    found: dict[int, tuple[str, Path, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environment = (entry / "environ").read_bytes()
            cwd = (entry / "cwd").resolve()
        except OSError:
            continue
        found[int(entry.name)] = (command, cwd, environment)
    return found


def _started_by(directory: Path) -> dict[int, str]:
    """Processes of the demo's cluster: started in its state directory, or carrying its mark."""
    marker = f"{CLUSTER_ENV}={directory}".encode()
    return {
        pid: command
        for pid, (command, cwd, environment) in _processes().items()
        if cwd == directory.resolve() or marker in environment.split(b"\0")
    }


def _pods(cluster: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    listed = llama4ctl(
        "dev", "kubectl", "--name", cluster, "get", "pods", "-n", namespace, "-l", selector,
        "-o", "json",
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    pods: list[dict[str, Any]] = json.loads(listed.stdout)["items"]
    return [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]


def _real_nodes(directory: Path) -> list[dict[str, Any]]:
    state = json.loads((directory / "processes.json").read_text())
    return list(state.get("real_nodes", []))


@contextlib.contextmanager
def _steady_load(client: OpenAI, model: str, clients: int = 2) -> Iterator[None]:
    """`clients` threads sending chat requests until the block ends, half a second apart (errors
    are ignored: the test asserts on the deployment, not on these requests). Still far above the
    autoscaler's target, while back-to-back requests would starve the second engine's build."""
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                client.chat.completions.create(
                    model=model, max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
                )
            stop.wait(0.5)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=130)


def a_user_environment_with_a_ray_token(directory: Path) -> dict[str, str]:
    """This environment as a user's shell has it after some earlier use of Ray with token
    authentication: a token file Ray finds, and no RAY_AUTH_MODE (which makes Ray turn token
    authentication on by itself). The demo must work all the same."""
    token = directory / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    return env


# The demo builds and loads the Ray image and starts two vLLM engines: past the suite's 900 s.
@pytest.mark.timeout(2400)
def test_demo_serves_the_tiny_model_and_stops_cleanly(tmp_path: Path) -> None:
    name = f"demo-{uuid.uuid4().hex[:6]}"
    cluster = LocalCluster(ClusterConfig(name=name))
    directory = cluster.directory
    container_pids: set[int] = set()
    try:
        demo = llama4ctl(
            "dev", "demo", "--name", name, "--detach", "--load-seconds", "20",
            timeout_s=1200, env=a_user_environment_with_a_ray_token(tmp_path),
        )  # fmt: skip
        assert demo.returncode == 0, demo.stderr[-4000:]
        summary = json.loads((directory / SUMMARY_FILE).read_text())
        base_url = summary["openai_base_url"]
        assert f"OpenAI base URL: {base_url}" in demo.stderr
        assert "The answer" in demo.stderr
        assert "answered" in demo.stderr  # the load's progress line

        client = OpenAI(base_url=base_url, api_key="unused", timeout=120)
        reply = client.chat.completions.create(
            model=summary["model"],
            max_tokens=8,
            messages=[{"role": "user", "content": "Hello, world!"}],
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens > 0
        assert reply.choices[0].message.content

        def tiny() -> dict[str, Any]:
            listed = llama4ctl(
                "dev", "kubectl", "--name", name, "get", "l4d", "tiny", "-n", NAMESPACE,
                "-o", "json",
            )  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            return dict(json.loads(listed.stdout))

        # The demo's load (far above 10 tokens/s per replica) scales 1 -> 2; the deployment is
        # Ready on both replicas once the new vLLM engine runs (5 to 10 minutes to build here). Load
        # goes on meanwhile, so that a slow start does not meet the scale-down after a minute of
        # no load.
        def scaled_up() -> dict[str, Any] | None:
            status = tiny()["status"]
            ready = {c["type"]: c["status"] for c in status["conditions"]}
            return status if ready["Ready"] == "True" and status["readyReplicas"] == 2 else None

        with _steady_load(client, summary["model"]):
            status = wait_for(
                scaled_up, 900, "the autoscaler to bring tiny to 2 ready replicas", interval_s=10
            )
        assert status["autoscaling"]["managesReplicas"] is True
        events = llama4ctl(
            "dev", "kubectl", "--name", name, "get", "events", "-n", NAMESPACE,
            "--field-selector", "involvedObject.name=tiny,reason=ScaledUp", "-o", "name",
        )  # fmt: skip
        assert events.stdout.strip(), "no ScaledUp event on the tiny deployment"
        # The operator runs as pods on the real node, from the image the demo built and loaded.
        pods = _pods(name, "llama4-system", "app.kubernetes.io/instance=llama4-operator")
        assert len(pods) == 2
        assert {pod["spec"]["nodeName"] for pod in pods} == {"real-node-0"}
        assert {pod["status"]["phase"] for pod in pods} == {"Running"}
        assert pods[0]["spec"]["containers"][0]["image"].startswith("llama4.dev/llama4-operator:")
        # So do the Ray pods of its RayService: a head and a worker per replica, from the Ray
        # image the demo built.
        ray_pods = _pods(name, NAMESPACE, "serving.llama4.dev/deployment=tiny")
        roles = sorted(pod["metadata"]["labels"]["ray.io/node-type"] for pod in ray_pods)
        assert roles == ["head", "worker", "worker"], roles
        assert {pod["spec"]["nodeName"] for pod in ray_pods} == {"real-node-0"}
        images = {pod["spec"]["containers"][0]["image"] for pod in ray_pods}
        assert len(images) == 1
        assert images.pop().startswith("llama4.dev/llama4-serving:")
        ray_service = json.loads(
            llama4ctl(
                "dev", "kubectl", "--name", name, "get", "rayservice", "tiny", "-n", NAMESPACE,
                "-o", "json",
            ).stdout
        )  # fmt: skip
        kuberay = {c["type"]: c["status"] for c in ray_service["status"]["conditions"]}
        assert kuberay["Ready"] == "True"
        assert "Running on" in demo.stderr
        real_node_state = [Path(record["directory"]) for record in _real_nodes(directory)]
        assert real_node_state
        assert all(path.exists() for path in real_node_state)
        nodes = {node["name"] for node in cluster.nodes()}
        nodes |= {node["name"] for node in cluster.nodes(real=True)}
        placed = [w["node"] for r in status["placement"]["replicas"] for w in r["workers"]]
        assert placed
        assert set(placed) <= nodes

        # The operator, and the Ray pods' metrics agents, which export the vLLM engine's series.
        for job in ("llama4-operator", "ray"):
            wait_for(
                lambda job=job: "up" in target_health(summary["prometheus_url"]).get(job, []),
                60,
                f"Prometheus to scrape {job}",
            )
        container_pids = {
            pid
            for record in _real_nodes(directory)
            for pid in real_nodes.cgroup_processes(real_nodes.node_from_record(record))
        }
        commands = {_processes().get(pid, ("",))[0] for pid in container_pids}
        assert any("raylet" in command for command in commands), "no raylet in the node's pods"
    finally:
        down = llama4ctl("dev", "cluster", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert not cluster.running_processes()
    assert not _started_by(directory), "processes of the demo outlived `cluster down`"
    still_running = [pid for pid in container_pids if process_running(pid)]
    assert not still_running, f"container processes outlived `cluster down`: {still_running}"
    assert not directory.exists()
    assert not [path for path in real_node_state if path.exists()]

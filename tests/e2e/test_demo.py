"""The README's main job, `llama4ctl dev demo`, as a user runs it (detached, so the test can
look around and then stop it the way the README says): the tiny model, served by the default
engine (vLLM), answers OpenAI requests through the endpoint the demo printed, the operator (two
Helm-installed pods from the image built here, on the cluster's real kubelet node) reports it
Ready and placed, the demo's load makes the autoscaler add a replica (read from
Prometheus, which scrapes the operator and Ray's metrics agents), and `cluster down` leaves no
process behind, Ray's included. It runs where a user's shell holds a Ray token file, which makes
Ray turn token authentication on by itself unless told otherwise."""

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

from llama4_operator.devenv.cluster import CLUSTER_ENV, ClusterConfig, LocalCluster
from llama4_operator.devenv.demo import NAMESPACE, SUMMARY_FILE
from llama4_operator.devenv.local_prometheus import target_health
from llama4_operator.devenv.local_ray import RayClusterStarter
from support import llama4ctl, wait_for

pytestmark = pytest.mark.cluster

RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray start", "ray::", "dashboard")


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


def _real_nodes(directory: Path) -> list[dict[str, Any]]:
    state = json.loads((directory / "processes.json").read_text())
    return list(state.get("real_nodes", []))


@contextlib.contextmanager
def _steady_load(client: OpenAI, model: str, clients: int = 2) -> Iterator[None]:
    """`clients` threads sending chat requests until the block ends (errors are ignored: the
    test asserts on the deployment, not on these requests)."""
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                client.chat.completions.create(
                    model=model, max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
                )

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


def test_demo_serves_the_tiny_model_and_stops_cleanly(tmp_path: Path) -> None:
    name = f"demo-{uuid.uuid4().hex[:6]}"
    cluster = LocalCluster(ClusterConfig(name=name))
    directory = cluster.directory
    ray_temp_dir = RayClusterStarter(cluster).temp_dir
    ray_pids: dict[int, str] = {}
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
        # Ready on both replicas once the new vLLM engine runs (a minute or more to build). Load
        # goes on meanwhile, so that a slow start does not meet the scale-down after a minute of
        # no load.
        def scaled_up() -> dict[str, Any] | None:
            status = tiny()["status"]
            ready = {c["type"]: c["status"] for c in status["conditions"]}
            return status if ready["Ready"] == "True" and status["readyReplicas"] == 2 else None

        with _steady_load(client, summary["model"]):
            status = wait_for(scaled_up, 480, "the autoscaler to bring tiny to 2 ready replicas")
        assert status["autoscaling"]["managesReplicas"] is True
        events = llama4ctl(
            "dev", "kubectl", "--name", name, "get", "events", "-n", NAMESPACE,
            "--field-selector", "involvedObject.name=tiny,reason=ScaledUp", "-o", "name",
        )  # fmt: skip
        assert events.stdout.strip(), "no ScaledUp event on the tiny deployment"
        # The operator runs as pods on the real node, from the image the demo built and loaded.
        pods = json.loads(
            llama4ctl(
                "dev", "kubectl", "--name", name, "get", "pods", "-n", "llama4-system",
                "-l", "app.kubernetes.io/instance=llama4-operator", "-o", "json",
            ).stdout
        )["items"]  # fmt: skip
        assert len(pods) == 2
        assert {pod["spec"]["nodeName"] for pod in pods} == {"real-node-0"}
        assert {pod["status"]["phase"] for pod in pods} == {"Running"}
        assert pods[0]["spec"]["containers"][0]["image"].startswith("llama4.dev/llama4-operator:")
        assert "Running on" in demo.stderr
        real_node_state = [Path(record["directory"]) for record in _real_nodes(directory)]
        assert real_node_state
        assert all(path.exists() for path in real_node_state)
        nodes = {node["name"] for node in cluster.nodes()}
        nodes |= {node["name"] for node in cluster.nodes(real=True)}
        placed = [w["node"] for r in status["placement"]["replicas"] for w in r["workers"]]
        assert placed
        assert set(placed) <= nodes

        # The operator, and Ray's metrics agents, which export the vLLM engine's series.
        for job in ("llama4-operator", "ray"):
            wait_for(
                lambda job=job: "up" in target_health(summary["prometheus_url"]).get(job, []),
                60,
                f"Prometheus to scrape {job}",
            )
        ray_pids = {
            pid: command
            for pid, command in _started_by(directory).items()
            if any(word in command for word in RAY_PROCESS_NAMES)
        }
        assert ray_pids, "the demo's Ray processes carry no mark of the cluster"
    finally:
        down = llama4ctl("dev", "cluster", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert not cluster.running_processes()
    assert not _started_by(directory), "processes of the demo outlived `cluster down`"
    now = _processes()
    still_running = {pid: cmd for pid, cmd in ray_pids.items() if now.get(pid, ("",))[0] == cmd}
    assert not still_running, still_running
    assert not directory.exists()
    assert not ray_temp_dir.exists()
    assert not [path for path in real_node_state if path.exists()]

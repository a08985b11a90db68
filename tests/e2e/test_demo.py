"""The README's main job, `llama4ctl dev demo`, as a user runs it (detached, so the test can
look around and then stop it the way the README says)."""

from __future__ import annotations

import json
import uuid

import pytest

from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster
from support import llama4ctl

pytestmark = pytest.mark.cluster


def test_demo_places_the_samples_and_stops_cleanly() -> None:
    name = f"demo-{uuid.uuid4().hex[:6]}"
    cluster = LocalCluster(ClusterConfig(name=name))
    try:
        demo = llama4ctl("dev", "demo", "--name", name, "--detach")
        assert demo.returncode == 0, demo.stderr[-3000:]
        assert "16 simulated GPU nodes Ready" in demo.stderr
        assert "maverick" in demo.stderr
        assert "scout" in demo.stderr
        assert "llama4-operator" in cluster.running_processes()
        pods = llama4ctl(
            "dev", "kubectl", "--name", name, "get", "pods", "-n", "llama4-demo", "-o", "json"
        )
        deployments = llama4ctl(
            "dev", "kubectl", "--name", name, "get", "l4d", "-n", "llama4-demo", "-o", "json"
        )
        placed_nodes = {
            worker["node"]
            for item in json.loads(deployments.stdout)["items"]
            for replica in item["status"]["placement"]["replicas"]
            for worker in replica["workers"]
        }
        worker_nodes = {
            pod["spec"]["nodeName"]
            for pod in json.loads(pods.stdout)["items"]
            if "worker" in pod["metadata"]["name"] and pod["status"].get("phase") == "Running"
        }
        assert worker_nodes == placed_nodes
        assert len(placed_nodes) == 2  # Maverick on one 8-GPU host, Scout on one GPU of another
    finally:
        down = llama4ctl("dev", "cluster", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert not cluster.running_processes()

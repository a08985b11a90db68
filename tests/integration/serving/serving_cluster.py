"""A real local Ray cluster (a head and two worker nodes declaring fake GPUs) running the Serve
app the operator deploys, with a tiny random checkpoint and tokenizer written for the run."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # inherited by every raylet and worker started below

import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from llama4_serving.config import ModelArchitecture
from llama4_serving.tiny import write_tiny_model

APP = "llama4"
MODEL = "tiny-llama4"
API_KEY = "test-key-123"
FAKE_GPU = "fake_gpu"
# 2 nodes x 2 GPUs x 2 slots: every expert has two copies, on different nodes.
PLAN_V0: dict[str, Any] = {
    "nodes": 2,
    "gpus_per_node": 2,
    "slots_per_gpu": 2,
    "phy2log": [[0, 1, 2, 3, 0, 1, 2, 3], [3, 2, 1, 0, 0, 1, 2, 3]],
    "version": 0,
}
PLAN_V1: dict[str, Any] = {
    "nodes": 2,
    "gpus_per_node": 2,
    "slots_per_gpu": 2,
    "phy2log": [[1, 0, 3, 2, 2, 3, 0, 1], [0, 1, 2, 3, 3, 2, 1, 0]],
    "version": 1,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServingCluster:
    """The running app and what tests need to talk to it."""

    base_url: str
    model_dir: Path
    architecture: ModelArchitecture
    args: dict[str, Any]
    worker_labels: dict[str, str]  # Ray node id -> value of the llama4.dev/ep-node label

    def deploy(self, user_config: dict[str, Any] | None = None) -> None:
        """Deploy through the declarative API (what KubeRay uses); `user_config` overrides
        LLMServer's runtime knobs with `args` unchanged."""
        app: dict[str, Any] = {
            "name": APP,
            "route_prefix": "/",
            "import_path": "llama4_serving.app:build_app",
            "args": self.args,
        }
        if user_config is not None:
            app["deployments"] = [{"name": "LLMServer", "user_config": user_config}]
        self.deploy_application(app)

    def deploy_application(self, application: dict[str, Any]) -> None:
        """Deploy one application of a Serve config as given (e.g. as the operator renders it)."""
        client = _get_global_client()
        assert client is not None, "serve.start() has not run"
        client.deploy_apps(ServeDeploySchema.model_validate({"applications": [application]}))


def wait_running(timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in {"DEPLOY_FAILED", "UNHEALTHY"}:
            raise AssertionError(f"app failed: {status.message}")
        time.sleep(1)
    raise AssertionError("the app did not reach RUNNING in time")


@contextlib.contextmanager
def running_serving_cluster(model_dir: Path) -> Iterator[ServingCluster]:
    """Start the cluster, deploy the app with the tiny model written to `model_dir`, wait until
    it runs; stop everything on exit."""
    arch = write_tiny_model(model_dir)
    key_file = model_dir / "api-key"
    key_file.write_text(API_KEY + "\n")
    cluster = Cluster(
        initialize_head=True,
        # The dashboard serves Ray's state API, which the tests use to see where actors run.
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": _free_port()},
    )
    labels = {}
    for index in range(2):
        node = cluster.add_node(
            num_cpus=1,
            resources={FAKE_GPU: 2},
            labels={"llama4.dev/ep-node": str(index)},
        )
        labels[node.node_id] = str(index)
    ray.init(address=cluster.address)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    args = {
        "served_model_name": MODEL,
        "architecture": arch.model_dump(),
        "weights": {"kind": "path", "uri": str(model_dir)},
        "placement": PLAN_V0,
        "batching": {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 128},
        "api_key_file": str(key_file),
        "accelerator_resource": FAKE_GPU,
        "metrics_port": 0,
        "engine_args": {"replica_num_cpus": 0.5, "torch_threads": 1},
    }
    serving = ServingCluster(f"http://127.0.0.1:{port}", model_dir, arch, args, labels)
    try:
        serving.deploy()
        wait_running(600.0)  # a first start on a busy 2-core machine can take minutes
        yield serving
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()

"""A real Ray cluster with Serve's HTTP proxy, in processes of its own (the test process never
joins it): a head and a worker declaring fake GPUs, as the operator's external-Ray mode finds a
user's cluster. Ray's metrics agents export every node's series (vLLM's among them) on ports
listed in Ray's Prometheus service-discovery file."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llama4_operator.devenv.cluster import free_port
from llama4_serving.config import is_engine_deployment
from support import wait_for

# Ray processes inherit these: nothing fetched from hubs, no usage reports, no token
# authentication (whatever ~/.ray holds), and time for a dashboard agent to start on a busy
# 2-core machine.
RAY_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_agent_register_timeout_ms": "120000",
    "RAY_raylet_start_wait_time_s": "180",
}


@dataclass
class RayServe:
    dashboard: str
    serve_url: str
    temp_dir: Path
    auth_token: str | None = None

    @property
    def metrics_discovery_file(self) -> Path:
        """Ray's Prometheus file-based service discovery of every node's metrics port."""
        return self.temp_dir / "prom_metrics_service_discovery.json"

    def application(self, name: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
        response = httpx.get(
            f"{self.dashboard}/api/serve/applications/", timeout=10, headers=headers
        )
        response.raise_for_status()
        app: dict[str, Any] = (response.json().get("applications") or {}).get(name) or {}
        return app

    def engine_replica_ids(self, app_name: str, state: str | None = "RUNNING") -> list[str]:
        """Ids of the replicas of the application's engine deployment (`LLMServer`, or
        `LLMServer:<model>` for vLLM) in `state` (None: in any state, stopping ones too)."""
        deployments = self.application(app_name).get("deployments") or {}
        return sorted(
            str(replica["replica_id"])
            for name, deployment in deployments.items()
            if is_engine_deployment(name)
            for replica in deployment.get("replicas") or []
            if state is None or replica.get("state") == state
        )


@contextlib.contextmanager
def ray_serve_cluster(
    log_dir: Path, worker_cpus: int = 4, auth_token: str | None = None
) -> Iterator[RayServe]:
    """Start the cluster and Serve; shut both down on exit. With `auth_token`, the cluster has
    Ray's token authentication on (RAY_AUTH_MODE=token) with that token."""
    from ray._raylet import Config
    from ray.cluster_utils import Cluster

    os.environ.update(RAY_ENV)
    if auth_token is not None:
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token})
    # This process talks to the cluster's GCS too: re-read the authentication mode, which Ray
    # caches from the environment.
    Config.initialize("")
    started = time.monotonic()
    dashboard_port, serve_port = free_port(), free_port()
    # Short: Ray's socket paths must stay under 108 bytes.
    temp_dir = Path(f"/tmp/llama4-ray-test-{os.getpid()}")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "temp_dir": str(temp_dir),
        },
    )
    try:
        # Expert shards and vLLM replicas take fake GPUs (plenty: they cost nothing).
        cluster.add_node(
            num_cpus=worker_cpus, resources={"fake_gpu": 16}, labels={"llama4.dev/ep-node": "0"}
        )
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        log = log_dir / "serve-start.log"
        with log.open("wb") as out:
            result = subprocess.run(
                [
                    str(Path(sys.executable).with_name("serve")),
                    "start",
                    f"--address={cluster.address}",
                    "--http-host=127.0.0.1",
                    f"--http-port={serve_port}",
                    "--proxy-location=HeadOnly",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
                timeout=300,
                check=False,
            )
        assert result.returncode == 0, f"`serve start` failed: {log.read_text()[-3000:]}"
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        wait_for(
            lambda: (
                httpx.get(
                    f"{dashboard}/api/serve/applications/", timeout=10, headers=headers
                ).is_success
            ),
            180,
            "the Ray dashboard's Serve API",
        )
        print(f"Ray cluster and Serve ready in {time.monotonic() - started:.0f} s")
        yield RayServe(dashboard, f"http://127.0.0.1:{serve_port}", temp_dir, auth_token)
    finally:
        cluster.shutdown()
        os.environ.update(RAY_ENV)
        os.environ.pop("RAY_AUTH_TOKEN", None)
        Config.initialize("")
        shutil.rmtree(temp_dir, ignore_errors=True)

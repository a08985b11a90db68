"""A real local Ray cluster for the demo: a head raylet and worker raylets that declare fake GPUs
as a custom resource, with Ray Serve's HTTP proxy on the head.

Each raylet is a `ray start --block` component of a `LocalCluster`, so `llama4ctl dev cluster
down` stops every Ray process with the rest (the cluster marks their environment, which Ray's
workers inherit). Every port is chosen free up front, so several local Ray clusters can share a
machine. Ray's temporary directory is short and outside the state directory (Ray's Unix socket
paths must stay under 108 bytes); the cluster records it and `down` deletes it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llama4_operator.devenv.cluster import (
    CLUSTER_ENV,
    LOOPBACK,
    ClusterError,
    Component,
    LocalCluster,
    Ready,
    free_port,
    port_is_bound,
)

FAKE_GPU = "fake_gpu"
# The expert-parallel engine orders Ray nodes by this label (plan node i = i-th node).
NODE_ORDER_LABEL = "llama4.dev/ep-node"
# The operator writes external-Ray endpoints with Serve's default HTTP port; use it when free.
DEFAULT_SERVE_PORT = 8000
# A raylet gives its dashboard agent a fixed 15 s to start; on a busy machine it needs priority.
STARTUP_NICENESS = -10
OBJECT_STORE_BYTES = 256 * 1024 * 1024
# Every process Ray starts gets these (workers too): no usage reports, nothing fetched from hubs.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    # A raylet waits this long for its dashboard agent; on a busy 2-core machine the agent
    # can take more than the default 15 s to import and start.
    "RAY_agent_register_timeout_ms": "120000",
    # Ray turns token authentication on by itself when a token file exists (~/.ray/auth_token,
    # left by any earlier Ray); the local cluster is loopback-only and says so explicitly.
    "RAY_AUTH_MODE": "disabled",
}


@dataclass(frozen=True)
class RayNodes:
    """The shape of the local Ray cluster: a head and `workers` fake-GPU nodes; with no
    workers the head declares the fake GPUs itself (the lightest cluster: one raylet)."""

    workers: int = 0
    fake_gpus_per_node: int = 4
    cpus_per_node: int = 2


@dataclass(frozen=True)
class LocalRay:
    gcs_address: str
    dashboard_url: str
    serve_url: str
    temp_dir: Path

    @property
    def metrics_discovery_file(self) -> Path:
        """Ray's Prometheus file-based service discovery of every node's metrics port."""
        return self.temp_dir / "prom_metrics_service_discovery.json"


def _script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _node_ports() -> list[str]:
    """Free ports for everything a raylet listens on besides its workers' range."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def _common_flags(cpus: int, resources: dict[str, int]) -> list[str]:
    return [
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--num-cpus={cpus}",
        "--num-gpus=0",
        f"--resources={json.dumps(resources)}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
        *_node_ports(),
    ]


class RayClusterStarter:
    """Starts the Ray components of one LocalCluster and Serve on it."""

    def __init__(
        self, cluster: LocalCluster, nodes: RayNodes | None = None, dashboard_host: str = LOOPBACK
    ) -> None:
        self.cluster = cluster
        self.nodes = nodes or RayNodes()
        # The cluster's bridge address when the operator runs as a pod on a real node.
        self.dashboard_host = dashboard_host
        digest = hashlib.sha256(str(cluster.directory).encode()).hexdigest()[:10]
        self.temp_dir = Path("/tmp") / f"llama4-ray-{digest}"

    def start(self) -> LocalRay:
        self._compile_ray_bytecode()
        gcs_port, dashboard_port, client_port = free_port(), free_port(), free_port()
        serve_port = DEFAULT_SERVE_PORT if not port_is_bound(DEFAULT_SERVE_PORT) else free_port()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.cluster.track(
            ports={
                "ray_gcs": gcs_port,
                "ray_dashboard": dashboard_port,
                "ray_client": client_port,
                "serve_http": serve_port,
            },
            directories=[self.temp_dir],
        )
        dashboard = f"http://{self.dashboard_host}:{dashboard_port}"
        gcs_address = f"{LOOPBACK}:{gcs_port}"
        head = [
            _script("ray"),
            "start",
            "--head",
            f"--port={gcs_port}",
            f"--ray-client-server-port={client_port}",
            "--include-dashboard=true",
            f"--dashboard-host={self.dashboard_host}",
            f"--dashboard-port={dashboard_port}",
            f"--temp-dir={self.temp_dir}",
            *([f"--labels={NODE_ORDER_LABEL}=0"] if not self.nodes.workers else []),
            *_common_flags(
                self.nodes.cpus_per_node,
                {} if self.nodes.workers else {FAKE_GPU: self.nodes.fake_gpus_per_node},
            ),
        ]
        self._start_node(
            Component("ray-head", head, dict(RAY_ENV)),
            ready=lambda: self._nodes_alive(dashboard, 1) and _serve_api_answers(dashboard),
        )
        for index in range(self.nodes.workers):
            worker = [
                _script("ray"),
                "start",
                f"--address={gcs_address}",
                f"--labels={NODE_ORDER_LABEL}={index}",
                *_common_flags(self.nodes.cpus_per_node, {FAKE_GPU: self.nodes.fake_gpus_per_node}),
            ]
            self._start_node(
                Component(f"ray-worker-{index}", worker, dict(RAY_ENV)),
                ready=functools.partial(self._nodes_alive, dashboard, index + 2),
            )
        serve_url = self._start_serve(gcs_address, dashboard, serve_port)
        return LocalRay(gcs_address, dashboard, serve_url, self.temp_dir)

    def _compile_ray_bytecode(self) -> None:
        """Compile Ray's modules once (seconds when already done). Without bytecode, as under
        PYTHONDONTWRITEBYTECODE, each dashboard agent compiles Ray on every start and can miss
        the raylet's 15 s deadline on a small machine."""
        spec = importlib.util.find_spec("ray")
        if spec is None or spec.origin is None:
            raise ClusterError("Ray is not installed in this environment; run `make venv`")
        package = Path(spec.origin).parent
        with self.cluster.console.status("compiling Ray's Python bytecode (first run only) ..."):
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", "-j", "0", str(package)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,  # a module that does not compile only loses the speed-up
            )

    def _start_node(self, component: Component, ready: Ready, attempts: int = 4) -> None:
        """Start one raylet, again if it fails: a raylet gives its dashboard agent a fixed 15 s
        to report its ports, which a busy 2-core machine can miss."""
        if os.geteuid() == 0:
            # Ahead of other work while it starts (root may raise priority), then back to normal.
            component = Component(
                component.name, ["nice", f"-n{STARTUP_NICENESS}", *component.command], component.env
            )
        for attempt in range(1, attempts + 1):
            try:
                self.cluster.start_component(
                    component, self._unless_raylet_crashes(component.name, ready)
                )
            except RayAuthenticationError:
                raise  # another attempt meets the same 401
            except ClusterError as error:
                if attempt == attempts:
                    raise
                pid = self.cluster.running_processes().get(component.name)
                if pid is not None:  # not ready in time, but still running
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                reason = str(error).splitlines()[0]
                self.cluster.console.log(
                    f"[yellow]{component.name} did not start ({reason}); "
                    f"attempt {attempt + 1} of {attempts}"
                )
            else:
                pid = self.cluster.running_processes()[component.name]
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PGRP, pid, 0)
                return

    def _unless_raylet_crashes(self, name: str, ready: Ready) -> Ready:
        """`ready`, but failing as soon as a new raylet crash is logged: `ray start` itself
        notices only a minute later."""
        crashes = self._raylet_crashes()

        def check() -> bool:
            if self._raylet_crashes() > crashes:
                raise ClusterError(f"{name}'s raylet crashed")
            return ready()

        return check

    def _raylet_crashes(self) -> int:
        return sum(
            log.read_text(errors="replace").count("Check failed")
            for log in self.temp_dir.glob("session_*/logs/raylet*.out")
        )

    @staticmethod
    def _nodes_alive(dashboard: str, expected: int) -> bool:
        response = httpx.get(f"{dashboard}/api/v0/nodes", params={"limit": 100}, timeout=5)
        refuse_unauthenticated(response)
        if not response.is_success:
            return False
        nodes: list[dict[str, Any]] = response.json()["data"]["result"]["result"]
        alive: int = sum(node.get("state") == "ALIVE" for node in nodes)
        return alive >= expected

    def _start_serve(
        self, gcs_address: str, dashboard: str, port: int, timeout_s: float = 120
    ) -> str:
        """`serve start` with the proxy on the head only: every node is 127.0.0.1 here, so
        a proxy per node would fight over the port."""
        log_path = self.cluster.directory / "logs" / "serve-start.log"
        with log_path.open("wb") as log:
            result = subprocess.run(
                [
                    _script("serve"),
                    "start",
                    f"--address={gcs_address}",
                    f"--http-host={LOOPBACK}",
                    f"--http-port={port}",
                    "--proxy-location=HeadOnly",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cluster.directory,
                env={**os.environ, **RAY_ENV, CLUSTER_ENV: str(self.cluster.directory)},
                timeout=timeout_s,
                check=False,
            )
        if result.returncode != 0:
            raise ClusterError(
                f"`serve start` failed with code {result.returncode}; see {log_path}"
            )
        serve_url = f"http://{LOOPBACK}:{port}"
        deadline = time.monotonic() + timeout_s
        # The proxy's own /-/healthz answers 503 until an application exists; ask the dashboard.
        while not _proxy_healthy(dashboard):
            if time.monotonic() > deadline:
                raise ClusterError(f"Serve's proxy on {serve_url} was not healthy in time")
            time.sleep(0.5)
        self.cluster.console.log(f"[green]✓[/] Ray Serve HTTP proxy on {serve_url}")
        return serve_url


class RayAuthenticationError(ClusterError):
    """Ray's dashboard refused the dev environment's unauthenticated call (401)."""


def _serve_api_answers(dashboard: str) -> bool:
    response = httpx.get(f"{dashboard}/api/serve/applications/", timeout=5)
    refuse_unauthenticated(response)
    return response.is_success


def refuse_unauthenticated(response: httpx.Response) -> None:
    """Fail at once, saying why, when Ray's dashboard wants a token: waiting cannot help."""
    if response.status_code == httpx.codes.UNAUTHORIZED:
        raise RayAuthenticationError(
            f"Ray's dashboard answered 401 ({response.text.strip()[:200]}): token "
            "authentication is on for the Ray that answered, but the dev environment starts its "
            f"Ray with RAY_AUTH_MODE={RAY_ENV['RAY_AUTH_MODE']}, so another Ray may hold the "
            "port: stop it (`ray stop`) and run again"
        )


def _proxy_healthy(dashboard: str) -> bool:
    try:
        response = httpx.get(f"{dashboard}/api/serve/applications/", timeout=5)
    except httpx.HTTPError:
        return False
    refuse_unauthenticated(response)
    proxies = (response.json().get("proxies") or {}) if response.is_success else {}
    return any(proxy.get("status") == "HEALTHY" for proxy in proxies.values())

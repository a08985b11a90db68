"""A real Prometheus (the distribution's package) for the demo, as a LocalCluster component.

It scrapes the operator (job `llama4-operator`, which the project's rules select), Ray's node
metrics through the file Ray writes for service discovery (job `ray`: vLLM's series among them),
and, for the reference engine, its replicas found through the Serve app's HTTP service discovery
(`<serve url>/-/metrics/targets`, Prometheus' http_sd JSON of the live replicas' metrics ports).
It evaluates the project's rules in monitoring/rules.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from llama4_operator.devenv.cluster import (
    LOOPBACK,
    ClusterError,
    Component,
    LocalCluster,
    free_port,
)
from llama4_operator.renderers.children import METRICS_PORT as RAY_METRICS_PORT
from llama4_operator.serving_metrics import TARGETS_PATH

RULES_DIR = Path(__file__).resolve().parents[3] / "monitoring" / "rules"
SCRAPE_INTERVAL = "5s"


@dataclass(frozen=True)
class ScrapeTargets:
    # host:port of the operator's /metrics, or a file_sd file listing its pods (Debian's
    # Prometheus is built without Kubernetes service discovery).
    operator: str | Path
    namespace: str  # what prometheus-operator would add as `namespace` to the serving series
    ray_discovery_file: Path | None = None
    # RayService mode: the deployments' headless metrics Services, whose cluster DNS names
    # resolve to every Ray pod (Prometheus then resolves through the cluster's DNS).
    ray_pod_dns_names: tuple[str, ...] = ()
    # A reference-engine application's base URL (proxy + route prefix): it lists its replicas.
    app_url: str | None = None


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        raise ClusterError(
            "prometheus is not installed; run `make system-deps` (Debian's prometheus package)"
        )
    return found


def prometheus_config(targets: ScrapeTargets, rule_files: list[Path]) -> dict[str, Any]:
    # Replicas may label their targets with their namespace already; fill it in where not.
    serving_labels = [
        {
            "source_labels": ["namespace"],
            "regex": "",
            "target_label": "namespace",
            "replacement": targets.namespace,
        },
    ]
    jobs: list[dict[str, Any]] = [_operator_job(targets.operator)]
    if targets.app_url is not None:
        jobs.append(
            {
                "job_name": "llama4-serving",
                "http_sd_configs": [
                    {"url": f"{targets.app_url}{TARGETS_PATH}", "refresh_interval": "10s"}
                ],
                "relabel_configs": serving_labels,
            }
        )
    if targets.ray_discovery_file is not None:
        # The demo's Ray serves the demo's namespace only: its series belong there.
        jobs.append(
            {
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(targets.ray_discovery_file)]}],
                "relabel_configs": serving_labels,
            }
        )
    if targets.ray_pod_dns_names:
        jobs.append(
            {
                "job_name": "ray",
                "dns_sd_configs": [
                    {
                        "names": list(targets.ray_pod_dns_names),
                        "type": "A",
                        "port": RAY_METRICS_PORT,
                        "refresh_interval": "10s",
                    }
                ],
                "relabel_configs": serving_labels,
            }
        )
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": jobs,
    }


def _operator_job(operator: str | Path) -> dict[str, Any]:
    if isinstance(operator, Path):
        return {"job_name": "llama4-operator", "file_sd_configs": [{"files": [str(operator)]}]}
    return {"job_name": "llama4-operator", "static_configs": [{"targets": [operator]}]}


def start_prometheus(cluster: LocalCluster, targets: ScrapeTargets, host: str = LOOPBACK) -> str:
    """Start Prometheus as a component of `cluster` on `host`; returns its URL."""
    binary = prometheus_binary()
    port = free_port()
    config_path = cluster.directory / "prometheus.yml"
    rules = sorted(RULES_DIR.glob("*.yaml"))
    config_path.write_text(yaml.safe_dump(prometheus_config(targets, rules), sort_keys=False))
    url = f"http://{host}:{port}"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={cluster.directory / 'prometheus-data'}",
        f"--web.listen-address={host}:{port}",
        "--storage.tsdb.retention.time=1d",
    ]
    if targets.ray_pod_dns_names:
        command = cluster.with_cluster_dns(command)
    cluster.start_component(
        Component("prometheus", command),
        ready=lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
        port=port,
    )
    return url


def target_health(url: str) -> dict[str, list[str]]:
    """Job -> health of each active target ("up", "down", "unknown")."""
    response = httpx.get(f"{url}/api/v1/targets", params={"state": "active"}, timeout=10)
    response.raise_for_status()
    health: dict[str, list[str]] = {}
    for target in response.json()["data"]["activeTargets"]:
        health.setdefault(target["labels"].get("job", ""), []).append(target["health"])
    return health

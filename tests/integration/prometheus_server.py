"""A real Prometheus (Debian's package) for the monitoring tests: scrapes the given targets every
second and evaluates the project's generated rules; queried through its HTTP API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from llama4_operator.devenv.cluster import free_port
from support import REPO, wait_for

PROMETHEUS = "/usr/bin/prometheus"
RULES = REPO / "monitoring" / "rules" / "llama4.rules.yaml"


class PrometheusApi:
    """The query and rules endpoints of Prometheus' HTTP API."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=f"{self.url}/api/v1", timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.http.get("/query", params={"query": expr})
        assert response.status_code == 200, f"{expr}: {response.text}"
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        response = self.http.get("/rules")
        assert response.status_code == 200, response.text
        return [r for g in response.json()["data"]["groups"] for r in g["rules"]]

    def ready(self) -> bool:
        try:
            return self.http.get("/status/buildinfo").status_code == 200
        except httpx.TransportError:
            return False

    def wait_rules_healthy(self) -> None:
        """Every recording rule and alert has been evaluated, without an error."""

        def evaluated() -> list[dict[str, Any]] | None:
            rules = self.rules()
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules: list[dict[str, Any]] = wait_for(evaluated, 30, "every rule to be evaluated")
        unhealthy = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not unhealthy, unhealthy


@contextlib.contextmanager
def prometheus(
    state_dir: Path,
    jobs: Mapping[str, tuple[str, Mapping[str, str]]],
    discovered: Mapping[str, str] | None = None,
    discovery_files: Mapping[str, Path] | None = None,
) -> Iterator[PrometheusApi]:
    """Prometheus scraping each job's `host:port` (with extra target labels, as
    prometheus-operator adds `namespace`) and evaluating the rules in monitoring/rules.
    `discovered` maps more jobs to HTTP service-discovery URLs (http_sd_configs, re-read every
    second), such as the serving ingress' /-/metrics/targets; `discovery_files` to files of
    targets (file_sd_configs), such as the one Ray writes for its nodes' metrics agents."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            *(
                {
                    "job_name": job,
                    "static_configs": [{"targets": [target], "labels": dict(labels)}],
                }
                for job, (target, labels) in jobs.items()
            ),
            *(
                {"job_name": job, "http_sd_configs": [{"url": url, "refresh_interval": "1s"}]}
                for job, url in (discovered or {}).items()
            ),
            *(
                {
                    "job_name": job,
                    "file_sd_configs": [{"files": [str(path)], "refresh_interval": "1s"}],
                }
                for job, path in (discovery_files or {}).items()
            ),
        ],
    }
    (state_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (state_dir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={state_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={state_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = PrometheusApi(port)
    try:
        wait_for(api.ready, 30, "Prometheus to start")
        yield api
    finally:
        api.http.close()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)

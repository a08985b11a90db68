"""Dashboards and rules as code: regeneration changes nothing, promtool accepts and tests the
rules, every dashboard query parses, uids are fixed, and every alert links to its runbook."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pydantic
import pytest
import yaml

from llama4_operator.monitoring import dashboards, generate, rules
from llama4_operator.monitoring.selectors import Selectors

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = "/usr/bin/promtool"
RULES = REPO / "monitoring" / "rules" / "llama4.rules.yaml"
# Grafana variables replaced by values Prometheus accepts, to check the queries' syntax.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$namespace": ".*",
    "$deployment": ".*",
    "$gpu_hour_price": "2.5",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)


def test_committed_files_match_the_generator() -> None:
    stale = generate.stale(REPO)
    assert not stale, f"out of date: {stale}; run `python -m llama4_operator.monitoring`"


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(REPO / "monitoring/tests/llama4.rules.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    exprs = [
        target["expr"]
        for dashboard in dashboards.all_dashboards(Selectors())
        for panel in dashboard.to_json()["panels"]
        for target in panel["targets"]
    ]
    for variable, value in GRAFANA_VARIABLES.items():
        exprs = [e.replace(variable, value) for e in exprs]
    assert not [e for e in exprs if "$" in e.replace('"$1"', "")], "unreplaced variable"
    checked = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(checked))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_have_fixed_unique_uids_and_the_required_panels() -> None:
    found = {
        path.stem: json.loads(path.read_text())
        for path in (REPO / "monitoring/dashboards").glob("*.json")
    }
    assert {d["uid"] for d in found.values()} == {"llama4-overview", "llama4-moe"}
    titles = {uid: {p["title"] for p in d["panels"]} for uid, d in found.items()}
    assert {
        "Generated tokens/s",
        "Replicas: desired vs ready",
        "Time to first token",
        "Time per output token",
        "Request error ratio",
        "GPUs",
        "Cost per million tokens",
    } <= titles["llama4-overview"]
    assert {
        "Routed tokens/s per layer and expert",
        "Measured balance per layer",
        "Expert rebalances",
        "Autoscaler decisions by reason",
        "Autoscaler: advised vs running replicas",
    } <= titles["llama4-moe"]
    moe_kinds = {p["title"]: p["type"] for p in found["llama4-moe"]["panels"]}
    assert moe_kinds["Routed tokens/s per layer and expert"] == "heatmap"
    variables = {v["name"] for v in found["llama4-overview"]["templating"]["list"]}
    assert "gpu_hour_price" in variables
    # Panels must not overlap on Grafana's 24-column grid.
    for dashboard in found.values():
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24
            area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in (pos["y"],)}
            assert not cells & area, panel["title"]
            cells |= area


def test_every_alert_links_to_an_existing_runbook_section() -> None:
    runbooks = (REPO / "docs" / "runbooks.md").read_text()
    # GitHub's anchors: the heading lower-cased (these names have no spaces or punctuation).
    anchors = {h.lower() for h in re.findall(r"^## (\S+)$", runbooks, re.M)}
    alerts = rules.alerts(Selectors())
    assert len(alerts) == 7
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(rules.RUNBOOK_BASE + "#")
        assert url.split("#")[1] in anchors, f"docs/runbooks.md has no section {alert['alert']}"


def test_selectors_reach_every_query_of_their_source() -> None:
    sel = Selectors(operator='job="ops"', serving='namespace!="kube-system"')
    exprs = [r["expr"] for r in rules.recording_rules(sel) + rules.alerts(sel)]
    for expr in exprs:
        for metric in re.findall(r"\b(llama4_\w+|up)\{([^}]*)\}", expr):
            name, matchers = metric
            expected = 'namespace!="kube-system"' if _is_serving(name) else 'job="ops"'
            assert expected in matchers, (name, expr)


def _is_serving(metric: str) -> bool:
    return not metric.startswith(("llama4_operator_", "llama4_autoscaler_", "up"))


def test_selectors_reject_a_typo_naming_the_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="operater"):
        Selectors.model_validate({"operater": 'job="x"'})
    with pytest.raises(pydantic.ValidationError, match="availability_slo"):
        Selectors(availability_slo=1.5)

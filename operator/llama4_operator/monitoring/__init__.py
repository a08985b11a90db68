"""Monitoring as code: Grafana dashboards, Prometheus recording rules and alerts, all built from
one selectors config (`Selectors`), so the dashboards, rules and chart agree on metric names.

`python -m llama4_operator.monitoring` writes them under `monitoring/` and the chart's `files/`;
`--check` fails when the committed files differ from what the code generates.
"""

from llama4_operator.monitoring.selectors import Selectors

__all__ = ["Selectors"]

"""The one config the dashboards and rules share: where each metric comes from and thresholds.

Serving replicas label their series `model_name` (the served model name, which defaults to the
Llama4Deployment's name); the operator and autoscaler label theirs `namespace` and `name`.
Recording rules copy `model_name` into `name` so every recorded series is keyed the same way.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Selectors(BaseModel):
    """Label selectors of each metric source, and the thresholds of the alerts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operator: str = Field(
        'job="llama4-operator"', description="Selects the operator's own metrics."
    )
    serving: str = Field(
        'job=~".+"', description="Selects the serving replicas' metrics (any job by default)."
    )
    availability_slo: float = Field(
        0.99, gt=0, lt=1, description="Share of requests that must finish without error."
    )
    imbalance_threshold: float = Field(
        0.5, gt=0, le=1, description="Alert when mean/max expert load of a layer stays below."
    )
    dashboard_prefix: str = Field("llama4", description="Prefix of dashboard uids.")

    def error_budget(self) -> float:
        return round(1 - self.availability_slo, 6)

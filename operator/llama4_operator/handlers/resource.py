"""The Llama4Deployment a handler acts on, parsed once per event from Kopf's body: nothing below
the Kopf handlers reads the raw object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from llama4_operator.api.models import Llama4DeploymentSpec, Llama4DeploymentStatus
from llama4_operator.renderers.children import Owner
from llama4_operator.serving_metrics import DeploymentTarget


def format_validation_error(error: ValidationError) -> str:
    """`spec.a.b: message` for each problem pydantic found."""
    parts = []
    for problem in error.errors():
        path = ".".join(str(p) for p in problem["loc"])
        parts.append(f"spec.{path}: {problem['msg']}" if path else f"spec: {problem['msg']}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Llama4Deployment:
    """One Llama4Deployment as an event delivered it."""

    owner: Owner
    """Who it is (name, namespace, uid): what its children and events refer to."""
    generation: int
    spec: Llama4DeploymentSpec | None
    """None when the spec is invalid; `spec_error` says why."""
    spec_error: str
    status: Llama4DeploymentStatus
    """As last written (empty when unreadable: a hand-edited status is not worth failing over)."""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Llama4Deployment:
        metadata = body["metadata"]
        spec: Llama4DeploymentSpec | None = None
        spec_error = ""
        try:
            spec = Llama4DeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            spec_error = format_validation_error(error)
        try:
            status = Llama4DeploymentStatus.model_validate(body.get("status") or {})
        except ValidationError:
            status = Llama4DeploymentStatus()
        return cls(
            owner=Owner(
                name=metadata["name"], namespace=metadata["namespace"], uid=metadata["uid"]
            ),
            generation=int(metadata.get("generation", 0)),
            spec=spec,
            spec_error=spec_error,
            status=status,
        )

    def metrics_target(self, spec: Llama4DeploymentSpec) -> DeploymentTarget:
        """Where its replicas' serving metrics are read; `spec`: its spec, checked valid."""
        return DeploymentTarget(
            namespace=self.owner.namespace,
            name=self.owner.name,
            served_model_name=spec.model.served_model_name or self.owner.name,
            endpoint=self.status.endpoint,
            engine=spec.engine.name,
        )

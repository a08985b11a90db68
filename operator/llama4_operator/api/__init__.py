"""The `Llama4Deployment` API (`serving.llama4.dev/v1alpha1`): pydantic models of spec and status.

These models are the source of truth: the CRD's OpenAPI schema (`llama4_operator.api.crd`) is
generated from them, and the operator validates every object with them before acting on it.
"""

from llama4_operator.api.models import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAME,
    VERSION,
    Condition,
    CustomArchitecture,
    Llama4DeploymentSpec,
    Llama4DeploymentStatus,
)

__all__ = [
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAME",
    "VERSION",
    "Condition",
    "CustomArchitecture",
    "Llama4DeploymentSpec",
    "Llama4DeploymentStatus",
]

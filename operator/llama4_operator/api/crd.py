"""Generate the `Llama4Deployment` CustomResourceDefinition from the pydantic models.

pydantic writes JSON Schema (2020-12); Kubernetes wants a *structural* OpenAPI v3 subset: no
`$ref`, no `anyOf` with null, `minimum` instead of an exclusive bound, a default on object
fields whose members all have defaults (spelled out, so the API server's validation of the
default, CEL rules included, sees the same object a user omitting the field gets). This module
does that translation and adds the CRD around it: names, printer columns, subresources.

    python -m llama4_operator.api.crd > manifests/crd/serving.llama4.dev_llama4deployments.yaml
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from llama4_operator.api.models import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAME,
    SINGULAR,
    VERSION,
    Llama4DeploymentSpec,
    Llama4DeploymentStatus,
)

JsonSchema = dict[str, Any]

# Keywords the Kubernetes structural schema accepts, copied over as they are.
_PASSTHROUGH = (
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
)


class SchemaTranslationError(ValueError):
    """The pydantic schema uses a construct the CRD translation does not support."""


def _resolve(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Inline a `$ref`, keeping the referring node's own keywords (they win)."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    merged = dict(defs[name])
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _strip_null(node: JsonSchema) -> tuple[JsonSchema, bool]:
    """`anyOf: [X, {type: null}]` -> X; returns whether null was one of the options."""
    options = node.get("anyOf")
    if options is None:
        return node, False
    non_null = [o for o in options if o.get("type") != "null"]
    if len(non_null) != 1:
        raise SchemaTranslationError(f"unsupported union in schema: {options}")
    merged = dict(non_null[0])
    merged.update({k: v for k, v in node.items() if k != "anyOf"})
    return merged, len(non_null) != len(options)


def to_structural(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Translate one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    node, _ = _strip_null(_resolve(node, defs))
    node = _resolve(node, defs)
    if node.get("default", 0) is None:
        node = {k: v for k, v in node.items() if k != "default"}
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    if "exclusiveMinimum" in node:
        if node.get("type") != "integer":
            raise SchemaTranslationError("exclusive float bounds are not supported; use ge")
        node = {**node, "minimum": node["exclusiveMinimum"] + 1}
    out: JsonSchema = {k: copy.deepcopy(node[k]) for k in _PASSTHROUGH if k in node}
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = _properties(node, defs)
        if node.get("required"):
            out["required"] = sorted(node["required"])
    elif node.get("type") == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs)
    if node.get("type") == "array":
        out["items"] = to_structural(node["items"], defs)
    if "type" not in out:
        raise SchemaTranslationError(f"schema node without a type: {node}")
    return out


def _properties(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    required = set(node.get("required", []))
    properties: JsonSchema = {}
    for name, child in node["properties"].items():
        translated = to_structural(child, defs)
        if (
            name not in required
            and "default" not in translated
            and translated.get("type") == "object"
            and "properties" in translated
            and not translated.get("required")
            and not _defaults_to_null(child, defs)
        ):
            # The members' defaults, spelled out: the API server validates a default (CEL rules
            # included) as written, without filling nested defaults in first.
            translated["default"] = materialised_default(translated)
        properties[name] = translated
    return properties


def materialised_default(schema: JsonSchema) -> dict[str, Any]:
    """The object an omitted field of this object schema stands for: its members' defaults."""
    value: dict[str, Any] = {}
    for name, child in schema.get("properties", {}).items():
        if "default" in child:
            value[name] = copy.deepcopy(child["default"])
    return value


def _defaults_to_null(node: JsonSchema, defs: dict[str, JsonSchema]) -> bool:
    resolved = _resolve(node, defs)
    return "default" in resolved and resolved["default"] is None


def _openapi_schema(model: type[Llama4DeploymentSpec] | type[Llama4DeploymentStatus]) -> JsonSchema:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return to_structural(schema, defs)


def printer_columns() -> list[dict[str, Any]]:
    """What `kubectl get l4d` shows."""
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.variant"},
        {"name": "Quant", "type": "string", "jsonPath": ".spec.model.quantization"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Tokens/s", "type": "number", "jsonPath": ".status.tokensPerSecond"},
        {"name": "Status", "type": "string", "jsonPath": ready},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a plain dict."""
    schema = {
        "type": "object",
        "description": "Serve a Llama 4 (or other mixture-of-experts) model on GPU nodes.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _openapi_schema(Llama4DeploymentSpec),
            "status": _openapi_schema(Llama4DeploymentStatus),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "llama4-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": printer_columns(),
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    """The CRD as the YAML checked in under manifests/crd/."""
    header = (
        "# Generated by `python -m llama4_operator.api.crd` from llama4_operator.api.models;\n"
        "# do not edit by hand (tests/unit/test_crd.py fails when this file drifts).\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render_crd_yaml())

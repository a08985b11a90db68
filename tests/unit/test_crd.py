"""The generated CRD: drift against the checked-in file, structural-schema rules, and its CEL rules
evaluated (with cel-python) on the same objects the pydantic models accept or refuse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel
from pydantic import ValidationError

from llama4_operator.api import crd
from llama4_operator.api.models import Llama4DeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "manifests" / "crd" / "serving.llama4.dev_llama4deployments.yaml"
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return crd.build_crd()


@pytest.fixture(scope="module")
def spec_schema(generated: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec: dict[str, Any] = schema["properties"]["spec"]
    return spec


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_checked_in_crd_matches_the_models() -> None:
    assert CHECKED_IN.read_text() == crd.render_crd_yaml(), (
        "manifests/crd is stale: run `python -m llama4_operator.api.crd > " + str(CHECKED_IN) + "`"
    )


def test_schema_is_structural(generated: dict[str, Any]) -> None:
    schema = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(schema):
        assert "type" in node, f"{path} has no type"
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "exclusiveMinimum"):
            assert banned not in node, f"{path} uses {banned}"


def test_names_subresources_and_columns(generated: dict[str, Any]) -> None:
    spec = generated["spec"]
    assert spec["names"]["shortNames"] == ["l4d"]
    assert "llama4" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert version["subresources"]["status"] == {}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.model.variant"
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Tokens/s"] == ".status.tokensPerSecond"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_every_spec_field_is_described(spec_schema: dict[str, Any]) -> None:
    undocumented = [
        path for path, node in walk(spec_schema) if path and not node.get("description")
    ]
    # Map values and list items inherit their parent's description in `kubectl explain`.
    assert [p for p in undocumented if not p.endswith(("{}", "[]"))] == []


def test_defaults_bounds_and_enums(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    assert props["replicas"]["default"] == 1
    assert props["replicas"]["minimum"] == 0
    assert props["model"]["properties"]["quantization"]["enum"] == ["bf16", "fp8", "int4"]
    assert props["autoscaling"]["properties"]["mode"]["enum"] == ["apply", "advisory"]
    # An omitted object stands for its members' defaults, spelled out: the API server checks
    # a default against the CEL rules as written.
    assert props["engine"]["default"] == {"name": "vllm"}
    assert props["autoscaling"]["default"] == {
        "enabled": False,
        "mode": "apply",
        "minReplicas": 1,
        "maxReplicas": 4,
        "scaleDownDelaySeconds": 600,
        "coldStartSeconds": 300,
    }
    assert props["placement"]["default"]["rebalance"]["balanceThreshold"] == 0.8
    assert props["resources"]["properties"]["gpusPerNode"]["minimum"] == 1
    assert "default" not in props["model"]["properties"]["architecture"]


def test_status_conditions_are_a_map_keyed_by_type(generated: dict[str, Any]) -> None:
    status = generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) >= {"type", "status", "reason", "lastTransitionTime"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


# ---------------------------------------------------------------------------- CEL


def defaulted(schema: dict[str, Any], value: Any) -> Any:
    """Apply the schema's defaults the way the API server does before validating."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, child in schema["properties"].items():
        if name not in out and "default" in child:
            out[name] = child["default"]
        if name in out:
            out[name] = defaulted(child, out[name])
    return out


def cel_failures(schema: dict[str, Any], value: Any, path: str = "spec") -> list[str]:
    """Messages of every CEL rule that fails on `value` (already defaulted), depth first."""
    failures: list[str] = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": json_to_cel(value)}):
            failures.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            if name in value:
                failures += cel_failures(child, value[name], f"{path}.{name}")
    return failures


def pydantic_accepts(body: dict[str, Any]) -> bool:
    try:
        Llama4DeploymentSpec.model_validate(body)
    except ValidationError:
        return False
    return True


CUSTOM_ARCH = {
    "numHiddenLayers": 4,
    "hiddenSize": 64,
    "intermediateSize": 128,
    "numAttentionHeads": 4,
    "numKeyValueHeads": 2,
    "headDim": 16,
    "vocabSize": 512,
    "numLocalExperts": 4,
}

CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("catalog model", {"model": {"variant": "scout"}}, None),
    (
        "custom with architecture",
        {
            "model": {
                "variant": "custom",
                "architecture": CUSTOM_ARCH,
                "weights": {"source": "path", "uri": "/models/tiny"},
            }
        },
        None,
    ),
    (
        "custom without weights",
        {"model": {"variant": "custom", "architecture": CUSTOM_ARCH}},
        "weights.uri is required for a custom model",
    ),
    ("custom without architecture", {"model": {"variant": "custom"}}, "architecture is required"),
    (
        "catalog with architecture",
        {"model": {"variant": "maverick", "architecture": CUSTOM_ARCH}},
        "architecture is required",
    ),
    (
        "min above max",
        {"model": {"variant": "scout"}, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "min above default max",
        {"model": {"variant": "scout"}, "autoscaling": {"minReplicas": 6}},
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "manual without sizes",
        {"model": {"variant": "scout"}, "resources": {"parallelism": {"strategy": "manual"}}},
        "tensor and data are required",
    ),
    (
        "auto with sizes",
        {"model": {"variant": "scout"}, "resources": {"parallelism": {"tensor": 2}}},
        "tensor and data are set only",
    ),
    (
        "top-k above experts",
        {
            "model": {
                "variant": "custom",
                "architecture": {**CUSTOM_ARCH, "numExpertsPerTok": 8},
                "weights": {"source": "random"},
            }
        },
        "numExpertsPerTok cannot exceed",
    ),
    (
        "reference engine with expert groups",
        {
            "model": {
                "variant": "custom",
                "architecture": {**CUSTOM_ARCH, "numExpertGroups": 2},
                "weights": {"source": "random"},
            },
            "engine": {"name": "reference"},
        },
        "reference engine runs the Llama 4 architecture only",
    ),
    (
        "vllm with random weights",
        {
            "model": {
                "variant": "custom",
                "architecture": CUSTOM_ARCH,
                "weights": {"source": "random"},
            },
            "engine": {"name": "vllm"},
        },
        "cannot be served by engine vllm",
    ),
    (
        "path weights without uri",
        {"model": {"variant": "scout", "weights": {"source": "path"}}},
        "uri (a directory) is required when source is path",
    ),
]


@pytest.mark.parametrize(("name", "body", "message"), CASES, ids=[c[0] for c in CASES])
def test_cel_rules_agree_with_the_models(
    spec_schema: dict[str, Any], name: str, body: dict[str, Any], message: str | None
) -> None:
    failures = cel_failures(spec_schema, defaulted(spec_schema, body))
    if message is None:
        assert failures == [], name
        assert pydantic_accepts(body), name
    else:
        assert any(message in f for f in failures), (name, failures)
        assert not pydantic_accepts(body), name


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_samples_are_valid(spec_schema: dict[str, Any], sample: Path) -> None:
    document = yaml.safe_load(sample.read_text())
    assert document["apiVersion"] == "serving.llama4.dev/v1alpha1"
    assert document["kind"] == "Llama4Deployment"
    assert cel_failures(spec_schema, defaulted(spec_schema, document["spec"])) == []
    Llama4DeploymentSpec.model_validate(document["spec"])

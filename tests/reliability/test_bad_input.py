"""Property-based: Llama4Deployment specs, valid and not (wrong types, out-of-range numbers,
unknown fields, CEL rule violations), sent to the real API server as kubectl sends them (strict
field validation). Each is either refused with a message that names a field, or accepted; what is
accepted the running operator reconciles to a status (Fits, or an InvalidSpec condition) without
crashing and without reconciling it over and over."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException
from reliability_api import Api, conditions_of, sample

from llama4_operator.devenv.cluster import LocalCluster
from support import GROUP, PLURAL, VERSION, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

Json = dict[str, Any]
RESYNC_S = 3  # OperatorProcess's --resync-interval
NAME = "fuzzed"

# Values the schema accepts, by field (spec-relative dotted path).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "replicas": st.integers(0, 3),
    "model.variant": st.sampled_from(["scout", "maverick", "behemoth"]),
    "model.quantization": st.sampled_from(["bf16", "fp8", "int4"]),
    "model.maxContextLength": st.integers(128, 1_048_576),
    "resources.gpusPerNode": st.integers(1, 64),
    "resources.gpuProduct": st.sampled_from(["NVIDIA-H100-80GB-HBM3", "NVIDIA-B200", ""]),
    "placement.redundantExpertSlots": st.integers(0, 4096),
    "autoscaling.maxReplicas": st.integers(4, 1000),
    "serving.port": st.integers(1, 65535),
    "engine.name": st.sampled_from(["vllm", "reference"]),
    "monitoring.scrapeInterval": st.sampled_from(["15s", "1m", "500ms"]),
}
INTEGER_FIELDS = [
    "replicas",
    "model.maxContextLength",
    "resources.gpusPerNode",
    "placement.redundantExpertSlots",
    "serving.port",
]
WRONG_TYPE = st.one_of(
    st.text(max_size=6),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
)
OUT_OF_RANGE = st.one_of(st.integers(-(2**40), -1), st.integers(10**7, 2**62))
UNKNOWN_FIELDS = st.sampled_from(["model.flavour", "resources.gpus", "autoscale", "replica"])
# Whole-spec changes that break one CEL rule each (docs/api.md, "Validation").
CEL_VIOLATIONS: list[dict[str, Any]] = [
    {"autoscaling.minReplicas": 5, "autoscaling.maxReplicas": 2},
    {"resources.parallelism": {"strategy": "manual", "tensor": 2}},
    {"resources.parallelism": {"strategy": "auto", "data": 2}},
    {"model.variant": "custom"},
    {"model.architecture": {"numHiddenLayers": 2}},
    {"model.weights": {"source": "path"}},
]


@st.composite
def mutations(draw: st.DrawFn) -> dict[str, Any]:
    """One to three changes, each valid, of a wrong type, out of range, unknown or CEL-breaking."""
    changes: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["valid", "valid", "type", "range", "unknown", "cel"]))
        if kind == "valid":
            path = draw(st.sampled_from(sorted(VALID)))
            changes[path] = draw(VALID[path])
        elif kind == "type":
            changes[draw(st.sampled_from(sorted(VALID)))] = draw(WRONG_TYPE)
        elif kind == "range":
            changes[draw(st.sampled_from(INTEGER_FIELDS))] = draw(OUT_OF_RANGE)
        elif kind == "unknown":
            changes[draw(UNKNOWN_FIELDS)] = draw(st.integers(0, 9))
        else:
            changes.update(draw(st.sampled_from(CEL_VIOLATIONS)))
    return changes


def scout_with(changes: dict[str, Any]) -> Json:
    manifest = sample("scout", NAME)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = manifest["spec"]
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return manifest


@pytest.fixture(scope="module")
def fuzz_namespace(api: Api) -> Iterator[str]:
    with api.scratch_namespace("fuzz") as name:
        yield name


@pytest.fixture(scope="module")
def fuzz_operator(
    chaos_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    running = OperatorProcess(chaos_cluster.kubeconfig, tmp_path_factory.mktemp("fuzz-operator"))
    running.start()
    wait_for(lambda: reconcile_count_or_none(running) is not None, 60, "the operator's metrics")
    try:
        yield running
    finally:
        running.stop()


def reconcile_count_or_none(operator: OperatorProcess) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("llama4_operator_reconcile_duration_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def reconciles(operator: OperatorProcess) -> float:
    count = reconcile_count_or_none(operator)
    assert count is not None, f"the operator's metrics do not answer:\n{operator.log()[-3000:]}"
    return count


def refusal(api: Api, namespace: str, manifest: Json) -> str | None:
    """None when the API server accepts the object, else its message."""
    try:
        api.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest, field_validation="Strict"
        )
    except ApiException as error:
        if error.status not in (400, 422):
            raise AssertionError(f"refused with {error.status}: {error.body}") from error
        message: str = json.loads(error.body)["message"]
        return message
    return None


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same 30 specs every run: failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(changes=mutations())
def test_any_spec_is_refused_with_a_field_or_reconciled_once(
    changes: dict[str, Any], api: Api, fuzz_namespace: str, fuzz_operator: OperatorProcess
) -> None:
    namespace = fuzz_namespace
    before = reconciles(fuzz_operator)
    started = time.monotonic()
    message = refusal(api, namespace, scout_with(changes))
    if message is not None:
        assert "spec" in message, f"the refusal names no field: {message}"
        assert api.deployment(namespace, NAME) is None
        return
    found = wait_for(lambda: api.reconciled(namespace, NAME), 60, f"status for {changes}")
    fits = conditions_of(found)["Fits"]
    assert fits["status"] in ("True", "False") or fits["reason"] == "InvalidSpec", fits
    if fits["reason"] == "InvalidSpec":
        assert "spec." in fits["message"], fits  # names the field the operator refused
    time.sleep(1.5)  # room for a hot loop to show
    elapsed = time.monotonic() - started
    # Once on create, a retry at most, then the resync timer: anything more is a loop.
    ran = reconciles(fuzz_operator) - before
    assert ran <= 2 + elapsed / RESYNC_S, f"{ran:.0f} reconciliations in {elapsed:.1f} s"
    assert fuzz_operator.process is not None
    assert fuzz_operator.process.poll() is None, fuzz_operator.log()[-3000:]
    api.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, NAME)
    wait_for(lambda: api.deployment(namespace, NAME) is None, 60, "the fuzzed deployment deleted")

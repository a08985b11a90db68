"""Issue 3's acceptance on the real local control plane: the operator runs as `llama4ctl operator`
against a real API server (RBAC, PodSecurity, CEL validation), the real KubeRay operator turns its
RayServices into pods, and the real scheduler binds them to simulated 8 x H100 nodes.

Expected values come from the public contract (docs/api.md, docs/fit-check.md, the samples) and
from the cluster the fixture builds (16 nodes x 8 H100), never from the operator's own output.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from llama4_operator.devenv.cluster import LocalCluster
from llama4_serving.config import rendered_replicas
from support import (
    DEPLOYMENT_LABEL,
    REPO,
    DeploymentsApi,
    Json,
    Kubectl,
    OperatorProcess,
    wait_for,
)

pytestmark = pytest.mark.cluster

FINALIZER = "serving.llama4.dev/finalizer"
SAMPLES = REPO / "manifests" / "samples"
RESYNC_S = 3  # the `operator` fixture's --resync-interval
# Time for a resync to notice and undo drift on this loaded 2-core machine.
DRIFT_TIMEOUT_S = RESYNC_S * 10
H100 = "NVIDIA-H100-80GB-HBM3"


def _json(response: Any) -> Any:
    """The body of a `_preload_content=False` call: plain JSON, camelCase like kubectl's."""
    return json.loads(response.data)


class Api(DeploymentsApi):
    """The reads these tests make, all as plain JSON objects."""

    def __init__(self, api_client: client.ApiClient) -> None:
        super().__init__(api_client)
        self.extensions = client.ApiextensionsV1Api(api_client)

    def ray(self, plural: str, namespace: str) -> list[Json]:
        response = self.custom.list_namespaced_custom_object(
            "ray.io", "v1", namespace, plural, _preload_content=False
        )
        items: list[Json] = _json(response)["items"]
        return items

    def ray_service(self, namespace: str, name: str) -> Json | None:
        return next(
            (r for r in self.ray("rayservices", namespace) if r["metadata"]["name"] == name), None
        )

    def services(self, namespace: str, name: str) -> list[Json]:
        selector = f"{DEPLOYMENT_LABEL}={name}"
        response = self.core.list_namespaced_service(
            namespace, label_selector=selector, _preload_content=False
        )
        items: list[Json] = _json(response)["items"]
        return items

    def service(self, namespace: str, name: str) -> Json:
        found: Json = _json(
            self.core.read_namespaced_service(name, namespace, _preload_content=False)
        )
        return found

    def config_maps(self, namespace: str, name: str) -> list[Json]:
        selector = f"{DEPLOYMENT_LABEL}={name}"
        response = self.core.list_namespaced_config_map(
            namespace, label_selector=selector, _preload_content=False
        )
        items: list[Json] = _json(response)["items"]
        return items

    def config_map(self, namespace: str, name: str) -> Json:
        found: Json = _json(
            self.core.read_namespaced_config_map(name, namespace, _preload_content=False)
        )
        return found

    def pods(self, namespace: str, selector: str) -> list[Json]:
        response = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _preload_content=False
        )
        items: list[Json] = _json(response)["items"]
        return items

    def events(self, namespace: str, name: str) -> list[Json]:
        response = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}", _preload_content=False
        )
        items: list[Json] = _json(response)["items"]
        return items

    def service_accounts(self, namespace: str) -> list[str]:
        response = self.core.list_namespaced_service_account(namespace, _preload_content=False)
        return [sa["metadata"]["name"] for sa in _json(response)["items"]]


@pytest.fixture(scope="module")
def api(local_cluster: LocalCluster) -> Api:
    return Api(local_cluster.api_client())


@pytest.fixture
def namespace(api: Api) -> Iterator[str]:
    name = f"op-{uuid.uuid4().hex[:8]}"
    api.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # The service-account controller creates `default`; KubeRay's pods are refused until then.
    wait_for(lambda: "default" in api.service_accounts(name), what="the default service account")
    yield name
    # Not awaited: the garbage collector and the operator finish it while later tests run.
    api.core.delete_namespace(name)


def sample(name: str) -> Json:
    loaded: Json = yaml.safe_load((SAMPLES / f"{name}.yaml").read_text())
    return loaded


def conditions_of(deployment: Json) -> dict[str, Json]:
    return {c["type"]: c for c in (deployment.get("status") or {}).get("conditions") or []}


def reconciled(api: Api, namespace: str, name: str) -> Json | None:
    """The deployment once its status describes its current generation, else None."""
    found = api.deployment(namespace, name)
    if found is None:
        return None
    status = found.get("status") or {}
    generation = found["metadata"]["generation"]
    if status.get("observedGeneration") != generation or "Fits" not in conditions_of(found):
        return None
    return found


def wait_reconciled(api: Api, namespace: str, name: str, timeout_s: float = 90) -> Json:
    found: Json = wait_for(
        lambda: reconciled(api, namespace, name),
        timeout_s,
        f"{namespace}/{name} to be reconciled (status.observedGeneration == generation)",
    )
    return found


def planned_workers(deployment: Json) -> list[tuple[str, int]]:
    """(node, GPUs) of every placed worker, from status.placement."""
    placement = deployment["status"]["placement"]
    return sorted(
        (worker["node"], worker["gpus"])
        for replica in placement["replicas"]
        for worker in replica["workers"]
    )


def active_worker_groups(ray_service: Json) -> list[Json]:
    groups = ray_service["spec"]["rayClusterConfig"].get("workerGroupSpecs") or []
    return [g for g in groups if g.get("replicas", 0) > 0]


def affinity_node(group: Json) -> str:
    """The node a worker group is pinned to by required node affinity on metadata.name."""
    terms = group["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    names = [
        str(value)
        for term in terms
        for field in term.get("matchFields") or []
        if field["key"] == "metadata.name"
        for value in field["values"]
    ]
    assert len(names) == 1, f"worker group {group['groupName']} is not pinned to one node: {terms}"
    return names[0]


def group_gpus(group: Json) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


def serve_replicas(ray_service: Json) -> int:
    config = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    (server,) = application["deployments"]  # LLMServer's override: replicas change in place
    replicas = rendered_replicas(server)
    return replicas


def bound_workers(api: Api, namespace: str, name: str) -> list[tuple[str, int]] | None:
    """(node, GPUs) of the deployment's Ray worker pods, once every one is bound to a node."""
    pods = api.pods(namespace, f"{DEPLOYMENT_LABEL}={name},ray.io/node-type=worker")
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    if not live or any(not p["spec"].get("nodeName") for p in live):
        return None
    return sorted(
        (
            str(p["spec"]["nodeName"]),
            int(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]),
        )
        for p in live
    )


def wait_equal(read: Callable[[], object], expected: object, timeout_s: float, what: str) -> None:
    """Poll until `read()` equals `expected`; the failure shows the last value read."""
    seen: list[object] = []

    def check() -> bool:
        seen.append(read())
        return seen[-1] == expected

    try:
        wait_for(check, timeout_s, what)
    except AssertionError as error:
        raise AssertionError(f"{error}; last seen: {seen[-1] if seen else None}") from None


def wait_pods_on(
    api: Api, namespace: str, name: str, expected: list[tuple[str, int]], timeout_s: float = 90
) -> None:
    wait_equal(
        partial(bound_workers, api, namespace, name),
        expected,
        timeout_s,
        f"worker pods of {namespace}/{name} bound to {expected}",
    )


def child_counts(api: Api, namespace: str, name: str) -> dict[str, int]:
    return {
        "RayService": len(api.ray("rayservices", namespace)),
        "RayCluster": len(api.ray("rayclusters", namespace)),
        "Service": len(api.services(namespace, name)),
        "ConfigMap": len(api.config_maps(namespace, name)),
    }


# What one running deployment owns (docs/api.md, "Children"): the endpoint and metrics Services,
# the expert-placement ConfigMap, one RayService and the one RayCluster KubeRay makes from it.
ONE_OF_EACH = {"RayService": 1, "RayCluster": 1, "Service": 2, "ConfigMap": 1}
NO_CHILDREN = dict.fromkeys(ONE_OF_EACH, 0)


# ---------------------------------------------------------------------------------------------
# The samples: children, pods on the planned nodes, honest status, printer columns


# GPUs per replica from the launch claims docs/fit-check.md checks (reference/llama4-models.md):
# Scout int4 on one H100, Maverick FP8 on one 8 x H100 host.
@pytest.mark.parametrize(("name", "gpus_per_replica"), [("scout", 1), ("maverick", 8)])
def test_sample_gets_children_and_pods_on_the_planned_gpu_nodes(
    name: str,
    gpus_per_replica: int,
    api: Api,
    kubectl: Kubectl,
    operator: OperatorProcess,
    namespace: str,
) -> None:
    kubectl.apply(sample(name), namespace)
    deployment = wait_reconciled(api, namespace, name)
    status = deployment["status"]
    conditions = conditions_of(deployment)
    assert conditions["Fits"]["status"] == "True", conditions["Fits"]
    # Nothing runs inside simulated pods: Ready must not be claimed, and must say why.
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["reason"] == "ServeApplicationNotHealthy"
    assert "Serve application" in conditions["Ready"]["message"]
    # The ServiceMonitor CRD is absent: maverick asks for one, and must not fail over it.
    assert conditions["Degraded"]["status"] == "False", conditions["Degraded"]
    assert {c["observedGeneration"] for c in conditions.values()} == {
        deployment["metadata"]["generation"]
    }
    assert status["replicas"] == 1
    assert status["selector"] == f"{DEPLOYMENT_LABEL}={name}"
    assert status["endpoint"] == f"http://{name}.{namespace}.svc:8000/v1"
    assert status["fit"]["gpusPerReplica"] == gpus_per_replica
    assert status["fit"]["gpuProduct"] == H100  # both samples ask for it
    workers = planned_workers(deployment)
    assert sum(gpus for _, gpus in workers) == gpus_per_replica
    assert all(node.startswith("gpu-pool-0-") for node, _ in workers)
    assert deployment["metadata"]["finalizers"] == [FINALIZER]

    ray_service = api.ray_service(namespace, name)
    assert ray_service is not None
    groups = active_worker_groups(ray_service)
    assert sorted((affinity_node(g), group_gpus(g)) for g in groups) == workers
    assert serve_replicas(ray_service) == 1
    (endpoint,) = [s for s in api.services(namespace, name) if s["metadata"]["name"] == name]
    assert [p["port"] for p in endpoint["spec"]["ports"]] == [8000]
    (config_map,) = api.config_maps(namespace, name)
    assert config_map["metadata"]["name"] == f"{name}-expert-placement"
    assert json.loads(config_map["data"]["expert-placement.json"])
    with pytest.raises(ApiException) as absent:
        api.extensions.read_custom_resource_definition("servicemonitors.monitoring.coreos.com")
    assert absent.value.status == 404
    assert child_counts(api, namespace, name)["Service"] == 2  # endpoint + metrics, no more

    # KubeRay makes the pods; the scheduler binds each worker to the node the placement chose.
    wait_pods_on(api, namespace, name, workers)
    assert len(api.ray("rayclusters", namespace)) == 1
    # Ray's token authentication, on by default: KubeRay made the token Secret and gave every
    # Ray container the mode and the token from it.
    (cluster,) = api.ray("rayclusters", namespace)
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    secret = api.core.read_namespaced_secret(cluster["metadata"]["name"], namespace)
    assert secret.data["auth_token"]
    pods = api.pods(namespace, f"{DEPLOYMENT_LABEL}={name}")
    assert pods
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
            source = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert source["name"] == cluster["metadata"]["name"], container["name"]

    table = kubectl.run("get", "l4d", name, "-n", namespace).splitlines()
    assert table[0].split() == [
        "NAME",
        "MODEL",
        "QUANT",
        "REPLICAS",
        "READY",
        "TOKENS/S",
        "STATUS",
        "AGE",
    ]
    row = table[1].split()
    expected_quant = sample(name)["spec"]["model"]["quantization"]
    assert row[:7] == [name, name, expected_quant, "1", "0", "0", "False"]


# ---------------------------------------------------------------------------------------------
# Validation by the API server


def scout_with(change: Json) -> Json:
    manifest = sample("scout")
    for path, value in change.items():
        *parents, leaf = path.split(".")
        node = manifest["spec"]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return manifest


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            {"model.variant": "llama3"},
            ["spec.model.variant", 'Unsupported value: "llama3"', '"maverick"'],
            id="unknown-variant",
        ),
        pytest.param(
            {"autoscaling.minReplicas": 5, "autoscaling.maxReplicas": 2},
            ["spec.autoscaling.minReplicas", "minReplicas must not exceed maxReplicas"],
            id="min-above-max",
        ),
        pytest.param(
            {"resources.gpusPerNode": -1},
            ["spec.resources.gpusPerNode", "greater than or equal to 1"],
            id="negative-gpus",
        ),
        pytest.param(
            {"model.quantization": "int3"},
            ["spec.model.quantization", 'Unsupported value: "int3"', '"fp8"'],
            id="unknown-quantization",
        ),
    ],
)
def test_api_server_rejects_invalid_spec_naming_the_field(
    change: Json,
    expected: list[str],
    api: Api,
    kubectl: Kubectl,
    operator: OperatorProcess,
    namespace: str,
) -> None:
    output = kubectl.apply(scout_with(change), namespace, check=False)
    assert "is invalid" in output, output
    for fragment in expected:
        assert fragment in output, output
    assert api.deployment(namespace, "scout") is None


# ---------------------------------------------------------------------------------------------
# Valid but impossible


def test_model_that_cannot_fit_gets_fits_false_a_warning_and_no_children(
    api: Api, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    # Maverick in bf16 held to 4 GPUs per replica (manual tensor 4 x data 1): ~800 GB of bf16
    # weights cannot fit 4 x 80 GB, whatever the cluster has.
    manifest = sample("maverick")
    manifest["spec"]["model"]["quantization"] = "bf16"
    manifest["spec"]["model"].pop("maxContextLength")  # the 8192-token default
    manifest["spec"]["model"]["weights"]["uri"] = "meta-llama/Llama-4-Maverick-17B-128E-Instruct"
    manifest["spec"]["resources"]["parallelism"] = {"strategy": "manual", "tensor": 4, "data": 1}
    kubectl.apply(manifest, namespace)
    deployment = wait_reconciled(api, namespace, "maverick")
    fits = conditions_of(deployment)["Fits"]
    assert (fits["status"], fits["reason"]) == ("False", "DoesNotFit")
    message = fits["message"]
    assert message.startswith("Llama 4 Maverick 17B-128E (bf16, 8192-token context)")
    assert "the cluster has 128 x H100 80GB (16 nodes x 8)" in message  # the fixture's nodes
    # Maverick int4 (~200 GB) fits 4 x H100: docs/fit-check.md's own suggestion.
    assert "Would fit with: model.quantization: int4 (4 GPUs per replica)" in message
    assert conditions_of(deployment)["Ready"]["status"] == "False"
    assert deployment["status"].get("placement") is None
    assert deployment["status"]["endpoint"] == ""

    warnings = wait_for(
        lambda: [
            e
            for e in api.events(namespace, "maverick")
            if e["type"] == "Warning" and e["reason"] == "DoesNotFit"
        ],
        30,
        "a DoesNotFit Warning event",
    )
    # "<condition>: <message>": Fits and Degraded share the message, so it is posted once.
    assert any(e["message"].split(": ", 1)[1] == message for e in warnings), [
        e["message"] for e in warnings
    ]
    # Children are applied before status is written: after status, none may exist.
    assert child_counts(api, namespace, "maverick") == NO_CHILDREN


# ---------------------------------------------------------------------------------------------
# kubectl scale


def scaled_to(api: Api, namespace: str, name: str, replicas: int) -> Json | None:
    """The deployment once reconciled with `replicas` placed, else None."""
    found = reconciled(api, namespace, name)
    return found if found and found["status"]["replicas"] == replicas else None


def test_kubectl_scale_changes_replicas_and_the_children_follow(
    api: Api, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(sample("scout"), namespace)
    first = wait_reconciled(api, namespace, "scout")
    wait_pods_on(api, namespace, "scout", planned_workers(first))

    for replicas in (3, 1):
        kubectl.run("scale", "l4d/scout", f"--replicas={replicas}", "-n", namespace)
        deployment = wait_for(
            partial(scaled_to, api, namespace, "scout", replicas), 60, f"status.replicas {replicas}"
        )
        assert deployment["spec"]["replicas"] == replicas
        workers = planned_workers(deployment)
        assert len(workers) == replicas  # Scout int4: one 1-GPU worker per replica
        ray_service = api.ray_service(namespace, "scout")
        assert ray_service is not None
        groups = active_worker_groups(ray_service)
        assert sorted((affinity_node(g), group_gpus(g)) for g in groups) == workers
        assert serve_replicas(ray_service) == replicas
        wait_pods_on(api, namespace, "scout", workers)
        scale = json.loads(
            kubectl.run("get", "l4d/scout", "-n", namespace, "--subresource=scale", "-o", "json")
        )
        assert scale["status"]["replicas"] == replicas
        assert scale["status"]["selector"] == f"{DEPLOYMENT_LABEL}=scout"
    assert len(api.ray("rayclusters", namespace)) == 1


# ---------------------------------------------------------------------------------------------
# Drift


def test_children_edited_or_deleted_by_hand_are_restored(
    api: Api, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(sample("scout"), namespace)
    wait_reconciled(api, namespace, "scout")
    (original,) = api.config_maps(namespace, "scout")
    placement_json = original["data"]["expert-placement.json"]

    kubectl.run(
        "patch", "service", "scout", "-n", namespace, "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/ports/0/port", "value": 9999}]',
    )  # fmt: skip
    kubectl.run(
        "patch", "configmap", "scout-expert-placement", "-n", namespace, "--type=merge",
        "-p", json.dumps({"data": {"expert-placement.json": "{}"}}),
    )  # fmt: skip

    def endpoint_ports() -> list[int]:
        return [p["port"] for p in api.service(namespace, "scout")["spec"]["ports"]]

    def placement_data() -> str | None:
        found = api.config_map(namespace, "scout-expert-placement")
        value: str | None = (found.get("data") or {}).get("expert-placement.json")
        return value

    assert endpoint_ports() == [9999]
    assert placement_data() == "{}"
    wait_for(lambda: endpoint_ports() == [8000], DRIFT_TIMEOUT_S, "the Service port restored")
    wait_for(lambda: placement_data() == placement_json, DRIFT_TIMEOUT_S, "the ConfigMap restored")

    uids = {s["metadata"]["name"]: s["metadata"]["uid"] for s in api.services(namespace, "scout")}
    kubectl.run("delete", "service/scout", "configmap/scout-expert-placement", "-n", namespace)
    wait_for(
        lambda: (
            {s["metadata"]["name"] for s in api.services(namespace, "scout")} == set(uids)
            and len(api.config_maps(namespace, "scout")) == 1
        ),
        DRIFT_TIMEOUT_S,
        "the deleted Service and ConfigMap re-created",
    )
    recreated = {
        s["metadata"]["name"]: s["metadata"]["uid"] for s in api.services(namespace, "scout")
    }
    assert recreated["scout"] != uids["scout"]
    assert recreated["scout-metrics"] == uids["scout-metrics"]
    assert endpoint_ports() == [8000]
    assert placement_data() == placement_json


# ---------------------------------------------------------------------------------------------
# Crash and restart


def kill_when_first_child_appears(api: Api, namespace: str, operator: OperatorProcess) -> None:
    """SIGKILL the operator as soon as the first child (the ConfigMap, applied first) exists:
    the Services, the RayService and status are still to come (the test checks)."""
    stream = watch.Watch()
    for _event in stream.stream(
        api.core.list_namespaced_config_map,
        namespace,
        label_selector=DEPLOYMENT_LABEL,
        timeout_seconds=60,
    ):
        operator.kill()
        stream.stop()
        return
    raise AssertionError("the operator created no child within 60 s")


def test_operator_killed_mid_reconcile_converges_without_duplicates(
    api: Api, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    try:
        kubectl.apply(sample("maverick"), namespace)
        kill_when_first_child_appears(api, namespace, operator)
        # Status is written last: without it, the kill cut a reconciliation short.
        killed = api.deployment(namespace, "maverick")
        assert killed is not None
        assert "observedGeneration" not in (killed.get("status") or {}), "killed too late"
        assert operator.process is not None
        assert operator.process.returncode == -9
        operator.start()
        deployment = wait_reconciled(api, namespace, "maverick", timeout_s=120)
    finally:
        if operator.process is None or operator.process.poll() is not None:
            operator.start()  # later tests need it
    workers = planned_workers(deployment)
    wait_pods_on(api, namespace, "maverick", workers)
    assert child_counts(api, namespace, "maverick") == ONE_OF_EACH
    ray_service = api.ray_service(namespace, "maverick")
    assert ray_service is not None
    assert (
        sorted(
            (affinity_node(g), group_gpus(g))
            for g in ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        )
        == workers
    )
    conditions = conditions_of(deployment)
    assert conditions["Fits"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "ServeApplicationNotHealthy"
    assert deployment["status"]["replicas"] == 1
    # The restarted operator keeps resyncing this object (a deleted child comes back), and
    # its resyncs create no second copy of anything.
    kubectl.run("delete", "configmap", "maverick-expert-placement", "-n", namespace)
    wait_for(
        lambda: len(api.config_maps(namespace, "maverick")) == 1,
        DRIFT_TIMEOUT_S,
        "the restarted operator to re-create the deleted ConfigMap",
    )
    assert child_counts(api, namespace, "maverick") == ONE_OF_EACH


# ---------------------------------------------------------------------------------------------
# Deletion


def test_deleting_the_deployment_removes_every_child(
    api: Api, kubectl: Kubectl, operator: OperatorProcess, namespace: str
) -> None:
    kubectl.apply(sample("scout"), namespace)
    deployment = wait_reconciled(api, namespace, "scout")
    wait_pods_on(api, namespace, "scout", planned_workers(deployment))
    assert child_counts(api, namespace, "scout") == ONE_OF_EACH
    assert FINALIZER in deployment["metadata"]["finalizers"]

    kubectl.run("delete", "l4d", "scout", "-n", namespace, "--wait=true", "--timeout=60s")
    assert api.deployment(namespace, "scout") is None  # the finalizer let it go
    wait_equal(partial(child_counts, api, namespace, "scout"), NO_CHILDREN, 60, "every child gone")
    wait_equal(partial(api.pods, namespace, DEPLOYMENT_LABEL), [], 60, "every Ray pod gone")
    assert f"cleaned up {namespace}/scout" in operator.log()


# ---------------------------------------------------------------------------------------------
# kubectl explain


def explained_fields(text: str) -> dict[str, str]:
    """`kubectl explain`'s FIELDS section: field name -> its description.

    Each field is a line `  name<TAB><type>`, then maybe `  enum: ...`, then its description
    indented by four spaces."""
    fields: dict[str, str] = {}
    current = None
    for line in text.split("FIELDS:", 1)[-1].splitlines():
        if header := re.match(r"^  (\w+)\t<", line):
            current = header[1]
            fields[current] = ""
        elif current is not None and line.startswith("    ") and line.strip():
            fields[current] = f"{fields[current]} {line.strip()}".strip()
    return fields


def test_kubectl_explain_describes_the_spec(kubectl: Kubectl, operator: OperatorProcess) -> None:
    spec = kubectl.run("explain", "llama4deployment.spec")
    assert "KIND:       Llama4Deployment" in spec
    fields = explained_fields(spec)
    for key in (
        "model",
        "engine",
        "resources",
        "replicas",
        "autoscaling",
        "placement",
        "serving",
        "monitoring",
    ):
        assert fields.get(key), f"spec.{key} has no description: {fields}"
    model_text = kubectl.run("explain", "llama4deployment.spec.model")
    model = explained_fields(model_text)
    for key in ("variant", "quantization", "maxContextLength", "weights", "architecture"):
        assert model.get(key), f"spec.model.{key} has no description: {model}"
    assert "Llama 4 Maverick 17B-128E" in model["variant"]
    assert "enum: scout, maverick, behemoth, custom" in model_text
    assert "enum: bf16, fp8, int4" in model_text

"""Renderers: the child objects and the Serve config built from a spec and the plans."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.utils import parse_quantity as kubernetes_parse_quantity
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from llama4_operator.api.models import Llama4DeploymentSpec
from llama4_operator.planners.cluster_placement import GpuNode
from llama4_operator.renderers.children import (
    DEPLOYMENT_LABEL,
    METRICS_PORT,
    NetworkPolicySettings,
    Owner,
    RayPodSettings,
    endpoint_url,
)
from llama4_operator.renderers.deployment import Previous, desired_state
from llama4_operator.renderers.quantities import format_quantity, parse_quantity
from llama4_operator.renderers.serving import ENGINE_METRICS_PORT, IMPORT_PATH, parse_extra_args
from llama4_serving.config import ExpertPlacement, ServingConfig, rendered_replicas

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner(name="maverick", namespace="llm", uid="0f6a-uid")
SETTINGS = RayPodSettings(image="llama4-serving:test", ray_version="2.60.0")


def h100_nodes(count: int, gpus: int = 8) -> list[GpuNode]:
    return [
        GpuNode(
            name=f"gpu-{i}",
            gpu_product="NVIDIA-H100-80GB-HBM3",
            gpu_memory_mib=81559,
            allocatable_gpus=gpus,
            zone=f"zone-{'ab'[i % 2]}",
            node_pool="pool-0",
            nvlink_domain=f"gpu-{i}",
        )
        for i in range(count)
    ]


def sample(name: str, **changes: Any) -> Llama4DeploymentSpec:
    body = yaml.safe_load((ROOT / "manifests" / "samples" / f"{name}.yaml").read_text())["spec"]
    body.update(changes)
    return Llama4DeploymentSpec.model_validate(body)


def by_kind(children: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for child in children:
        out.setdefault(child["kind"], []).append(child)
    return out


@pytest.fixture(scope="module")
def maverick_state() -> Any:
    spec = sample("maverick", replicas=2)
    return desired_state(
        OWNER, spec, h100_nodes(3), SETTINGS, Previous(), service_monitor_available=True
    )


def test_every_child_is_owned_and_labelled(maverick_state: Any) -> None:
    kinds = {c["kind"] for c in maverick_state.children}
    assert kinds == {"RayService", "Service", "ConfigMap", "ServiceMonitor"}
    for child in maverick_state.children:
        meta = child["metadata"]
        assert meta["namespace"] == "llm"
        assert meta["labels"][DEPLOYMENT_LABEL] == "maverick"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "llama4-operator"
        (owner,) = meta["ownerReferences"]
        assert owner["uid"] == "0f6a-uid"
        assert owner["kind"] == "Llama4Deployment"
        assert owner["controller"] is True


def test_ray_pods_keep_kuberays_name_label_for_its_head_service(maverick_state: Any) -> None:
    # KubeRay selects a RayService's `<name>-head-svc` by app.kubernetes.io/name=kuberay, the
    # label it puts on the pods; a pod template naming the project instead empties that Service.
    (ray_service,) = by_kind(maverick_state.children)["RayService"]
    cluster = ray_service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    for template in templates:
        pod_labels = template["metadata"]["labels"]
        assert "app.kubernetes.io/name" not in pod_labels
        assert pod_labels[DEPLOYMENT_LABEL] == "maverick"


def test_worker_groups_follow_the_cluster_placement(maverick_state: Any) -> None:
    (ray_service,) = by_kind(maverick_state.children)["RayService"]
    assert ray_service["apiVersion"] == "ray.io/v1"
    groups = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    placed = [w for r in maverick_state.placement.replicas for w in r.workers]
    assert len(groups) == len(placed) == 2
    for group, worker in zip(groups, placed, strict=True):
        pod = group["template"]["spec"]
        term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]
        assert term["matchFields"] == [
            {"key": "metadata.name", "operator": "In", "values": [worker.node]}
        ]
        assert term["matchExpressions"][0]["values"] == ["NVIDIA-H100-80GB-HBM3"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8"
        assert group["replicas"] == 1
    # Two replicas go to two different nodes.
    assert len({w.node for w in placed}) == 2


def test_pods_meet_restricted_pod_security(maverick_state: Any) -> None:
    (ray_service,) = by_kind(maverick_state.children)["RayService"]
    cluster = ray_service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


def test_serve_config_carries_a_valid_serving_config(maverick_state: Any) -> None:
    (ray_service,) = by_kind(maverick_state.children)["RayService"]
    serve = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)  # Ray Serve's own schema accepts it
    (app,) = serve["applications"]
    assert app["import_path"] == IMPORT_PATH == "llama4_serving.app:build_app"
    config = ServingConfig.model_validate(app["args"])
    assert config.engine == "vllm"
    (server,) = app["deployments"]
    # Ray Serve LLM names the engine deployment after the model; vLLM has no `reconfigure`,
    # so the override carries the replica count and request limit only.
    assert server == {
        "name": "LLMServer:maverick",
        "autoscaling_config": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 2},
        "max_ongoing_requests": 2 * maverick_state.serving.batching.max_num_seqs,
    }
    assert config.placement is None  # vLLM's own EPLB places the experts
    assert config.batching == maverick_state.serving.batching
    assert config.engine_args["tensor_parallel_size"] == 8
    assert config.engine_args["enable_expert_parallel"] is True
    eplb_config = config.engine_args["eplb_config"]
    assert isinstance(eplb_config, dict)
    assert eplb_config["num_redundant_experts"] == 16
    assert config.engine_args["quantization"] == "fp8"
    assert config.architecture.num_local_experts == 128
    assert config.architecture.interleave_moe_layer_step == 2
    assert config.weights.uri == "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8"


def test_expert_config_map_holds_every_expert_on_every_layer(maverick_state: Any) -> None:
    (config_map,) = by_kind(maverick_state.children)["ConfigMap"]
    placement = json.loads(config_map["data"]["expert-placement.json"])
    assert len(placement["phy2log"]) == 24  # Maverick's MoE layers
    # 128 experts + 16 redundant slots over 8 GPUs: 18 slots per GPU.
    assert placement["slots_per_gpu"] == 18
    for row in placement["phy2log"]:
        assert len(row) == 8 * 18
        assert set(row) == set(range(128))


def test_services_and_service_monitor(maverick_state: Any) -> None:
    services = {s["metadata"]["name"]: s for s in by_kind(maverick_state.children)["Service"]}
    endpoint = services["maverick"]["spec"]
    assert endpoint["selector"] == {DEPLOYMENT_LABEL: "maverick", "ray.io/node-type": "head"}
    assert endpoint["ports"][0]["targetPort"] == 8000
    assert services["maverick-metrics"]["spec"]["clusterIP"] == "None"
    (monitor,) = by_kind(maverick_state.children)["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(
        services["maverick-metrics"]["metadata"]["labels"][k] == v for k, v in selector.items()
    )


def test_service_monitor_scrapes_ray_and_engine_metrics(maverick_state: Any) -> None:
    (monitor,) = by_kind(maverick_state.children)["ServiceMonitor"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics", "engine-metrics"]
    services = {s["metadata"]["name"]: s for s in by_kind(maverick_state.children)["Service"]}
    ports = {p["name"]: p["port"] for p in services["maverick-metrics"]["spec"]["ports"]}
    assert ports == {"metrics": 8080, "engine-metrics": maverick_state.serving.metrics_port}


def test_serving_series_are_labelled_with_the_deployment_not_the_served_model() -> None:
    # Recording rules and dashboards key serving series by the resource (docs/monitoring.md);
    # a served model name of the user's choosing must not change that key.
    spec = sample(
        "maverick", model={**sample("maverick").model.model_dump(), "servedModelName": "chat"}
    )
    state = desired_state(
        OWNER, spec, h100_nodes(3), SETTINGS, Previous(), service_monitor_available=True
    )
    assert state.serving is not None
    assert state.serving.served_model_name == "chat"
    assert state.serving.metrics_target_labels == {
        "namespace": OWNER.namespace,
        "llama4_deployment": OWNER.name,
    }
    (monitor,) = by_kind(state.children)["ServiceMonitor"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["relabelings"] == [
            {"targetLabel": "llama4_deployment", "replacement": OWNER.name}
        ]


def test_accelerator_resource_reaches_the_serving_config() -> None:
    settings = RayPodSettings(image="x", ray_version="2.60.0", accelerator_resource="fake_gpu")
    state = desired_state(OWNER, sample("tiny-reference"), h100_nodes(1), settings, Previous())
    assert state.serving is not None
    assert state.serving.accelerator_resource == "fake_gpu"


def test_no_service_monitor_without_its_crd() -> None:
    state = desired_state(
        OWNER,
        sample("maverick"),
        h100_nodes(1),
        SETTINGS,
        Previous(),
        service_monitor_available=False,
    )
    assert "ServiceMonitor" not in {c["kind"] for c in state.children}


def test_nothing_is_rendered_when_the_model_does_not_fit() -> None:
    spec = sample("maverick")
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"quantization": "bf16"})})
    state = desired_state(OWNER, spec, h100_nodes(1, gpus=4), SETTINGS, Previous())
    assert not state.fit.fits
    assert state.children == []


def test_replicas_beyond_free_gpus_are_reported_unplaced() -> None:
    state = desired_state(
        OWNER, sample("maverick", replicas=3), h100_nodes(2), SETTINGS, Previous()
    )
    assert state.fit.fits
    assert state.placed_replicas == 2
    assert state.placement is not None
    assert state.placement.unplaced == 1
    assert state.placement.reason


def test_a_stable_previous_plan_is_kept(maverick_state: Any) -> None:
    again = desired_state(
        OWNER,
        sample("maverick", replicas=2),
        list(reversed(h100_nodes(3))),
        SETTINGS,
        Previous(placement=maverick_state.placement, experts=maverick_state.experts.placement),
        service_monitor_available=True,
    )
    assert again.placement == maverick_state.placement
    assert again.experts is not None
    assert again.experts.placement == maverick_state.experts.placement


def _serve_target_and_groups(state: Any) -> tuple[int, dict[str, int]]:
    (ray_service,) = by_kind(state.children)["RayService"]
    (app,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    (server,) = app["deployments"]
    groups = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return rendered_replicas(server), {g["groupName"]: g["replicas"] for g in groups}


def test_a_scale_down_keeps_serves_target_until_the_retired_worker_is_deleted(
    maverick_state: Any,
) -> None:
    (live,) = by_kind(maverick_state.children)["RayService"]
    previous = Previous(
        placement=maverick_state.placement,
        experts=maverick_state.experts.placement,
        worker_groups=tuple(live["spec"]["rayClusterConfig"]["workerGroupSpecs"]),
        running_worker_groups=frozenset({"r0-w0", "r1-w0"}),
    )
    one = sample("maverick", replicas=1)
    # Replica 1's worker group goes to zero pods at once; Serve still counts its replica, so
    # it cannot stop replica 0's instead while replica 1's pod is about to go.
    held = desired_state(OWNER, one, h100_nodes(3), SETTINGS, previous)
    assert held.placed_replicas == 1
    assert _serve_target_and_groups(held) == (2, {"r0-w0": 1, "r1-w0": 0})
    # Its pod is being deleted (draining): Serve's target follows the plan.
    going = replace(previous, running_worker_groups=frozenset({"r0-w0"}))
    done = desired_state(OWNER, one, h100_nodes(3), SETTINGS, going)
    assert _serve_target_and_groups(done) == (1, {"r0-w0": 1, "r1-w0": 0})
    # Groups of the plan, and names that are not worker groups, never raise the target.
    others = replace(previous, running_worker_groups=frozenset({"r0-w0", "head", "r0-w1"}))
    assert (
        _serve_target_and_groups(desired_state(OWNER, one, h100_nodes(3), SETTINGS, others))[0] == 1
    )


def tiny_external(dashboard: str, **options: Any) -> Any:
    """The tiny reference sample's state against an external Ray cluster at `dashboard`."""
    return desired_state(
        OWNER,
        sample("tiny-reference"),
        h100_nodes(1),
        SETTINGS,
        Previous(),
        external_dashboard=dashboard,
        **options,
    )


def test_external_ray_mode_renders_no_ray_service() -> None:
    state = tiny_external("http://10.0.0.5:8265")
    kinds = sorted(c["kind"] for c in state.children)
    assert kinds == ["ConfigMap", "EndpointSlice", "Service"]
    assert state.external_application is not None
    assert state.external_application["route_prefix"] == "/llm/maverick"
    ServingConfig.model_validate(state.external_application["args"])
    by_name = tiny_external("http://ray-head.ray.svc:8265")
    (service,) = by_kind(by_name.children)["Service"]
    assert service["spec"] == {
        "type": "ExternalName",
        "externalName": "ray-head.ray.svc",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
    }


def test_external_ray_on_loopback_gets_no_endpoint_objects() -> None:
    # A Ray cluster on the operator's machine: pods cannot reach 127.0.0.1, and the API server
    # refuses loopback EndpointSlices.
    state = tiny_external("http://127.0.0.1:8265")
    assert [c["kind"] for c in state.children] == ["ConfigMap"]
    assert endpoint_url(OWNER, sample("tiny-reference"), "http://127.0.0.1:8265") == (
        "http://127.0.0.1:8000/llm/maverick/v1"
    )
    assert endpoint_url(OWNER, sample("tiny-reference"), "http://127.0.0.1:8265", 8123) == (
        "http://127.0.0.1:8123/llm/maverick/v1"
    )


def test_an_external_serve_proxy_port_reaches_the_endpoint_objects() -> None:
    state = tiny_external("http://10.0.0.5:8265", external_serve_port=8123)
    found = by_kind(state.children)
    (service,) = found["Service"]
    (endpoints,) = found["EndpointSlice"]
    assert service["spec"]["ports"][0]["port"] == service["spec"]["ports"][0]["targetPort"] == 8123
    assert endpoints["ports"][0]["port"] == 8123


def test_tiny_reference_sample_renders_the_reference_engine() -> None:
    state = desired_state(OWNER, sample("tiny-reference"), h100_nodes(1), SETTINGS, Previous())
    assert state.fit.fits
    assert state.serving is not None
    assert state.serving.engine == "reference"
    assert state.serving.engine_args == {}
    assert state.serving.weights.kind == "random"
    assert state.serving.architecture.attention_chunk_size == 32


def test_extra_args_are_read_as_yaml_scalars_and_flat_mappings() -> None:
    given = {"a": "true", "b": "4", "c": "0.9", "d": "x", "e": "[1]"}
    given |= {"f": '{"window_size": 10, "log": true}', "g": "{nested: {no: 1}}"}
    assert parse_extra_args(given) == {
        "a": True,
        "b": 4,
        "c": 0.9,
        "d": "x",
        "e": "[1]",
        "f": {"window_size": 10, "log": True},
        "g": "{nested: {no: 1}}",
    }


def test_placement_only_uses_nodes_the_node_selector_allows() -> None:
    nodes = [
        replace(node, labels=(("team", "search" if i < 2 else "ads"),))
        for i, node in enumerate(h100_nodes(4))
    ]
    spec = sample("maverick", replicas=3)
    spec = spec.model_copy(
        update={"resources": spec.resources.model_copy(update={"node_selector": {"team": "ads"}})}
    )
    state = desired_state(OWNER, spec, nodes, SETTINGS, Previous())
    assert state.placement is not None
    placed = {w.node for r in state.placement.replicas for w in r.workers}
    assert placed == {"gpu-2", "gpu-3"}
    assert state.placement.unplaced == 1


def test_a_node_selector_no_gpu_node_matches_means_no_fit() -> None:
    spec = sample("maverick")
    spec = spec.model_copy(
        update={"resources": spec.resources.model_copy(update={"node_selector": {"team": "x"}})}
    )
    state = desired_state(OWNER, spec, h100_nodes(2), SETTINGS, Previous())
    assert not state.fit.fits
    assert state.children == []
    assert "0 of 2 GPU nodes that match resources.nodeSelector" in state.fit.message


def _application(state: Any) -> dict[str, Any]:
    """The Serve application a state deploys: from the RayService, or the external one."""
    if state.external_application is not None:
        application: dict[str, Any] = state.external_application
        return application
    (ray_service,) = by_kind(state.children)["RayService"]
    (application,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    return application


@pytest.mark.parametrize("external", [None, "http://10.0.0.5:8265"])
def test_scaled_to_zero_the_application_stays_with_its_engine_at_zero(external: str | None) -> None:
    sleepy = {"enabled": True, "minReplicas": 0, "coldStartSeconds": 120}
    state = desired_state(
        OWNER,
        sample("tiny-reference", replicas=0, autoscaling=sleepy),
        h100_nodes(1),
        SETTINGS,
        Previous(),
        external_dashboard=external,
    )
    assert state.asleep
    assert state.placed_replicas == 0
    application = _application(state)
    ServeDeploySchema.model_validate({"applications": [application]})
    (engine,) = (d for d in application["deployments"] if d["name"] == "LLMServer")
    assert "num_replicas" not in engine
    assert engine["autoscaling_config"]["min_replicas"] == 0
    assert engine["autoscaling_config"]["max_replicas"] == 1
    # A request that finds no replica waits out a cold start before a 503.
    assert ServingConfig.model_validate(application["args"]).first_output_timeout_s == 90 + 120
    if external is None:
        (ray_service,) = by_kind(state.children)["RayService"]
        groups = ray_service["spec"]["rayClusterConfig"].get("workerGroupSpecs") or []
        assert all(group["replicas"] == 0 for group in groups)
    # Scaled to zero by hand (no autoscaler to wake it), nothing is deployed in external mode.
    stopped = desired_state(
        OWNER,
        sample("tiny-reference", replicas=0),
        h100_nodes(1),
        SETTINGS,
        Previous(),
        external_dashboard=external,
    )
    assert not stopped.asleep
    if external is not None:
        assert stopped.external_application is None


def _reversed_rows(placement: ExpertPlacement) -> ExpertPlacement:
    """Another valid plan of the same shape (every row reversed), one version on."""
    return placement.model_copy(
        update={
            "phy2log": [list(reversed(row)) for row in placement.phy2log],
            "version": placement.version + 1,
        }
    )


@pytest.mark.parametrize("external", [None, "http://10.0.0.5:8265"])
def test_replicas_and_expert_plan_change_only_the_deployment_override(
    external: str | None,
) -> None:
    # Serve hashes `args` into the code version: new args would replace every replica. The
    # reference engine takes expert plans live (vLLM: tests/unit/test_vllm_engine.py).
    def render(replicas: int, previous: Previous) -> dict[str, Any]:
        state = desired_state(
            OWNER,
            sample(
                "maverick",
                replicas=replicas,
                engine={"name": "reference"},
                autoscaling={"enabled": True, "minReplicas": 0},
            ),
            h100_nodes(3),
            SETTINGS,
            previous,
            external_dashboard=external,
        )
        return _application(state)

    one = render(1, Previous())
    two = render(2, Previous())
    first_plan = ExpertPlacement.model_validate(one["deployments"][0]["user_config"]["placement"])
    rebalanced = render(2, Previous(experts=_reversed_rows(first_plan)))
    asleep = render(0, Previous())
    assert json.dumps(one["args"]) == json.dumps(two["args"]) == json.dumps(rebalanced["args"])
    assert "placement" not in one["args"] or one["args"]["placement"] is None
    assert [rendered_replicas(a["deployments"][0]) for a in (one, two, rebalanced)] == [1, 2, 2]
    # Serve's code version (a new one rebuilds the application and replaces every replica) is
    # the same at every count, zero included.
    versions = {
        get_app_code_version(ServeApplicationSchema.model_validate(a))
        for a in (asleep, one, two, rebalanced)
    }
    assert len(versions) == 1
    placements = [a["deployments"][0]["user_config"]["placement"] for a in (two, rebalanced)]
    assert placements[0] != placements[1]
    assert placements[1]["version"] == first_plan.version + 1


def test_a_rebalanced_plan_is_kept_verbatim(maverick_state: Any) -> None:
    # A plan the rebalance loop wrote must survive the next resync, though a fresh plan for
    # uniform load would look different.
    measured = _reversed_rows(maverick_state.experts.placement)
    again = desired_state(
        OWNER,
        sample("maverick", replicas=2),
        h100_nodes(3),
        SETTINGS,
        Previous(placement=maverick_state.placement, experts=measured),
    )
    assert again.experts is not None
    assert again.experts.placement == measured
    (config_map,) = by_kind(again.children)["ConfigMap"]
    assert ExpertPlacement.model_validate_json(config_map["data"]["expert-placement.json"]) == (
        measured
    )


def test_a_plan_that_no_longer_fits_the_layout_is_replaced(maverick_state: Any) -> None:
    old = maverick_state.experts.placement
    wrong_shape = old.model_copy(update={"phy2log": old.phy2log[:-1], "version": 4})
    missing_expert = old.model_copy(
        update={"phy2log": [[0] * len(old.phy2log[0]), *old.phy2log[1:]], "version": 4}
    )
    for previous in (wrong_shape, missing_expert):
        state = desired_state(
            OWNER,
            sample("maverick", replicas=2),
            h100_nodes(3),
            SETTINGS,
            Previous(experts=previous),
        )
        assert state.experts is not None
        assert state.experts.placement.phy2log == old.phy2log  # the uniform-load plan again
        assert state.experts.placement.version == 5


def test_ray_services_turn_rays_token_authentication_on_by_default() -> None:
    def auth(**changes: Any) -> Any:
        state = desired_state(
            OWNER, sample("maverick", **changes), h100_nodes(1), SETTINGS, Previous()
        )
        (ray_service,) = by_kind(state.children)["RayService"]
        return ray_service["spec"]["rayClusterConfig"]["authOptions"]

    assert auth() == {"mode": "token"}
    assert auth(serving={"rayAuthentication": "disabled"}) == {"mode": "disabled"}


POLICY = NetworkPolicySettings(
    operator_namespace="llama4-system",
    operator_pod_labels={"app.kubernetes.io/name": "llama4-operator"},
)


def test_network_policy_guards_the_ray_head_when_configured() -> None:
    settings = replace(SETTINGS, network_policy=POLICY)
    state = desired_state(OWNER, sample("tiny-reference"), h100_nodes(1), settings, Previous())
    [policy] = by_kind(state.children)["NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert spec["policyTypes"] == ["Ingress"]
    own_pods, operator, serving, metrics = spec["ingress"]
    # The deployment's own Ray pods reach every port (GCS, dashboard, object transfer).
    assert "ports" not in own_pods
    assert own_pods["from"] == [
        {"podSelector": {"matchLabels": {"serving.llama4.dev/deployment": OWNER.name}}}
    ]
    # The operator reaches the dashboard (job submission) and nothing else.
    assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    [peer] = operator["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "llama4-system"
    }
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "llama4-operator"}
    # Anyone reaches the OpenAI port when no clients are named; the metrics ports are open.
    assert "from" not in serving
    assert [p["port"] for p in metrics["ports"]] == [METRICS_PORT, ENGINE_METRICS_PORT]
    assert all(p["port"] not in (6379, 8265) for rule in (serving, metrics) for p in rule["ports"])
    # Without the setting (and in external-Ray mode) no policy is rendered.
    plain = desired_state(OWNER, sample("tiny-reference"), h100_nodes(1), SETTINGS, Previous())
    assert "NetworkPolicy" not in by_kind(plain.children)


def test_network_policy_limits_the_openai_port_to_the_named_clients() -> None:
    clients = ({"namespaceSelector": {"matchLabels": {"team": "apps"}}},)
    settings = replace(SETTINGS, network_policy=replace(POLICY, serving_clients=clients))
    state = desired_state(OWNER, sample("tiny-reference"), h100_nodes(1), settings, Previous())
    serving = by_kind(state.children)["NetworkPolicy"][0]["spec"]["ingress"][2]
    assert serving["from"] == [dict(clients[0])]


def test_ray_containers_get_a_writable_home(maverick_state: Any) -> None:
    """Restricted pods run as a user without a home directory; Ray Serve LLM writes its caches
    under HOME (found on a real node: PermissionError on /.cache)."""
    [service] = by_kind(maverick_state.children)["RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    for template in templates:
        [container] = template["spec"]["containers"]
        assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_deleted_workers_drain_their_ray_node_first(maverick_state: Any) -> None:
    """KubeRay's `bash -c` is PID 1 and ignores SIGTERM: the preStop hook hands it to Ray,
    which drains for as long as the setting says, inside the grace period."""
    (ray_service,) = by_kind(maverick_state.children)["RayService"]
    cluster = ray_service["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        [container] = pod["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == [
            "python3", "-m", "llama4_serving.drain", "--timeout=600",
        ]  # fmt: skip
        assert {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": "600"} in container["env"]
        assert pod["terminationGracePeriodSeconds"] > 600
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "lifecycle" not in head["containers"][0]
    assert "terminationGracePeriodSeconds" not in head

    shorter = _cluster(replace(SETTINGS, worker_drain_seconds=120), sample("scout"))
    [container] = shorter["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == "--timeout=120"
    assert shorter["workerGroupSpecs"][0]["template"]["spec"]["terminationGracePeriodSeconds"] > 120


def _cluster(settings: RayPodSettings, spec: Llama4DeploymentSpec) -> Any:
    state = desired_state(OWNER, spec, h100_nodes(1), settings, Previous())
    (ray_service,) = by_kind(state.children)["RayService"]
    return ray_service["spec"]["rayClusterConfig"]


def scout_on_two_gpus() -> Llama4DeploymentSpec:
    """Scout in fp8 needs 2 x H100 per replica (docs/fit-check.md): one worker on 2 GPUs."""
    body = yaml.safe_load((ROOT / "manifests" / "samples" / "scout.yaml").read_text())["spec"]
    body["model"]["quantization"] = "fp8"
    return Llama4DeploymentSpec.model_validate(body)


def _resources(template: dict[str, Any]) -> dict[str, Any]:
    [container] = template["spec"]["containers"]
    resources: dict[str, Any] = container["resources"]
    return resources


def test_ray_pods_default_sizes_are_unchanged(maverick_state: Any) -> None:
    (ray_service,) = by_kind(maverick_state.children)["RayService"]
    cluster = ray_service["spec"]["rayClusterConfig"]
    head = {"cpu": "2", "memory": "8Gi"}
    assert _resources(cluster["headGroupSpec"]["template"]) == {"requests": head, "limits": head}
    assert cluster["headGroupSpec"]["rayStartParams"] == {
        "dashboard-host": "0.0.0.0",
        "num-gpus": "0",
    }
    for group in cluster["workerGroupSpecs"]:  # 8 GPUs each: 8 CPUs and 64Gi per GPU
        worker = {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
        assert _resources(group["template"]) == {"requests": worker, "limits": worker}
        assert group["rayStartParams"] == {"num-gpus": "8"}


def test_ray_pod_sizes_are_configurable_and_multiplied_exactly_per_gpu() -> None:
    settings = replace(
        SETTINGS,
        head_cpu="500m",
        head_memory="1536Mi",
        worker_cpu_per_gpu="700m",
        worker_memory_per_gpu="6Gi",
    )
    cluster = _cluster(settings, scout_on_two_gpus())
    head = {"cpu": "500m", "memory": "1536Mi"}
    assert _resources(cluster["headGroupSpec"]["template"]) == {"requests": head, "limits": head}
    [group] = cluster["workerGroupSpecs"]
    # 700m x 2 is 1400m (not 1.4000000000000001), 6Gi x 2 is 12Gi; requests = limits.
    worker = {"cpu": "1400m", "memory": "12Gi", "nvidia.com/gpu": "2"}
    assert _resources(group["template"]) == {"requests": worker, "limits": worker}
    assert group["rayStartParams"] == {"num-gpus": "2"}


@pytest.mark.parametrize(
    ("cpu", "memory", "gpus", "expected_cpu", "expected_memory"),
    [
        ("8", "64Gi", 8, "64", "512Gi"),
        ("0.5", "512Mi", 2, "1", "1Gi"),
        ("250m", "1.5Gi", 3, "750m", "4608Mi"),
        ("1.1", "2G", 3, "3300m", "6G"),
        ("1e3", "1e9", 2, "2k", "2G"),
        ("333m", "1000Ki", 3, "999m", "3000Ki"),
    ],
)
def test_quantities_multiply_exactly_into_canonical_form(
    cpu: str, memory: str, gpus: int, expected_cpu: str, expected_memory: str
) -> None:
    assert format_quantity(parse_quantity(cpu) * gpus) == expected_cpu
    assert format_quantity(parse_quantity(memory) * gpus) == expected_memory


@pytest.mark.parametrize(
    "text", ["2", "500m", "0.5", ".5", "1.", "8Gi", "1536Mi", "4G", "1e3", "1E", "2k", "+3Ti"]
)
def test_quantity_parser_agrees_with_the_kubernetes_client(text: str) -> None:
    expected = kubernetes_parse_quantity(text)
    assert parse_quantity(text).value == Fraction(expected)


@pytest.mark.parametrize("text", ["", "2 cores", "8GB", "8gi", "1.2.3", "m", "Gi", "0x10", "1e"])
def test_what_is_not_a_quantity_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_a_custom_accelerator_is_declared_to_ray_instead_of_gpus() -> None:
    settings = replace(SETTINGS, accelerator_resource="fake_gpu")
    cluster = _cluster(settings, scout_on_two_gpus())
    [group] = cluster["workerGroupSpecs"]
    # KubeRay passes each entry as --key=value to `ray start`; the JSON goes in single quotes.
    assert group["rayStartParams"] == {"num-gpus": "0", "resources": "'{\"fake_gpu\":2}'"}
    assert json.loads(group["rayStartParams"]["resources"].strip("'")) == {"fake_gpu": 2}
    # Not in the group's resources map (KubeRay counts keys ending in "gpu" there as GPUs).
    assert "resources" not in group
    # The pods still ask the scheduler for the GPUs the placement counted.
    worker = {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "2"}
    assert _resources(group["template"]) == {"requests": worker, "limits": worker}
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head == {"dashboard-host": "0.0.0.0", "num-gpus": "0"}
    # With GPU, the same spec declares GPUs and nothing else.
    [gpu_group] = _cluster(SETTINGS, scout_on_two_gpus())["workerGroupSpecs"]
    assert gpu_group["rayStartParams"] == {"num-gpus": "2"}


def test_without_a_cpu_limit_the_ray_pods_request_cpu_only() -> None:
    settings = replace(SETTINGS, head_cpu="500m", worker_cpu_per_gpu="600m", cpu_limit=False)
    cluster = _cluster(settings, scout_on_two_gpus())
    head = _resources(cluster["headGroupSpec"]["template"])
    assert head["requests"] == {"cpu": "500m", "memory": "8Gi"}
    assert head["limits"] == {"memory": "8Gi"}  # Burstable: idle cores are used, not throttled
    [group] = cluster["workerGroupSpecs"]
    worker = _resources(group["template"])
    assert worker["requests"] == {"cpu": "1200m", "memory": "128Gi", "nvidia.com/gpu": "2"}
    assert worker["limits"] == {"memory": "128Gi", "nvidia.com/gpu": "2"}

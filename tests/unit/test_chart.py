"""The Helm chart: lint, render for default and non-default values, schema, RBAC, pod security,
and the derived files (CRD copy, README, plain bundle) that must match their sources."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from llama4_operator.devenv import tools
from llama4_operator.handlers.config import (
    DEFAULT_RAY_WORKER_DRAIN_S,
    ENV_RAY_CPU_LIMIT,
    ENV_RAY_HEAD_CPU,
    ENV_RAY_HEAD_MEMORY,
    ENV_RAY_WORKER_CPU_PER_GPU,
    ENV_RAY_WORKER_DRAIN,
    ENV_RAY_WORKER_MEMORY_PER_GPU,
    ConfigError,
    OperatorConfig,
    network_policy_settings,
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "llama4-operator"
HELM = str(tools.tool("helm").binary())
NON_DEFAULT = (
    "--set=watchNamespaces={ml,team-a}",
    "--set=metrics.serviceMonitor.enabled=true",
    "--set=prometheusRule.enabled=true",
    "--set=dashboards.enabled=true",
    "--set=image.tag=dev",
    "--set=operator.verbose=true",
)


def _load_sync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("helm_sync", REPO / "helm" / "sync.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([HELM, *args], capture_output=True, text=True, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(*flags: str) -> list[dict[str, Any]]:
    out = helm("template", "rel", str(CHART), "--namespace", "ops", *flags).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("flags", [(), NON_DEFAULT], ids=["default", "non-default"])
def test_helm_lint_passes(flags: tuple[str, ...]) -> None:
    result = helm("lint", "--strict", str(CHART), *flags)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--set=replicaCont=2", "replicaCont"),  # typo of replicaCount
        ("--set=metrics.serviceMonitor.enable=true", "enable"),  # typo of enabled
        ("--set=metrics.port=http", "/metrics/port"),  # wrong type
        ("--set=image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("--set=operator.rayPods.head.cpu=2 cores", "/operator/rayPods/head/cpu"),
        ("--set=operator.rayPods.workerPerGpu.memory=64GB", "/operator/rayPods/workerPerGpu"),
        ("--set=operator.rayPods.workerPerGpu.memry=1Gi", "memry"),
    ],
)
def test_schema_rejects_typos_and_wrong_types_naming_the_value(flag: str, named: str) -> None:
    result = helm("template", "rel", str(CHART), flag, check=False)
    assert result.returncode != 0
    assert named in result.stderr, result.stderr


def test_operator_pod_meets_the_restricted_pod_security_profile() -> None:
    # The fields the "restricted" Pod Security Standard requires (kubernetes.io/docs/concepts/
    # security/pod-security-standards/), plus a read-only root filesystem.
    (deployment,) = by_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["args"][0] == "operator"  # the image's entry point is llama4ctl
    assert "--all-namespaces" in container["args"]


def test_image_tag_defaults_to_the_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (deployment,) = by_kind(render(), "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/llama4-operator/llama4-operator:{chart['appVersion']}"


def _rules(docs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    (role,) = [d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"] == name]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def _grants(rules: list[dict[str, Any]], resource: str, verb: str) -> bool:
    return any(resource in r["resources"] and verb in r["verbs"] for r in rules)


def test_namespaced_mode_binds_the_workload_rules_per_namespace_only() -> None:
    docs = render("--set=watchNamespaces={ml,team-a}")
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "team-a"]
    assert {b["roleRef"]["name"] for b in bindings} == {"rel-llama4-operator-workloads"}
    cluster_bindings = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")}
    assert cluster_bindings == {"rel-llama4-operator-cluster"}  # no cluster-wide writes
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"--namespace=ml", "--namespace=team-a"} <= set(args)
    assert [p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")] == ["ml", "team-a"]
    assert _grants(_rules(docs, "rel-llama4-operator-workloads"), "kopfpeerings", "patch")


def test_cluster_mode_binds_the_workload_rules_cluster_wide() -> None:
    docs = render()
    cluster_bindings = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")}
    assert cluster_bindings == {"rel-llama4-operator-cluster", "rel-llama4-operator-workloads"}
    assert not by_kind(docs, "RoleBinding")
    assert [p["metadata"]["name"] for p in by_kind(docs, "ClusterKopfPeering")] == [
        "llama4-operator"
    ]
    assert _grants(_rules(docs, "rel-llama4-operator-cluster"), "clusterkopfpeerings", "patch")


def test_rbac_grants_what_the_operator_calls_and_no_wildcards() -> None:
    docs = render()
    workloads = _rules(docs, "rel-llama4-operator-workloads")
    cluster = _rules(docs, "rel-llama4-operator-cluster")
    # From llama4_operator.kube: status patch, finalizers, scale, server-side apply of every
    # child kind (create + patch), pruning (list + delete), GPU accounting reads, the
    # ServiceMonitor CRD.
    assert _grants(workloads, "llama4deployments/status", "patch")
    assert _grants(workloads, "llama4deployments/finalizers", "update")
    assert _grants(workloads, "llama4deployments/scale", "patch")  # the autoscaler
    for child in ("rayservices", "services", "configmaps", "endpointslices", "servicemonitors"):
        for verb in ("create", "patch", "list", "delete"):
            assert _grants(workloads, child, verb), (child, verb)
    assert _grants(workloads, "events", "create")
    for resource in ("nodes", "pods", "llama4deployments"):
        assert _grants(cluster, resource, "list"), resource
    assert _grants(cluster, "customresourcedefinitions", "get")
    assert not _grants(cluster, "pods", "delete")
    everything = workloads + cluster
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in everything)


def test_every_rbac_rule_is_commented_with_why() -> None:
    lines = (CHART / "templates" / "rbac.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            assert lines[index - 1].strip().startswith("#"), f"rbac.yaml:{index + 1} uncommented"


def test_monitoring_objects_are_off_by_default_and_on_with_their_toggles() -> None:
    assert not by_kind(render(), "ServiceMonitor")
    assert not by_kind(render(), "PrometheusRule")
    assert not by_kind(render(), "ConfigMap")
    docs = render(*NON_DEFAULT)
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r.get("alert") for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "Llama4DeploymentNotReady" in alerts
    dashboards = by_kind(docs, "ConfigMap")
    assert {d["metadata"]["labels"]["grafana_dashboard"] for d in dashboards} == {"1"}
    uids = {yaml.safe_load(next(iter(d["data"].values())))["uid"] for d in dashboards}
    assert uids == {"llama4-overview", "llama4-moe"}


def test_chart_tests_scrape_the_metrics_service() -> None:
    (pod,) = by_kind(render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "rel-llama4-operator-metrics:8080/metrics" in pod["spec"]["containers"][0]["command"][2]


def test_readme_crd_copy_and_install_bundle_are_up_to_date() -> None:
    sync = _load_sync()
    stale = [str(p.relative_to(REPO)) for p in sync.stale(HELM)]
    assert not stale, f"out of date: {stale}; run `python helm/sync.py`"


def test_readme_documents_every_leaf_value() -> None:
    sync = _load_sync()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = {key for key, _, _ in sync.values_table((CHART / "values.yaml").read_text())}

    def leaves(node: Any, prefix: str) -> set[str]:
        if isinstance(node, dict) and node and not prefix.endswith(("labels", "resources")):
            found: set[str] = set()
            for key, value in node.items():
                path = f"{prefix}.{key}" if prefix else key
                found |= {path} if path in documented else leaves(value, path)
            return found
        return {prefix}

    undocumented = leaves(values, "") - documented
    assert not undocumented, f"values without a `# --` comment: {sorted(undocumented)}"


def test_plain_bundle_has_the_crds_a_restricted_namespace_and_no_test_pod() -> None:
    docs = [
        d
        for d in yaml.safe_load_all((REPO / "manifests/install/llama4-operator.yaml").read_text())
        if d
    ]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace"
    labels = docs[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert "llama4deployments.serving.llama4.dev" in crds
    assert "Pod" not in kinds
    assert re.search(
        r"^kind: Deployment$", (REPO / "manifests/install/llama4-operator.yaml").read_text(), re.M
    )


def test_liveness_probe_reads_kopfs_endpoint_on_its_port() -> None:
    [deployment] = by_kind(render(), "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--liveness-port=8081" in container["args"]
    assert {"name": "liveness", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    [container] = by_kind(render("--set=liveness.port=0"), "Deployment")[0]["spec"]["template"][
        "spec"
    ]["containers"]
    assert "livenessProbe" not in container


def test_replicas_get_a_disruption_budget_and_a_spread_only_when_there_are_several() -> None:
    docs = render()
    [budget] = by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    pod_spec = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    spread = pod_spec["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == [
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    ]
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" for c in spread)
    assert budget["spec"]["selector"] == spread[0]["labelSelector"]
    single = render("--set=replicaCount=1")
    assert not by_kind(single, "PodDisruptionBudget")
    assert (
        "topologySpreadConstraints"
        not in by_kind(single, "Deployment")[0]["spec"]["template"]["spec"]
    )


def test_the_test_pod_has_no_token_and_requests_cpu() -> None:
    [pod] = by_kind(render(), "Pod")
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"]


def test_network_policy_setting_reaches_the_operator_as_json_it_accepts() -> None:
    clients = '[{"namespaceSelector":{"matchLabels":{"team":"apps"}}}]'
    [deployment] = by_kind(
        render(f"--set-json=networkPolicy.servingClients={clients}"), "Deployment"
    )
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [flag] = [a for a in container["args"] if a.startswith("--ray-network-policy=")]
    settings = network_policy_settings(flag.split("=", 1)[1])
    assert settings is not None
    assert settings.operator_namespace == "ops"
    assert settings.operator_pod_labels == deployment["spec"]["selector"]["matchLabels"]
    assert settings.serving_clients == ({"namespaceSelector": {"matchLabels": {"team": "apps"}}},)
    workloads = _rules(render(), "rel-llama4-operator-workloads")
    for verb in ("create", "patch", "list", "delete"):
        assert _grants(workloads, "networkpolicies", verb), verb
    [plain] = by_kind(render("--set=networkPolicy.enabled=false"), "Deployment")
    args = plain["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in args if a.startswith("--ray-network-policy")]


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("{not json", "must be JSON"),
        ('["a"]', "must be a JSON object"),
        ('{"operatorPodLabels": {"a": "b"}}', "operatorNamespace"),
        ('{"operatorNamespace": "ns", "operatorPodLabels": {}}', "operatorPodLabels"),
        ('{"operatorNamespace": "ns", "operatorPodLabels": {"a": 1}}', "operatorPodLabels"),
        (
            '{"operatorNamespace": "ns", "operatorPodLabels": {"a": "b"}, "servingClients": {}}',
            "servingClients",
        ),
        ('{"operatorNamespace": "ns", "operatorPodLabels": {"a": "b"}, "typo": 1}', "typo"),
    ],
)
def test_a_bad_network_policy_setting_is_refused_naming_the_field(value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        network_policy_settings(value)
    assert network_policy_settings("") is None


RAY_POD_FLAGS = {
    "--ray-head-cpu": ENV_RAY_HEAD_CPU,
    "--ray-head-memory": ENV_RAY_HEAD_MEMORY,
    "--ray-worker-cpu-per-gpu": ENV_RAY_WORKER_CPU_PER_GPU,
    "--ray-worker-memory-per-gpu": ENV_RAY_WORKER_MEMORY_PER_GPU,
}


def _ray_pod_sizes(*flags: str) -> dict[str, str]:
    """The Ray pod sizes the chart passes the operator, by environment variable."""
    [deployment] = by_kind(render(*flags), "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    sizes = {}
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag in RAY_POD_FLAGS:
            sizes[RAY_POD_FLAGS[flag]] = value
    return sizes


def test_ray_pod_sizes_reach_the_operator_as_flags_it_accepts() -> None:
    defaults = _ray_pod_sizes()
    assert defaults == {
        ENV_RAY_HEAD_CPU: "2",
        ENV_RAY_HEAD_MEMORY: "8Gi",
        ENV_RAY_WORKER_CPU_PER_GPU: "8",
        ENV_RAY_WORKER_MEMORY_PER_GPU: "64Gi",
    }
    small = _ray_pod_sizes(
        "--set=operator.rayPods.head.cpu=500m",
        "--set=operator.rayPods.head.memory=2Gi",
        "--set=operator.rayPods.workerPerGpu.cpu=0.25",  # a number in values.yaml
        "--set=operator.rayPods.workerPerGpu.memory=1536Mi",
    )
    assert small == {
        ENV_RAY_HEAD_CPU: "500m",
        ENV_RAY_HEAD_MEMORY: "2Gi",
        ENV_RAY_WORKER_CPU_PER_GPU: "0.25",
        ENV_RAY_WORKER_MEMORY_PER_GPU: "1536Mi",
    }
    config = OperatorConfig.from_env(small)
    assert (config.ray_head_cpu, config.ray_head_memory) == ("500m", "2Gi")
    assert (config.ray_worker_cpu_per_gpu, config.ray_worker_memory_per_gpu) == ("0.25", "1536Mi")
    assert OperatorConfig.from_env(defaults).ray_worker_memory_per_gpu == "64Gi"


def test_the_worker_drain_value_reaches_the_operator_as_its_flag() -> None:
    def drain_seconds(*flags: str) -> str:
        [value] = [
            arg.partition("=")[2]
            for arg in _container_args(*flags)
            if arg.startswith("--ray-worker-drain-seconds=")
        ]
        return value

    assert drain_seconds() == str(DEFAULT_RAY_WORKER_DRAIN_S)
    value = drain_seconds("--set=operator.rayPods.workerDrainSeconds=1200")
    assert OperatorConfig.from_env({ENV_RAY_WORKER_DRAIN: value}).ray_worker_drain_s == 1200
    assert OperatorConfig.from_env({}).ray_worker_drain_s == DEFAULT_RAY_WORKER_DRAIN_S
    with pytest.raises(ConfigError, match=ENV_RAY_WORKER_DRAIN):
        OperatorConfig.from_env({ENV_RAY_WORKER_DRAIN: "soon"})


def _container_args(*flags: str) -> list[str]:
    [deployment] = by_kind(render(*flags), "Deployment")
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def test_the_ray_cpu_limit_value_reaches_the_operator_as_its_flag() -> None:
    assert "--ray-cpu-limit" in _container_args()
    args = _container_args("--set=operator.rayPods.cpuLimit=false")
    assert "--no-ray-cpu-limit" in args
    assert "--ray-cpu-limit" not in args
    env = {ENV_RAY_CPU_LIMIT: "false"}
    assert OperatorConfig.from_env(env).ray_cpu_limit is False
    assert OperatorConfig.from_env({}).ray_cpu_limit is True
    with pytest.raises(ConfigError, match=ENV_RAY_CPU_LIMIT):
        OperatorConfig.from_env({ENV_RAY_CPU_LIMIT: "sometimes"})

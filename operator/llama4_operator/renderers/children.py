"""Desired child objects of a `Llama4Deployment`, as plain dicts ready for server-side apply.

- a KubeRay `RayService`: a CPU head and one GPU worker group per placed worker, pinned by node
  affinity to the node the cluster placement chose; its `serveConfigV2` runs the serving app;
- a Service for the OpenAI-compatible endpoint (the Serve proxy on the head), and a headless one
  for Prometheus to scrape every Ray pod;
- a ConfigMap with the expert placement;
- a ServiceMonitor when asked for (and its CRD exists);
- in external-Ray mode, no RayService: the endpoint Service points at the external cluster.

Every object carries the project's labels and an owner reference to the Llama4Deployment, so the
garbage collector removes it with its owner.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from llama4_operator.api.models import (
    DEPLOYMENT_SERIES_LABEL,
    GROUP,
    KIND,
    VERSION,
    Llama4DeploymentSpec,
)
from llama4_operator.planners.cluster_placement import ClusterPlacement
from llama4_operator.planners.gpu_products import GPU_RESOURCE, PRODUCT_LABEL
from llama4_operator.renderers.quantities import format_quantity, parse_quantity
from llama4_operator.renderers.serving import (
    API_KEY_MOUNT_DIR,
    ENGINE_METRICS_PORT,
    SERVE_HTTP_PORT,
    serve_config_v2,
)
from llama4_serving.config import ExpertPlacement, ServingConfig

Object = dict[str, Any]

DEPLOYMENT_LABEL = f"{GROUP}/deployment"
COMPONENT_LABEL = "app.kubernetes.io/component"
NAME_LABEL = "app.kubernetes.io/name"
MANAGED_BY = "llama4-operator"
METRICS_PORT = 8080  # Ray's metrics export port on every node
DASHBOARD_PORT = 8265
RAY_NODE_TYPE_LABEL = "ray.io/node-type"  # KubeRay's, on every Ray pod: head or worker
RAY_GROUP_LABEL = "ray.io/group"  # KubeRay's: the pod's worker group
WORKER_GROUP_PATTERN = re.compile(r"r(\d+)-w(\d+)")  # see worker_group_name
MODELS_MOUNT_PATH = "/models"  # where spec.model.weights.volumeClaimName is mounted
EXPERT_PLACEMENT_KEY = "expert-placement.json"
DRAIN_GRACE_MARGIN_S = 30  # past a worker's drain: Ray stops its processes, then the container


@dataclass(frozen=True)
class Owner:
    """The Llama4Deployment the children belong to."""

    name: str
    namespace: str
    uid: str


def ray_service_dashboard_url(owner: Owner, ray_cluster: str) -> str:
    """The dashboard of a RayService's Ray cluster, through the head Service KubeRay makes for
    that cluster (`<cluster>-head-svc`; the RayService's own one appears only once it is
    Ready)."""
    return f"http://{ray_cluster}-head-svc.{owner.namespace}.svc:{DASHBOARD_PORT}"


def active_ray_cluster(ray_service: Mapping[str, Any]) -> str | None:
    """The RayCluster serving a RayService's traffic, once KubeRay names one."""
    status = ray_service.get("status") or {}
    name = (status.get("activeServiceStatus") or {}).get("rayClusterName")
    return str(name) if name else None


def ray_service_token_secret(ray_service: Mapping[str, Any]) -> str | None:
    """The Secret holding a RayService's Ray token (key `auth_token`), or None when its cluster
    runs without token authentication: the one named in `authOptions`, else the one KubeRay
    generates, named after the active RayCluster."""
    cluster_spec = (ray_service.get("spec") or {}).get("rayClusterConfig") or {}
    auth = cluster_spec.get("authOptions") or {}
    if not auth or auth.get("mode", "token") != "token":  # KubeRay's default mode is token
        return None
    if auth.get("secretName"):
        return str(auth["secretName"])
    return active_ray_cluster(ray_service)


@dataclass(frozen=True)
class NetworkPolicySettings:
    """Who may reach a deployment's Ray head besides its own pods: the operator's pods (the
    dashboard port only) and, on the OpenAI port, `serving_clients` (NetworkPolicy peers; empty:
    any client). Metrics ports stay open to scrapers."""

    operator_namespace: str
    operator_pod_labels: Mapping[str, str]
    serving_clients: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class RayPodSettings:
    """Operator-wide settings of the Ray pods. The sizes are Kubernetes quantities, requests and
    limits alike (Guaranteed QoS); a worker gets the per-GPU sizes times its GPUs."""

    image: str
    ray_version: str
    accelerator_resource: str = "GPU"
    """The Ray resource an expert shard takes: GPU, or a custom one (e.g. fake_gpu) that the
    workers then declare instead of GPUs."""
    network_policy: NetworkPolicySettings | None = None
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_cpu_per_gpu: str = "8"
    worker_memory_per_gpu: str = "64Gi"
    cpu_limit: bool = True
    """False: CPU requests only (Burstable), so engines on a shared dev node are not throttled
    at their request; KubeRay then gives Ray the request's CPUs."""
    worker_drain_seconds: int = 600
    """How long a deleted worker pod drains its Ray node (Serve moves its replicas first)."""


def labels(owner: Owner, component: str) -> dict[str, str]:
    """The project's labels; `serving.llama4.dev/deployment` is the /scale selector."""
    return {
        NAME_LABEL: "llama4-deployment",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        COMPONENT_LABEL: component,
        DEPLOYMENT_LABEL: owner.name,
    }


def pod_selector(owner: Owner) -> str:
    """The label selector of the deployment's Ray pods (status.selector, for /scale)."""
    return f"{DEPLOYMENT_LABEL}={owner.name}"


def _metadata(owner: Owner, name: str, component: str) -> Object:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _restricted_pod_security() -> Object:
    # Ray images run as the `ray` user (uid 1000); restricted Pod Security needs the rest.
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 100,
        "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted_container_security() -> Object:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _volumes(spec: Llama4DeploymentSpec) -> tuple[list[Object], list[Object]]:
    """Volumes and mounts every Ray container shares: shared memory for the object store,
    the model volume, the API key."""
    volumes: list[Object] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts: list[Object] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    claim = spec.model.weights.volume_claim_name
    if claim:
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT_PATH, "readOnly": True})
    secret = spec.serving.api_key_secret_ref
    if secret is not None:
        volumes.append(
            {
                "name": "api-key",
                "secret": {
                    "secretName": secret.name,
                    "items": [{"key": secret.key, "path": secret.key}],
                },
            }
        )
        mounts.append({"name": "api-key", "mountPath": API_KEY_MOUNT_DIR, "readOnly": True})
    return volumes, mounts


def _pod_template(
    owner: Owner,
    spec: Llama4DeploymentSpec,
    settings: RayPodSettings,
    *,
    container: str,
    component: str,
    resources: Object,
    ports: list[Object],
    affinity: Object | None = None,
    node_selector: dict[str, str] | None = None,
    drain_seconds: int = 0,
) -> Object:
    """`drain_seconds` > 0: the pod drains its Ray node that long when deleted (workers)."""
    volumes, mounts = _volumes(spec)
    pod: Object = {
        "securityContext": _restricted_pod_security(),
        "volumes": volumes,
        "containers": [
            {
                "name": container,
                "image": spec.engine.image or settings.image,
                # The pods run as a user the image does not know, so HOME would be `/`, which
                # is not writable: Ray Serve LLM and torch keep their caches under HOME.
                "env": [{"name": "HOME", "value": "/tmp"}],
                "resources": resources,
                "ports": ports,
                "volumeMounts": mounts,
                "securityContext": _restricted_container_security(),
            }
        ],
    }
    if drain_seconds:
        _drain_on_delete(pod, drain_seconds)
    if spec.resources.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.resources.tolerations]
    if affinity:
        pod["affinity"] = affinity
    if node_selector:
        pod["nodeSelector"] = node_selector
    # KubeRay labels its pods app.kubernetes.io/name=kuberay and selects the RayService's head
    # Service by it: the pods keep that name, not the project's.
    pod_labels = {k: v for k, v in labels(owner, component).items() if k != NAME_LABEL}
    return {"metadata": {"labels": pod_labels}, "spec": pod}


def _drain_on_delete(pod: Object, seconds: int) -> None:
    """A deleted worker pod (scale-down, node drain, upgrade) first drains its Ray node, so
    Serve moves the replicas there to other workers before they stop and no request is cut
    off; see `llama4_serving.drain` for why a preStop hook does it. The grace period covers
    the hook and Ray's own shutdown after it."""
    [container] = pod["containers"]
    container["env"].append(
        {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": str(seconds)}
    )
    container["lifecycle"] = {
        "preStop": {
            "exec": {"command": ["python3", "-m", "llama4_serving.drain", f"--timeout={seconds}"]}
        }
    }
    pod["terminationGracePeriodSeconds"] = seconds + DRAIN_GRACE_MARGIN_S


def _worker_affinity(node: str, gpu_product: str | None) -> Object:
    """Pin a worker to the node the cluster placement chose (and to the GPU product). The node
    is matched by name (`matchFields`), which needs no hostname label (simulated nodes lack it)."""
    term: Object = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
    if gpu_product:
        term["matchExpressions"] = [
            {"key": PRODUCT_LABEL, "operator": "In", "values": [gpu_product]}
        ]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }


def worker_group_name(replica: int, worker: int) -> str:
    return f"r{replica}-w{worker}"


def replica_of_worker_group(group: str) -> int | None:
    """The replica index in a worker group's name (`r<replica>-w<worker>`); None for others."""
    match = WORKER_GROUP_PATTERN.fullmatch(group)
    return int(match.group(1)) if match else None


def render_ray_service(
    owner: Owner,
    spec: Llama4DeploymentSpec,
    config: ServingConfig,
    *,
    placement: ClusterPlacement,
    gpu_product: str | None,
    settings: RayPodSettings,
    live_worker_groups: Sequence[Mapping[str, Any]] = (),
) -> Object:
    """The KubeRay RayService: head group, one worker group per placed worker, Serve config.

    Worker groups of the live RayService that the placement no longer has are kept with zero
    replicas: KubeRay scales a group in place, but treats a removed group as a new cluster."""
    head_size = {
        "cpu": _sized(settings.head_cpu, 1),
        "memory": _sized(settings.head_memory, 1),
    }
    head = _pod_template(
        owner,
        spec,
        settings,
        container="ray-head",
        component="ray-head",
        resources=_resources(settings, head_size),
        ports=[
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": 10001},
            {"name": "serve", "containerPort": SERVE_HTTP_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
            {"name": "engine-metrics", "containerPort": ENGINE_METRICS_PORT},
        ],
    )
    groups: list[Object] = []
    for replica in placement.replicas:
        for index, worker in enumerate(replica.workers):
            worker_size = {
                "cpu": _sized(settings.worker_cpu_per_gpu, worker.gpus),
                "memory": _sized(settings.worker_memory_per_gpu, worker.gpus),
                GPU_RESOURCE: str(worker.gpus),
            }
            template = _pod_template(
                owner,
                spec,
                settings,
                container="ray-worker",
                component="ray-worker",
                resources=_resources(settings, worker_size),
                ports=[
                    {"name": "metrics", "containerPort": METRICS_PORT},
                    {"name": "engine-metrics", "containerPort": ENGINE_METRICS_PORT},
                ],
                affinity=_worker_affinity(worker.node, gpu_product),
                node_selector=dict(spec.resources.node_selector),
                drain_seconds=settings.worker_drain_seconds,
            )
            groups.append(
                {
                    "groupName": worker_group_name(replica.index, index),
                    "replicas": 1,
                    # Bounds that never change: retiring a group only sets replicas to 0,
                    # which KubeRay applies in place (its cluster hash leaves replicas out).
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "rayStartParams": _worker_start_params(settings, worker.gpus),
                    "template": template,
                }
            )
    groups.extend(_retired(live_worker_groups, {g["groupName"] for g in groups}))
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(owner, owner.name, "ray-service"),
        "spec": {
            "serveConfigV2": serve_config_v2(
                config, owner.name, spec.serving.request_timeout_seconds
            ),
            "rayClusterConfig": {
                "rayVersion": settings.ray_version,
                "enableInTreeAutoscaling": False,
                # KubeRay (1.5.1+) generates the token Secret and sets it on every container.
                "authOptions": {"mode": spec.serving.ray_authentication},
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": head,
                },
                "workerGroupSpecs": groups,
            },
        },
    }


def _resources(settings: RayPodSettings, size: Mapping[str, str]) -> Object:
    """Requests = limits (Guaranteed), less the CPU limit where settings leave it out."""
    limits = {k: v for k, v in size.items() if settings.cpu_limit or k != "cpu"}
    return {"requests": dict(size), "limits": limits}


def _sized(per_unit: str, units: int) -> str:
    """`units` times the quantity `per_unit`, exactly, in canonical form ("700m" x 2: "1400m")."""
    return format_quantity(parse_quantity(per_unit) * units)


def _worker_start_params(settings: RayPodSettings, gpus: int) -> dict[str, str]:
    """`ray start` flags of a worker. With a custom accelerator resource (CPU clusters whose
    nodes advertise nvidia.com/gpu without CUDA) the worker declares that resource, N units,
    and no GPUs; the container keeps its nvidia.com/gpu limit for the scheduler's accounting.
    KubeRay passes each entry as `--key=value` and wants the resources JSON in single quotes.
    (Not the group's `resources` map: KubeRay counts any key there that ends in "gpu" as GPUs.)"""
    if settings.accelerator_resource == "GPU":
        return {"num-gpus": str(gpus)}
    resources = json.dumps({settings.accelerator_resource: gpus}, separators=(",", ":"))
    return {"num-gpus": "0", "resources": f"'{resources}'"}


def _retired(live: Sequence[Mapping[str, Any]], wanted: set[str]) -> list[Object]:
    retired = []
    for group in live:
        if group.get("groupName") in wanted:
            continue
        copy = json.loads(json.dumps(group))  # a deep copy of plain JSON
        copy["replicas"] = 0
        retired.append(copy)
    return retired


def render_network_policy(owner: Owner, policy: NetworkPolicySettings) -> Object:
    """Ingress to the Ray head: its job-submission API (the dashboard) and GCS can run code on
    the cluster, so only the deployment's own Ray pods reach every port, the operator reaches
    the dashboard, clients the OpenAI port, scrapers the metrics ports."""
    serving: Object = {"ports": [{"port": SERVE_HTTP_PORT, "protocol": "TCP"}]}
    if policy.serving_clients:
        serving["from"] = [dict(peer) for peer in policy.serving_clients]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, f"{owner.name}-ray-head", "network-policy"),
        "spec": {
            "podSelector": {
                "matchLabels": {DEPLOYMENT_LABEL: owner.name, RAY_NODE_TYPE_LABEL: "head"}
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {DEPLOYMENT_LABEL: owner.name}}}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": policy.operator_namespace
                                }
                            },
                            "podSelector": {"matchLabels": dict(policy.operator_pod_labels)},
                        }
                    ],
                    "ports": [{"port": DASHBOARD_PORT, "protocol": "TCP"}],
                },
                serving,
                {
                    "ports": [
                        {"port": METRICS_PORT, "protocol": "TCP"},
                        {"port": ENGINE_METRICS_PORT, "protocol": "TCP"},
                    ]
                },
            ],
        },
    }


def render_endpoint_service(owner: Owner, spec: Llama4DeploymentSpec) -> Object:
    """The OpenAI-compatible endpoint: the Serve proxy on the Ray head."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, "endpoint"),
        "spec": {
            "type": "ClusterIP",
            "selector": {DEPLOYMENT_LABEL: owner.name, RAY_NODE_TYPE_LABEL: "head"},
            "ports": [
                {
                    "name": "http",
                    "port": spec.serving.port,
                    "targetPort": SERVE_HTTP_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def render_metrics_service(owner: Owner) -> Object:
    """Headless Service over every Ray pod, for the ServiceMonitor."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, f"{owner.name}-metrics", "metrics"),
        "spec": {
            "clusterIP": "None",
            "selector": {DEPLOYMENT_LABEL: owner.name},
            "ports": [
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
                {
                    "name": "engine-metrics",
                    "port": ENGINE_METRICS_PORT,
                    "targetPort": ENGINE_METRICS_PORT,
                },
            ],
        },
    }


def expert_config_map_name(owner: Owner) -> str:
    return f"{owner.name}-expert-placement"


def render_expert_placement(owner: Owner, placement: ExpertPlacement | None) -> Object:
    """The operator's expert placement (phy2log per MoE layer), for people and tools to read;
    reconcile reads it back as the plan to keep, and the rebalance loop writes its new plans
    here. The reference engine runs it; vLLM places its own (status.placement.expertBalancer)."""
    document = placement.model_dump(mode="json") if placement is not None else None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, expert_config_map_name(owner), "expert-placement"),
        "data": {EXPERT_PLACEMENT_KEY: json.dumps(document, separators=(",", ":"))},
    }


def render_service_monitor(owner: Owner, spec: Llama4DeploymentSpec) -> Object:
    """A prometheus-operator ServiceMonitor over the metrics Service."""
    metadata = _metadata(owner, owner.name, "metrics")
    metadata["labels"] = {**spec.monitoring.labels, **metadata["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {DEPLOYMENT_LABEL: owner.name, COMPONENT_LABEL: "metrics"}},
            "endpoints": [
                {
                    "port": port,
                    "interval": spec.monitoring.scrape_interval,
                    # Key the series by the resource, as the recording rules expect.
                    "relabelings": [
                        {"targetLabel": DEPLOYMENT_SERIES_LABEL, "replacement": owner.name}
                    ],
                }
                for port in ("metrics", "engine-metrics")
            ],
        },
    }


def external_route_prefix(owner: Owner) -> str:
    """Route of the application on a shared external Ray cluster: one per resource."""
    return f"/{owner.namespace}/{owner.name}"


def external_app_name(owner: Owner) -> str:
    return f"{owner.namespace}-{owner.name}"


def render_external_endpoint(
    owner: Owner, dashboard_url: str, serve_port: int = SERVE_HTTP_PORT
) -> list[Object]:
    """The endpoint Service for an external Ray cluster: an ExternalName for a host name, or a
    selector-less Service with an EndpointSlice for an IP address. Ports are Serve's
    (`serve_port`, its HTTP proxy's). None for a loopback address (a Ray cluster on the
    operator's own machine): pods cannot reach it, and the API server refuses such endpoints."""
    host = urlsplit(dashboard_url).hostname or ""
    metadata = _metadata(owner, owner.name, "endpoint")
    port = {"name": "http", "port": serve_port, "protocol": "TCP"}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            return []
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata,
                "spec": {"type": "ExternalName", "externalName": host, "ports": [port]},
            }
        ]
    if address.is_loopback:
        return []
    slice_metadata = _metadata(owner, f"{owner.name}-external", "endpoint")
    slice_metadata["labels"]["kubernetes.io/service-name"] = owner.name
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata,
            "spec": {"type": "ClusterIP", "ports": [{**port, "targetPort": serve_port}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": slice_metadata,
            "addressType": "IPv6" if address.version == 6 else "IPv4",
            "ports": [port],
            "endpoints": [{"addresses": [str(address)]}],
        },
    ]


def endpoint_url(
    owner: Owner,
    spec: Llama4DeploymentSpec,
    external_dashboard: str | None = None,
    external_serve_port: int = SERVE_HTTP_PORT,
) -> str:
    """The OpenAI base URL: the endpoint Service inside the cluster, or, for an external Ray
    cluster, its Serve proxy on the dashboard's host."""
    if external_dashboard:
        host = urlsplit(external_dashboard).hostname or ""
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{external_serve_port}{external_route_prefix(owner)}/v1"
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.serving.port}/v1"


def render_children(
    owner: Owner,
    spec: Llama4DeploymentSpec,
    config: ServingConfig,
    *,
    placement: ClusterPlacement,
    experts: ExpertPlacement | None,
    gpu_product: str | None,
    settings: RayPodSettings,
    external_dashboard: str | None = None,
    external_serve_port: int = SERVE_HTTP_PORT,
    service_monitor: bool = False,
    live_worker_groups: Sequence[Mapping[str, Any]] = (),
) -> list[Object]:
    """Every desired child, in apply order (the RayService last: it references nothing, but it
    is the expensive one, so the cheap objects are in place first)."""
    children: list[Object] = [render_expert_placement(owner, experts)]
    if external_dashboard:
        children.extend(render_external_endpoint(owner, external_dashboard, external_serve_port))
    else:
        children.append(render_endpoint_service(owner, spec))
        children.append(render_metrics_service(owner))
        if service_monitor:
            children.append(render_service_monitor(owner, spec))
        if settings.network_policy is not None:
            children.append(render_network_policy(owner, settings.network_policy))
        children.append(
            render_ray_service(
                owner,
                spec,
                config,
                placement=placement,
                gpu_product=gpu_product,
                settings=settings,
                live_worker_groups=live_worker_groups,
            )
        )
    return children

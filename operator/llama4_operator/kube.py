"""The one module that talks to the Kubernetes API.

Everything goes through the `kubernetes` client's DynamicClient (plain dicts in and out), in a
worker thread (`asyncio.to_thread`) so Kopf's event loop never blocks. Writes are server-side
applies under one field manager, with force: the operator owns what it renders (two exceptions,
each explained where it is done: a merge patch when a hand edit made the apply invalid, and worker
group replicas copied onto a RayService's RayClusters, which KubeRay does not do). Each call retries
transient failures briefly (tenacity); what is still failing is mapped once, here, to Kopf's
errors: `TemporaryError` (conflicts, throttling, server errors, connection trouble, missing RBAC:
retried later with a delay) or `PermanentError` (a request the API server will never accept).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import kopf
import urllib3.exceptions
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from llama4_operator.api.models import GROUP, KIND, PLURAL, VERSION
from llama4_operator.planners.cluster_placement import GpuNode, NodeTaint
from llama4_operator.planners.gpu_products import GPU_RESOURCE, MEMORY_LABEL, PRODUCT_LABEL
from llama4_operator.renderers.children import DEPLOYMENT_LABEL, Owner

Object = dict[str, Any]
T = TypeVar("T")

# The kubernetes client has no type annotations; these aliases keep strict mypy honest about it.
_kube_config: Any = config
_DynamicClient: Any = DynamicClient

FIELD_MANAGER = "llama4-operator"
SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"
# Kinds the operator creates, for pruning what is no longer desired.
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("ray.io/v1", "RayService"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)
ZONE_LABEL = "topology.kubernetes.io/zone"
NODE_POOL_LABEL = "llama4.dev/node-pool"
NVLINK_LABEL = "llama4.dev/nvlink-domain"
TEMPORARY_DELAY_S = 10.0
# How long a list of Nodes serves placement before it is listed again.
NODE_LIST_TTL_S = 5.0
PERMISSION_DELAY_S = 60.0
_TRANSIENT_STATUSES = frozenset({409, 429})


class KubeApi(Protocol):
    """What the handlers need from the cluster (a fake implements it in unit tests)."""

    async def apply(self, obj: Object) -> Object: ...

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> Object | None: ...

    async def prune_children(
        self, namespace: str, owner: str, owner_uid: str, keep: Collection[tuple[str, str]]
    ) -> list[str]: ...

    async def gpu_nodes(self, owner_namespace: str, owner: str) -> list[GpuNode]: ...

    async def crd_exists(self, name: str) -> bool: ...

    async def patch_status(self, namespace: str, name: str, status: Object) -> None: ...

    async def scale(self, namespace: str, name: str, replicas: int) -> None: ...

    def post_event(self, about: Owner, type_: str, reason: str, message: str) -> None: ...


def _status_of(error: BaseException) -> int | None:
    if isinstance(error, ApiException | DynamicApiError):
        status = getattr(error, "status", None)
        return int(status) if status is not None else None
    return None


def _is_transient(error: BaseException) -> bool:
    status = _status_of(error)
    if status is not None:
        return status in _TRANSIENT_STATUSES or status >= 500
    return isinstance(error, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def to_kopf_error(error: BaseException, what: str) -> Exception:
    """Map a client error to TemporaryError (retry later) or PermanentError (never works)."""
    status = _status_of(error)
    summary = getattr(error, "summary", None)
    detail = summary() if callable(summary) else str(error)
    message = f"{what}: {detail}"
    if _is_transient(error):
        return kopf.TemporaryError(message, delay=TEMPORARY_DELAY_S)
    if status in (401, 403):
        return kopf.TemporaryError(
            f"{message} (check the operator's RBAC)", delay=PERMISSION_DELAY_S
        )
    if status is not None and 400 <= status < 500:
        return kopf.PermanentError(message)
    return kopf.TemporaryError(message, delay=TEMPORARY_DELAY_S)


_retry_transient = retry(
    retry=retry_if_exception(_is_transient),
    stop=stop_after_attempt(3),
    wait=wait_exponential(multiplier=0.5, max=4),
    reraise=True,
)


async def _call(what: str, function: Callable[[], T]) -> T:
    """Run a blocking client call in a thread, retrying transient errors, mapping the rest."""
    try:
        return await asyncio.to_thread(_retry_transient(function))
    except (kopf.PermanentError, kopf.TemporaryError):
        raise
    except (ApiException, DynamicApiError, urllib3.exceptions.HTTPError, OSError) as error:
        raise to_kopf_error(error, what) from error


def gpu_node_from(node: Mapping[str, Any], gpus_used_elsewhere: int) -> GpuNode | None:
    """A placement-planner node from a Node object; None when it has no allocatable GPU."""
    metadata = node.get("metadata") or {}
    node_labels: Mapping[str, str] = metadata.get("labels") or {}
    status = node.get("status") or {}
    allocatable = int(str((status.get("allocatable") or {}).get(GPU_RESOURCE, "0")) or 0)
    if allocatable <= 0:
        return None
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    try:
        memory_mib = int(node_labels.get(MEMORY_LABEL, "0"))
    except ValueError:
        memory_mib = 0
    return GpuNode(
        name=str(metadata.get("name", "")),
        gpu_product=node_labels.get(PRODUCT_LABEL, ""),
        gpu_memory_mib=memory_mib,
        allocatable_gpus=allocatable,
        used_gpus=gpus_used_elsewhere,
        zone=node_labels.get(ZONE_LABEL, ""),
        node_pool=node_labels.get(NODE_POOL_LABEL, ""),
        nvlink_domain=node_labels.get(NVLINK_LABEL, ""),
        schedulable=ready and not (node.get("spec") or {}).get("unschedulable", False),
        labels=tuple(sorted(node_labels.items())),
        taints=tuple(
            NodeTaint(
                key=str(t.get("key", "")),
                value=str(t.get("value") or ""),
                effect=str(t.get("effect", "")),
            )
            for t in (node.get("spec") or {}).get("taints") or []
        ),
    )


def gpus_requested(pod: Mapping[str, Any]) -> int:
    """GPUs a pod holds: the larger of its containers' sum and its largest init container."""

    def gpus(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        value = (resources.get("limits") or {}).get(GPU_RESOURCE) or (
            resources.get("requests") or {}
        ).get(GPU_RESOURCE)
        return int(str(value)) if value else 0

    spec = pod.get("spec") or {}
    regular = sum(gpus(c) for c in spec.get("containers") or [])
    init = max((gpus(c) for c in spec.get("initContainers") or []), default=0)
    return max(regular, init)


def gpus_used_by_others(
    pods: Sequence[Mapping[str, Any]],
    deployments: Sequence[Mapping[str, Any]],
    owner_namespace: str,
    owner: str,
) -> dict[str, int]:
    """GPUs per node that this deployment cannot have: those of running pods that are not ours,
    and those other Llama4Deployments have placed (their status) but whose pods may not exist
    yet; for another deployment the larger of its placement and its bound pods counts."""
    other_pods: dict[str, int] = {}
    claimed: dict[tuple[str, str], dict[str, int]] = {}  # (namespace, deployment) -> node -> gpus
    for pod in pods:
        metadata = pod.get("metadata") or {}
        node = (pod.get("spec") or {}).get("nodeName")
        if not node or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        namespace = str(metadata.get("namespace", ""))
        deployment = (metadata.get("labels") or {}).get(DEPLOYMENT_LABEL)
        if deployment is None:
            other_pods[node] = other_pods.get(node, 0) + gpus_requested(pod)
        elif (namespace, deployment) != (owner_namespace, owner):
            per_node = claimed.setdefault((namespace, deployment), {})
            per_node[node] = per_node.get(node, 0) + gpus_requested(pod)
    for deployment in deployments:
        metadata = deployment.get("metadata") or {}
        key = (str(metadata.get("namespace", "")), str(metadata.get("name", "")))
        if key == (owner_namespace, owner):
            continue
        placement = (deployment.get("status") or {}).get("placement") or {}
        reserved: dict[str, int] = {}
        for replica in placement.get("replicas") or []:
            for worker in replica.get("workers") or []:
                node = str(worker.get("node", ""))
                reserved[node] = reserved.get(node, 0) + int(worker.get("gpus", 0))
        per_node = claimed.setdefault(key, {})
        for node, gpus in reserved.items():
            per_node[node] = max(per_node.get(node, 0), gpus)
    used = dict(other_pods)
    for per_node in claimed.values():
        for node, gpus in per_node.items():
            used[node] = used.get(node, 0) + gpus
    return used


def owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    """Whether `obj` names the Llama4Deployment with this uid as an owner (objects that merely
    copy our labels, such as the EndpointSlices of our Services, do not)."""
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in references)


class KubeConfigError(ValueError):
    """No usable Kubernetes credentials."""


def load_client_config(kubeconfig: str | None) -> None:
    """Configure the client: an explicit kubeconfig first, else in-cluster, else the default
    kubeconfig. (The client reads $KUBECONFIG once, at import, so a path set later must be
    passed explicitly.)"""
    try:
        if kubeconfig:
            _kube_config.load_kube_config(config_file=kubeconfig)
            return
        try:
            _kube_config.load_incluster_config()
        except config.ConfigException:
            _kube_config.load_kube_config()
    except (config.ConfigException, OSError) as error:
        where = kubeconfig or "in-cluster service account or ~/.kube/config"
        raise KubeConfigError(
            f"cannot load Kubernetes credentials from {where}: {error}; pass --kubeconfig"
        ) from error


def kopf_connection(kubeconfig: str | None, trust_env: bool) -> kopf.ConnectionInfo:
    """Kopf's credentials, taken from the configured client so both talk to the same server."""
    try:
        load_client_config(kubeconfig)
    except KubeConfigError as error:
        raise kopf.LoginError(str(error)) from error
    settings: Any = client.Configuration.get_default_copy()
    # Newer clients keep the bearer token under BearerToken, older ones under authorization.
    header = settings.get_api_key_with_prefix("BearerToken") or settings.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=settings.host,
        ca_path=settings.ssl_ca_cert,
        insecure=not settings.verify_ssl,
        username=settings.username or None,
        password=settings.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=settings.cert_file,
        private_key_path=settings.key_file,
        trust_env=trust_env,
    )


class Kube:
    """The real cluster, through the DynamicClient."""

    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api_client = api_client
        self._dynamic: Any = None
        self._clock = clock
        self._nodes: tuple[float, list[GpuNode]] | None = None  # (listed at, nodes)

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None) -> Kube:
        """The explicit kubeconfig, else in-cluster config, else the default kubeconfig."""
        load_client_config(kubeconfig)
        return cls(client.ApiClient())

    def _client(self) -> Any:
        if self._dynamic is None:
            self._dynamic = _DynamicClient(self._api_client or client.ApiClient())
        return self._dynamic

    def _resource(self, api_version: str, kind: str) -> Any:
        return self._client().resources.get(api_version=api_version, kind=kind)

    async def apply(self, obj: Object) -> Object:
        metadata = obj["metadata"]
        what = f"apply {obj['kind']} {metadata.get('namespace', '')}/{metadata['name']}"

        def run() -> Object:
            resource = self._resource(obj["apiVersion"], obj["kind"])
            try:
                result = self._server_side_apply(resource, obj)
            except DynamicApiError as error:
                if error.status != 422 or "spec" not in obj:
                    raise
                # A hand edit can make the merged object invalid: a Service port changed by
                # hand is a new list entry (ports are keyed by port), and ours would join it
                # with a duplicate name. Replace the spec's lists with ours, then apply again.
                self._client().patch(
                    resource,
                    name=metadata["name"],
                    namespace=metadata.get("namespace"),
                    body={"spec": obj["spec"]},
                    content_type="application/merge-patch+json",
                    field_manager=FIELD_MANAGER,
                )
                result = self._server_side_apply(resource, obj)
            if obj["kind"] == "RayService":
                self._scale_ray_clusters(obj)
            return dict(result.to_dict())

        return await _call(what, run)

    def _server_side_apply(self, resource: Any, obj: Object) -> Any:
        return self._client().server_side_apply(
            resource,
            body=obj,
            namespace=obj["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )

    def _scale_ray_clusters(self, ray_service: Object) -> None:
        """Carry worker-group replicas to the RayService's RayClusters. KubeRay (1.5) leaves
        replicas out of the spec hash it compares, so a change of replicas alone (a retired
        replica's group set to 0) never reaches the cluster and its pods keep their GPUs."""
        metadata = ray_service["metadata"]
        wanted = {
            group["groupName"]: group["replicas"]
            for group in ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        }
        resource = self._resource("ray.io/v1", "RayCluster")
        clusters = self._client().get(
            resource,
            namespace=metadata["namespace"],
            label_selector=(
                "ray.io/originated-from-crd=RayService,"
                f"ray.io/originated-from-cr-name={metadata['name']}"
            ),
        )
        for cluster in clusters.to_dict().get("items", []):
            operations: list[Object] = []
            for index, group in enumerate(cluster["spec"].get("workerGroupSpecs") or []):
                name = group.get("groupName")
                if name in wanted and group.get("replicas") != wanted[name]:
                    path = f"/spec/workerGroupSpecs/{index}"
                    operations += [
                        {"op": "test", "path": f"{path}/groupName", "value": name},
                        {"op": "replace", "path": f"{path}/replicas", "value": wanted[name]},
                    ]
            if not operations:
                continue
            try:
                self._client().patch(
                    resource,
                    name=cluster["metadata"]["name"],
                    namespace=metadata["namespace"],
                    body=operations,
                    content_type="application/json-patch+json",
                    field_manager=FIELD_MANAGER,
                )
            except DynamicApiError as error:
                if error.status != 422:  # a failed `test`: the groups moved; next resync
                    raise

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Object | None:
        def run() -> Object | None:
            try:
                resource = self._resource(api_version, kind)
            except ResourceNotFoundError:
                return None  # the kind is not installed
            try:
                return dict(self._client().get(resource, name=name, namespace=namespace).to_dict())
            except DynamicApiError as error:
                if error.status == 404:
                    return None
                raise

        return await _call(f"get {kind} {namespace}/{name}", run)

    async def prune_children(
        self, namespace: str, owner: str, owner_uid: str, keep: Collection[tuple[str, str]]
    ) -> list[str]:
        """Delete this owner's children whose (kind, name) is not in `keep`; returns them."""

        def run() -> list[str]:
            deleted: list[str] = []
            for api_version, kind in CHILD_KINDS:
                try:
                    resource = self._resource(api_version, kind)
                except ResourceNotFoundError:
                    continue
                items = self._client().get(
                    resource, namespace=namespace, label_selector=f"{DEPLOYMENT_LABEL}={owner}"
                )
                for item in items.to_dict().get("items", []):
                    name = item["metadata"]["name"]
                    if (kind, name) in keep or not owned_by(item, owner_uid):
                        continue
                    try:
                        self._client().delete(resource, name=name, namespace=namespace)
                    except DynamicApiError as error:
                        if error.status != 404:
                            raise
                    deleted.append(f"{kind}/{name}")
            return deleted

        return await _call(f"prune children of {namespace}/{owner}", run)

    def _list_items(self, api_version: str, kind: str, **query: Any) -> list[dict[str, Any]]:
        """Every object of a kind, cluster-wide, as plain JSON (blocking). The dynamic client's
        ResourceInstance wrapping costs more than the request on a list of 1,000 nodes."""
        response = self._client().get(self._resource(api_version, kind), serialize=False, **query)
        items: list[dict[str, Any]] = json.loads(response.data).get("items") or []
        return items

    def _gpu_nodes_unused(self) -> list[GpuNode]:
        """Every Node with GPUs, none counted as used; listed again once NODE_LIST_TTL_S has
        passed (blocking). On 1,000 nodes the list is most of a reconciliation's time, and nodes
        change far less often than once per reconciliation; what the other deployments use is
        read fresh each time. Only the planner's view of each node is kept, not the Nodes."""
        now = self._clock()
        if self._nodes is None or now - self._nodes[0] >= NODE_LIST_TTL_S:
            found = (gpu_node_from(n, 0) for n in self._list_items("v1", "Node"))
            self._nodes = (now, [n for n in found if n is not None])
        return self._nodes[1]

    async def gpu_nodes(self, owner_namespace: str, owner: str) -> list[GpuNode]:
        nodes, pods, deployments = await asyncio.gather(
            _call("list nodes", self._gpu_nodes_unused),
            _call(
                "list pods",
                lambda: self._list_items("v1", "Pod", field_selector="spec.nodeName!="),
            ),
            _call("list Llama4Deployments", lambda: self._list_items(f"{GROUP}/{VERSION}", KIND)),
        )
        used = gpus_used_by_others(pods, deployments, owner_namespace, owner)
        return [dataclasses.replace(n, used_gpus=used.get(n.name, 0)) for n in nodes]

    async def crd_exists(self, name: str) -> bool:
        def run() -> bool:
            api = client.ApiextensionsV1Api(self._api_client)
            try:
                api.read_custom_resource_definition(name)
            except ApiException as error:
                if error.status == 404:
                    return False
                raise
            return True

        return await _call(f"read CRD {name}", run)

    async def patch_status(self, namespace: str, name: str, status: Object) -> None:
        def run() -> None:
            api = client.CustomObjectsApi(self._api_client)
            api.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )

        await _call(f"patch status of {namespace}/{name}", run)

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set spec.replicas through the /scale subresource (what `kubectl scale` does)."""

        def run() -> None:
            api = client.CustomObjectsApi(self._api_client)
            api.patch_namespaced_custom_object_scale(
                GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": replicas}}
            )

        await _call(f"scale {namespace}/{name} to {replicas} replicas", run)

    def post_event(self, about: Owner, type_: str, reason: str, message: str) -> None:
        """An event about a Llama4Deployment. Kopf queues it and posts it from its own task,
        with its own retries; it needs only what refers to the object."""
        reference = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": about.name, "namespace": about.namespace, "uid": about.uid},
        }
        kopf.event(cast(Any, reference), type=type_, reason=reason, message=message[:1024])

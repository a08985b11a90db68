"""The unit tests' shared fakes. `FakeKube`: the one in-memory fake of the kube access layer
(`llama4_operator.kube.KubeApi`) that the unit tests hand to the reconciler, the autoscaler and
the rebalance loop. It keeps objects keyed by (kind, namespace, name) with server-side-apply
semantics, and records every write the code under test makes, so tests assert on what was
applied, patched, scaled and posted. `typed` turns a test's Llama4Deployment document into the
typed object the handlers take. `FakeServingSource`: the serving metrics the autoscaler and the
rebalance loop read."""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from llama4_operator.api.models import KIND
from llama4_operator.handlers.resource import Llama4Deployment
from llama4_operator.kube import CHILD_KINDS, Object, owned_by
from llama4_operator.planners.cluster_placement import GpuNode
from llama4_operator.planners.serving_snapshot import ServingSnapshot
from llama4_operator.renderers.children import DEPLOYMENT_LABEL, Owner
from llama4_operator.serving_metrics import DeploymentTarget

if TYPE_CHECKING:
    from llama4_operator.kube import KubeApi

ObjectKey = tuple[str, str, str]
"""(kind, namespace, name) of a stored object."""

_CHILD_KINDS = frozenset(kind for _, kind in CHILD_KINDS)


class Event(NamedTuple):
    """A Kubernetes Event the code under test posted (compares equal to a plain 3-tuple)."""

    type: str
    reason: str
    message: str


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """RFC 7386, as the API server applies a status merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = json.loads(json.dumps(value))


class FakeKube:
    """An in-memory stand-in for `llama4_operator.kube.Kube`.

    nodes: what `gpu_nodes` answers. deployment: the Llama4Deployment the code under test
    reconciles, when a test wants its status patches (and scales) merged into it as the API
    server would; without it they are only recorded. crds: the installed CRDs, by name.
    """

    def __init__(
        self,
        nodes: Sequence[GpuNode] = (),
        *,
        deployment: Object | None = None,
        crds: Iterable[str] = (),
    ) -> None:
        self.nodes: list[GpuNode] = list(nodes)
        self.deployment: Object | None = deployment
        self.crds: set[str] = set(crds)
        self.objects: dict[ObjectKey, Object] = {}
        """Every applied object as stored (a copy), status included once a test writes one."""
        self.applied: list[str] = []
        """'Kind/name' of each apply, in order."""
        self.statuses: list[Object] = []
        """The status of each `patch_status`, as passed, in order."""
        self.scales: list[int] = []
        """The replicas of each `scale`, in order."""
        self.events: list[Event] = []
        """Each posted event, in order."""
        self.fail_with: Exception | None = None
        """Raised by `apply` (a refused or failing write) while set."""

    def _held(self, namespace: str, name: str) -> Object | None:
        """The held deployment when it is namespace/name."""
        metadata = (self.deployment or {}).get("metadata") or {}
        if (metadata.get("namespace"), metadata.get("name")) == (namespace, name):
            return self.deployment
        return None

    async def apply(self, obj: Object) -> Object:
        if self.fail_with is not None:
            raise self.fail_with
        metadata = obj["metadata"]
        key = (obj["kind"], metadata.get("namespace", ""), metadata["name"])
        previous = self.objects.get(key, {})
        # Like server-side apply of an object with a status subresource: status is kept, and
        # the generation goes up when the spec changes.
        generation = previous.get("metadata", {}).get("generation", 0)
        if previous.get("spec") != obj.get("spec"):
            generation += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["generation"] = generation
        if "status" in previous:
            stored["status"] = previous["status"]
        self.objects[key] = stored
        self.applied.append(f"{obj['kind']}/{metadata['name']}")
        return copy.deepcopy(stored)

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> Object | None:
        found = (
            self._held(namespace, name)
            if kind == KIND
            else self.objects.get((kind, namespace, name))
        )
        return copy.deepcopy(found) if found is not None else None

    async def prune_children(
        self, namespace: str, owner: str, owner_uid: str, keep: Collection[tuple[str, str]]
    ) -> list[str]:
        """Like `Kube.prune_children`: the owner's children (its label, its uid among their
        owners) of the kinds the operator creates whose (kind, name) is not in `keep`."""
        gone = [
            key
            for key, obj in self.objects.items()
            if key[0] in _CHILD_KINDS
            and key[1] == namespace
            and ((obj.get("metadata") or {}).get("labels") or {}).get(DEPLOYMENT_LABEL) == owner
            and owned_by(obj, owner_uid)
            and (key[0], key[2]) not in keep
        ]
        for key in gone:
            del self.objects[key]
        return [f"{kind}/{name}" for kind, _, name in gone]

    async def gpu_nodes(self, owner_namespace: str, owner: str) -> list[GpuNode]:
        return list(self.nodes)

    async def crd_exists(self, name: str) -> bool:
        return name in self.crds

    async def patch_status(self, namespace: str, name: str, status: Object) -> None:
        self.statuses.append(status)
        held = self._held(namespace, name)
        if held is not None:
            merge_patch(held.setdefault("status", {}), status)

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.scales.append(replicas)
        held = self._held(namespace, name)
        if held is not None:
            held.setdefault("spec", {})["replicas"] = replicas

    def post_event(self, about: Owner, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))


def typed(body: Mapping[str, Any]) -> Llama4Deployment:
    """A test's Llama4Deployment document as the Kopf handlers hand it on (uid and generation
    filled in where the document has none)."""
    metadata = {"uid": "uid-1", "generation": 1, **body["metadata"]}
    return Llama4Deployment.from_body({**body, "metadata": metadata})


if TYPE_CHECKING:
    # The fake implements the whole Protocol: a change to KubeApi breaks type-checking here.
    _conforms: KubeApi = FakeKube()


class FakeServingSource:
    """The one fake of `llama4_operator.serving_metrics.ServingMetricsSource`: hands out the
    snapshots it was given (an exception in the script is raised instead), one per call, and
    records what was asked."""

    description = "fake"

    def __init__(self) -> None:
        self.script: list[ServingSnapshot | Exception] = []
        self.targets: list[DeploymentTarget] = []
        self.routed: set[bool] = set()
        self.waiting: list[int | Exception] = []
        """Answers of the ingress' queue, one per call (none left: nothing waits)."""
        self.queue_reads = 0

    @property
    def reads(self) -> int:
        return len(self.targets)

    async def snapshot(self, target: DeploymentTarget, *, routed: bool = True) -> ServingSnapshot:
        self.targets.append(target)
        self.routed.add(routed)
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def waiting_requests(self, target: DeploymentTarget) -> int:
        self.queue_reads += 1
        item = self.waiting.pop(0) if self.waiting else 0
        if isinstance(item, Exception):
            raise item
        return item

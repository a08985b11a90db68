"""Fixtures of the reliability tier: a control plane of its own (its API server is restarted and
its operators killed, which must not disturb the other tiers' shared cluster), with the
Llama4Deployment, KubeRay and Kopf peering CRDs installed but no KubeRay operator: the tests
check the operator's own objects, and no pods are needed for that."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_api import Api

from llama4_operator.devenv import tools as devtools
from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster
from llama4_operator.devenv.nodes import NodePool
from support import CRD, REPO, Kubectl, OperatorProcess

PEERING_CRDS = sorted((REPO / "helm" / "llama4-operator" / "crds").glob("kopf.dev_*.yaml"))
# Four 8 x H100 nodes: room for two Maverick FP8 replicas (8 GPUs each) and a few Scouts.
NODES = 4


@pytest.fixture(scope="session")
def chaos_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        ClusterConfig(
            name="pytest-reliability",
            pools=(NodePool(count=NODES),),
            kuberay=False,
            state_dir=tmp_path_factory.mktemp("reliability-cluster"),
        )
    )
    with cluster:
        kuberay = devtools.ensure_tools(["kuberay"])["kuberay"]
        crds = [CRD, *PEERING_CRDS, *sorted((kuberay.home / "crds").glob("*.yaml"))]
        kubectl = Kubectl(cluster.kubeconfig)
        for crd in crds:
            kubectl.run("apply", "--server-side", "-f", str(crd))
        cluster.wait_established(["llama4deployments.serving.llama4.dev", "rayservices.ray.io"])
        yield cluster


@pytest.fixture(scope="session")
def api(chaos_cluster: LocalCluster) -> Api:
    return Api(chaos_cluster.api_client())


@pytest.fixture(scope="session")
def kubectl(chaos_cluster: LocalCluster) -> Kubectl:
    return Kubectl(chaos_cluster.kubeconfig)


@pytest.fixture
def namespace(api: Api) -> Iterator[str]:
    with api.scratch_namespace("rel") as name:
        yield name


@pytest.fixture
def operator(chaos_cluster: LocalCluster, tmp_path: Path) -> Iterator[OperatorProcess]:
    """One operator per test (tests kill it and start others beside it)."""
    running = OperatorProcess(chaos_cluster.kubeconfig, tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()

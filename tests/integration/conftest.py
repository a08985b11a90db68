"""Fixtures for the operator on the real local control plane: the pinned kubectl, the CRD applied
with it, and the operator running as a real process (`llama4ctl operator`)."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from llama4_operator.devenv.cluster import LocalCluster
from support import CRD, Kubectl, OperatorProcess


@pytest.fixture(scope="session")
def kubectl(local_cluster: LocalCluster) -> Kubectl:
    return Kubectl(local_cluster.kubeconfig)


@pytest.fixture(scope="session")
def operator(
    local_cluster: LocalCluster, kubectl: Kubectl, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    kubectl.run("apply", "--server-side", "-f", str(CRD))
    local_cluster.wait_established(["llama4deployments.serving.llama4.dev"])
    running = OperatorProcess(local_cluster.kubeconfig, tmp_path_factory.mktemp("operator"))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        if running.process and running.process.returncode not in (0, -signal.SIGTERM, None):
            print(running.log()[-5000:])

"""Shared fixtures. The real local control plane is started once per test session, lazily: only
tests that ask for `local_cluster` (integration and e2e tiers) start it. If a component cannot be
built or started, the fixture raises and every test that needs it errors loudly: nothing skips."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster
from llama4_operator.devenv.nodes import NodePool

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Ray clusters tests start are loopback-only and unauthenticated, whatever the machine holds:
# Ray turns token authentication on by itself when ~/.ray/auth_token exists.
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """16 simulated 8-GPU H100 nodes, KubeRay running; torn down at the end of the session."""
    state_dir: Path = tmp_path_factory.mktemp("cluster")
    cluster = LocalCluster(
        ClusterConfig(name="pytest", pools=(NodePool(count=16),), kuberay=True, state_dir=state_dir)
    )
    with cluster:
        yield cluster

"""`llama4ctl dev cluster` as a user runs it: a 1,000-node cluster from the command line, used
with the pinned kubectl, then stopped with nothing left running."""

from __future__ import annotations

import uuid

import pytest

from llama4_operator.devenv.cluster import ClusterConfig, LocalCluster, port_is_bound
from support import llama4ctl

pytestmark = pytest.mark.cluster


def test_thousand_node_cluster_from_the_cli() -> None:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    up = llama4ctl("dev", "cluster", "up", "--name", name, "--pool", "h100:1000x8", "--no-kuberay")
    assert up.returncode == 0, up.stderr
    assert "1000 simulated GPU nodes Ready" in up.stderr
    cluster = LocalCluster(ClusterConfig(name=name))
    ports = dict(cluster.ports)
    try:
        listed = llama4ctl("dev", "kubectl", "--name", name, "get", "nodes", "--no-headers")
        assert listed.returncode == 0, listed.stderr
        statuses = [line.split()[1] for line in listed.stdout.splitlines()]
        assert statuses == ["Ready"] * 1000
        status = llama4ctl("dev", "cluster", "status", "--name", name)
        assert status.returncode == 0, status.stderr
        assert "kube-apiserver" in status.stderr
    finally:
        down = llama4ctl("dev", "cluster", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert not [port for port in ports.values() if port_is_bound(port)]
    gone = llama4ctl("dev", "cluster", "status", "--name", name)
    assert gone.returncode != 0
    assert "is not running" in gone.stderr


def test_cluster_up_names_a_malformed_pool() -> None:
    result = llama4ctl("dev", "cluster", "up", "--name", "never", "--pool", "h100:lots")
    assert result.returncode == 2
    assert "--pool" in result.stderr
    assert "GPU:COUNTxGPUS" in result.stderr

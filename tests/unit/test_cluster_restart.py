"""`LocalCluster.restart_component` on real (tiny) processes: the recorded command runs again,
the old process group is gone, and `down` stops the new one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llama4_operator.devenv.cluster import ClusterConfig, ClusterError, Component, LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> LocalCluster:
    made = LocalCluster(ClusterConfig(name="unit", state_dir=tmp_path / "state"))
    (made.directory / "logs").mkdir(parents=True)
    return made


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until reaped: read its state.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_restart_runs_the_same_command_again(cluster: LocalCluster) -> None:
    cluster.start_component(Component("sleeper", ["sleep", "300"], {"MARK": "1"}), lambda: True)
    first = cluster.running_processes()["sleeper"]
    cluster.restart_component("sleeper", ready=lambda: True)
    second = cluster.running_processes()["sleeper"]
    assert second != first
    assert not _alive(first)
    assert Path(f"/proc/{second}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"300"]
    assert b"MARK=1" in Path(f"/proc/{second}/environ").read_bytes().split(b"\0")
    cluster.down()
    assert not _alive(second)


def test_restart_of_an_unknown_component_names_it(cluster: LocalCluster) -> None:
    with pytest.raises(ClusterError, match="kube-apiserver is not a running component"):
        cluster.restart_component("kube-apiserver", ready=lambda: True)

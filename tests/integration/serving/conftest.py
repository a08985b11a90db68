"""Fixtures of the serving integration tests: one real local Ray cluster running the app,
shared by every test here and stopped once the last of them has run (not at the end of the
session), so that its idle engines leave the cores and memory to the real-node tests after."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from serving_cluster import ServingCluster, running_serving_cluster

HERE = Path(__file__).resolve().parent
_cluster_stack = contextlib.ExitStack()
_running: list[ServingCluster] = []  # the one running cluster, once started


@pytest.fixture(scope="module")
def serving_cluster(tmp_path_factory: pytest.TempPathFactory) -> ServingCluster:
    if not _running:
        model_dir = tmp_path_factory.mktemp("tiny-llama4")
        _running.append(_cluster_stack.enter_context(running_serving_cluster(model_dir)))
    return _running[0]


def _stop_cluster() -> None:
    _running.clear()
    _cluster_stack.close()


@pytest.hookimpl(trylast=True)  # after the fixtures' own teardown
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if nextitem is None or HERE not in nextitem.path.resolve().parents:
        _stop_cluster()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _stop_cluster()  # an interrupted run

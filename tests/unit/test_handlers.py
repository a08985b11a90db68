"""The reconciliation against a fake of the kube module (no cluster): children, status, events,
fit failures, invalid specs, honest health, external-Ray mode and the Kopf settings."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import kopf
import pytest
import yaml
from click.testing import CliRunner

from fake_kube import FakeKube, typed
from llama4_operator import metrics
from llama4_operator.cli.operator_main import operator_command
from llama4_operator.handlers.config import (
    ENV_ACCELERATOR,
    ENV_RAY_HEAD_CPU,
    ENV_RAY_HEAD_MEMORY,
    ENV_RAY_WORKER_CPU_PER_GPU,
    ENV_RAY_WORKER_MEMORY_PER_GPU,
    ConfigError,
    OperatorConfig,
)
from llama4_operator.handlers.reconcile import Reconciler
from llama4_operator.handlers.status import RayWorkerPod
from llama4_operator.planners.cluster_placement import GpuNode
from llama4_operator.ray_dashboard import RayAuthenticationError, RayDashboard
from llama4_operator.renderers.children import RayPodSettings
from llama4_serving.config import rendered_replicas

ROOT = Path(__file__).resolve().parents[2]
LOG = logging.getLogger("test")
CONFIG = OperatorConfig(image="llama4-serving:test", ray_version="2.60.0")
START = datetime(2026, 1, 1, tzinfo=UTC)


def h100_hosts(count: int, gpus: int = 8) -> list[GpuNode]:
    return [GpuNode(f"gpu-{i}", "NVIDIA-H100-80GB-HBM3", 81559, gpus) for i in range(count)]


def body(sample: str, status: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "manifests" / "samples" / f"{sample}.yaml").read_text())
    document["spec"].update(changes)
    document["metadata"].update({"namespace": "llm", "uid": f"uid-{sample}", "generation": 3})
    document["status"] = status or {}
    return dict(document)


def run(
    reconciler: Reconciler, obj: dict[str, Any], workers: list[RayWorkerPod] | None = None
) -> None:
    asyncio.run(reconciler.reconcile(typed(obj), LOG, workers))


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_reconcile_applies_children_and_reports_honest_status() -> None:
    kube = FakeKube(h100_hosts(2))
    run(Reconciler(kube, CONFIG, clock=lambda: START), body("maverick"))
    assert sorted(kube.applied) == [
        "ConfigMap/maverick-expert-placement",
        "RayService/maverick",
        "Service/maverick",
        "Service/maverick-metrics",
    ]  # no ServiceMonitor: its CRD is not installed
    (status,) = kube.statuses
    found = conditions(status)
    assert found["Fits"]["status"] == "True"
    # Nothing says the Serve application runs, so Ready stays False with the reason.
    assert found["Ready"]["status"] == "False"
    assert found["Ready"]["reason"] == "ServeApplicationNotHealthy"
    assert found["Progressing"]["status"] == "True"
    assert found["Degraded"]["status"] == "False"
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert status["observedGeneration"] == 3
    assert status["replicas"] == 1
    assert status["readyReplicas"] == 0
    assert status["selector"] == "serving.llama4.dev/deployment=maverick"
    assert status["endpoint"] == "http://maverick.llm.svc:8000/v1"
    assert status["fit"]["gpusPerReplica"] == 8
    assert status["placement"]["replicas"][0]["workers"][0]["gpus"] == 8
    assert ("Warning", "ServeApplicationNotHealthy") in {(t, r) for t, r, _ in kube.events}


def test_ready_only_when_the_ray_service_says_running() -> None:
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    run(reconciler, body("maverick"))
    assert conditions(kube.statuses[-1])["Ready"]["status"] == "False"
    # What KubeRay writes once the Serve application is healthy.
    kube.objects[("RayService", "llm", "maverick")]["status"] = {
        "activeServiceStatus": {"applicationStatuses": {"maverick": {"status": "RUNNING"}}}
    }
    run(reconciler, body("maverick", status=kube.statuses[-1]))
    found = conditions(kube.statuses[-1])
    assert found["Ready"]["status"] == "True"
    assert found["Ready"]["reason"] == "ServeApplicationRunning"
    assert found["Progressing"]["status"] == "False"
    assert kube.statuses[-1]["readyReplicas"] == 1
    sample = metrics.REGISTRY.get_sample_value
    labels = {"namespace": "llm", "name": "maverick"}
    assert sample("llama4_operator_ready_replicas", labels) == 1
    assert sample("llama4_operator_gpus", labels) == 8
    metrics.forget("llm", "maverick")
    assert sample("llama4_operator_gpus", labels) is None


def _ray_service_scaling(kube: FakeKube, llm_server_status: str) -> None:
    """What KubeRay writes while Serve changes the engine deployment: Serve reports a change of
    `num_replicas` as an application DEPLOYING with the deployment UPSCALING."""
    kube.objects[("RayService", "llm", "maverick")]["status"] = {
        "activeServiceStatus": {
            "applicationStatuses": {
                "maverick": {
                    "status": "DEPLOYING",
                    "serveDeploymentStatuses": {
                        "OpenAIIngress": {"status": "HEALTHY"},
                        "LLMServer": {"status": llm_server_status},
                    },
                }
            }
        }
    }


def test_a_scale_up_keeps_the_deployment_ready_on_the_replicas_already_up() -> None:
    kube = FakeKube(h100_hosts(2))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    run(reconciler, body("maverick"))
    kube.objects[("RayService", "llm", "maverick")]["status"] = {
        "activeServiceStatus": {"applicationStatuses": {"maverick": {"status": "RUNNING"}}}
    }
    run(reconciler, body("maverick", status=kube.statuses[-1]))
    assert kube.statuses[-1]["readyReplicas"] == 1
    events_before = len(kube.events)

    _ray_service_scaling(kube, "UPSCALING")
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2))
    status = kube.statuses[-1]
    found = conditions(status)
    assert found["Ready"]["status"] == "True"
    assert found["Ready"]["reason"] == "ServingWhileDeploying"
    assert "LLMServer UPSCALING" in found["Ready"]["message"]
    assert (
        found["Ready"]["lastTransitionTime"]
        == conditions(kube.statuses[-2])["Ready"]["lastTransitionTime"]
    )
    assert found["Progressing"]["status"] == "True"
    assert (status["replicas"], status["readyReplicas"]) == (2, 1)  # the new one is starting
    new_events = kube.events[events_before:]
    assert not [e for e in new_events if e[0] == "Warning"], new_events


def test_a_scale_up_kuberay_has_not_read_yet_counts_only_the_replicas_already_up() -> None:
    # Right after the operator writes num_replicas 2, the RayService still says RUNNING (the
    # old config's); its observedGeneration shows KubeRay has not read the change.
    kube = FakeKube(h100_hosts(2))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    run(reconciler, body("maverick"))
    ray_service = kube.objects[("RayService", "llm", "maverick")]
    healthy = {"status": "HEALTHY"}
    ray_service["status"] = {
        "observedGeneration": 1,
        "activeServiceStatus": {
            "applicationStatuses": {
                "maverick": {
                    "status": "RUNNING",
                    "serveDeploymentStatuses": {"OpenAIIngress": healthy, "LLMServer": healthy},
                }
            }
        },
    }
    run(reconciler, body("maverick", status=kube.statuses[-1]))
    assert kube.statuses[-1]["readyReplicas"] == 1

    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2))
    ray_service = kube.objects[("RayService", "llm", "maverick")]
    assert ray_service["metadata"]["generation"] == 2
    status = kube.statuses[-1]
    found = conditions(status)
    assert (status["replicas"], status["readyReplicas"]) == (2, 1)
    assert found["Ready"]["status"] == "True"
    assert "has not applied generation 2" in found["Ready"]["message"]
    assert found["Progressing"]["status"] == "True"

    ray_service["status"]["observedGeneration"] = 2  # read, and Serve reports both running
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2))
    assert kube.statuses[-1]["readyReplicas"] == 2


def unreachable_head(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("no route to host", request=request)


def _maverick_running(replicas: int) -> tuple[FakeKube, Reconciler]:
    """Maverick reconciled once, its RayService RUNNING as KubeRay reports it, and a head that
    does not answer (KubeRay's view and the pod index decide)."""
    kube = FakeKube(h100_hosts(2))
    reconciler = Reconciler(
        kube, CONFIG, clock=lambda: START, head_transport=httpx.MockTransport(unreachable_head)
    )
    run(reconciler, body("maverick", replicas=replicas))
    kube.objects[("RayService", "llm", "maverick")]["status"] = {
        "activeServiceStatus": {"applicationStatuses": {"maverick": {"status": "RUNNING"}}}
    }
    return kube, reconciler


def test_a_lost_ray_worker_pod_degrades_the_deployment_until_kuberay_replaces_it() -> None:
    # Serve (through KubeRay) still says RUNNING for a minute after a worker pod is killed;
    # the operator's pod index shows the loss at once. The head does not answer: KubeRay's
    # view and the pods decide.
    kube, reconciler = _maverick_running(2)
    both = [RayWorkerPod("w-0", "r0-w0", ready=True), RayWorkerPod("w-1", "r1-w0", ready=True)]
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2), both)
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Degraded"]["status"]) == ("True", "False")
    assert kube.statuses[-1]["readyReplicas"] == 2

    # Replica 1's pod is gone and its replacement not Ready yet: one replica serves.
    replacing = [both[0], RayWorkerPod("w-1-new", "r1-w0", ready=False)]
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2), replacing)
    status = kube.statuses[-1]
    found = conditions(status)
    assert status["readyReplicas"] == 1
    assert found["Ready"]["status"] == "True"
    assert (found["Degraded"]["status"], found["Degraded"]["reason"]) == ("True", "RayWorkerLost")
    assert (
        "replica 1: worker group r1-w0 has no Ready pod (w-1-new not Ready)"
        in (found["Degraded"]["message"])
    )
    assert found["Progressing"]["status"] == "True"
    assert ("Warning", "RayWorkerLost") in {(t, r) for t, r, _ in kube.events}

    # Every replica's worker lost: not ready.
    run(reconciler, body("maverick", status=status, replicas=2), [])
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "RayWorkerLost")
    assert kube.statuses[-1]["readyReplicas"] == 0

    # Replaced: back to Ready with both, not degraded.
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2), both)
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Degraded"]["status"]) == ("True", "False")
    assert kube.statuses[-1]["readyReplicas"] == 2


def _serve_target(kube: FakeKube) -> int:
    ray_service = kube.objects[("RayService", "llm", "maverick")]
    (app,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    return rendered_replicas(app["deployments"][0])


def test_a_scale_down_lowers_serves_target_once_the_retired_worker_pod_is_deleted() -> None:
    kube, reconciler = _maverick_running(2)
    kept = RayWorkerPod("w-0", "r0-w0", ready=True)
    retired = RayWorkerPod("w-1", "r1-w0", ready=True)
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=1), [kept, retired])
    assert _serve_target(kube) == 2  # replica 1's pod still runs: KubeRay has yet to delete it
    assert kube.statuses[-1]["replicas"] == 1
    deleted = RayWorkerPod("w-1", "r1-w0", ready=True, terminating=True)
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=1), [kept, deleted])
    assert _serve_target(kube) == 1  # draining: Serve stops the replica there first
    # While KubeRay moves to a new cluster (which has no group r1-w0), nothing is held.
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2), [kept, retired])
    kube.objects[("RayService", "llm", "maverick")]["status"]["pendingServiceStatus"] = {
        "rayClusterName": "maverick-raycluster-new"
    }
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=1), [kept, retired])
    assert _serve_target(kube) == 1


def test_the_worker_pod_of_a_replica_being_added_is_starting_not_lost() -> None:
    kube, reconciler = _maverick_running(1)
    first = RayWorkerPod("w-0", "r0-w0", ready=True)
    run(reconciler, body("maverick", status=kube.statuses[-1]), [first])
    assert kube.statuses[-1]["readyReplicas"] == 1

    events_before = len(kube.events)
    _ray_service_scaling(kube, "UPSCALING")
    starting = RayWorkerPod("w-1", "r1-w0", ready=False)
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=2), [first, starting])
    status = kube.statuses[-1]
    found = conditions(status)
    assert status["readyReplicas"] == 1
    assert found["Ready"]["status"] == "True"
    assert (found["Degraded"]["status"], found["Degraded"]["reason"]) == ("False", "AsExpected")
    assert found["Progressing"]["status"] == "True"
    new_events = kube.events[events_before:]
    assert not [e for e in new_events if e[0] == "Warning"], new_events


class FakeHead:
    """A RayService's head as the operator reads it: Serve's details of the tiny app, whose
    engine replicas run on the given Ray node IPs, behind KubeRay's token."""

    def __init__(self, token: str | None) -> None:
        self.token = token  # None: no authentication
        self.engines: list[tuple[str, str]] = []  # (state, node IP)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        expected = None if self.token is None else f"Bearer {self.token}"
        if request.headers.get("Authorization") != expected:
            return httpx.Response(401, text="Unauthorized")
        replicas = [
            {"replica_id": f"r{i}", "state": state, "node_ip": ip}
            for i, (state, ip) in enumerate(self.engines)
        ]
        return httpx.Response(
            200,
            json={
                "applications": {
                    "tiny": {
                        "status": "RUNNING",
                        "deployments": {
                            "OpenAIIngress": {"status": "HEALTHY", "replicas": []},
                            "LLMServer:tiny": {"status": "HEALTHY", "replicas": replicas},
                        },
                    }
                }
            },
        )


def _running_ray_service(kube: FakeKube) -> None:
    """What KubeRay writes once the tiny app is healthy, and its cluster's token Secret."""
    ray_service = kube.objects[("RayService", "llm", "tiny")]
    ray_service["status"] = {
        "activeServiceStatus": {
            "rayClusterName": "tiny-raycluster-x7k2p",
            "applicationStatuses": {"tiny": {"status": "RUNNING"}},
        }
    }
    kube.objects[("Secret", "llm", "tiny-raycluster-x7k2p")] = {
        "data": {"auth_token": base64.b64encode(b"s3cret").decode()}
    }


def _again(kube: FakeKube, reconciler: Reconciler, workers: list[RayWorkerPod]) -> None:
    """Reconcile the tiny sample once more, from the status last written, with `workers`."""
    run(reconciler, body("tiny-vllm", status=kube.statuses[-1]), workers)


def _tiny_running_behind(head: FakeHead) -> tuple[FakeKube, Reconciler]:
    """The tiny vLLM sample reconciled once, then reported RUNNING by KubeRay, its Ray head
    answering as `head` does."""
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(
        kube, CONFIG, clock=lambda: START, head_transport=httpx.MockTransport(head)
    )
    run(reconciler, body("tiny-vllm"))
    _running_ray_service(kube)
    return kube, reconciler


def test_ready_waits_for_the_engine_on_a_replaced_worker_pod_to_run() -> None:
    # After a worker pod is lost, KubeRay reports the application RUNNING while Serve still
    # lists the old engine replica RUNNING on the dead pod, then STARTING on the new one while
    # vLLM builds its engine: only an engine RUNNING on a Ready pod serves.
    head = FakeHead("s3cret")
    kube, reconciler = _tiny_running_behind(head)
    old_pod = RayWorkerPod("w-old", "r0-w0", ready=True, ip="10.244.0.7")
    head.engines = [("RUNNING", "10.244.0.7")]
    _again(kube, reconciler, [old_pod])
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == (
        "True",
        "ServeApplicationRunning",
    )
    assert str(head.requests[-1].url) == (
        "http://tiny-raycluster-x7k2p-head-svc.llm.svc:8265/api/serve/applications/"
    )

    _again(kube, reconciler, [])  # the pod is gone
    assert conditions(kube.statuses[-1])["Degraded"]["reason"] == "RayWorkerLost"

    new_pod = RayWorkerPod("w-new", "r0-w0", ready=True, ip="10.244.0.9")
    for engines in ([("RUNNING", "10.244.0.7")], [("STARTING", "10.244.0.9")]):
        head.engines = engines
        _again(kube, reconciler, [new_pod])
        status = kube.statuses[-1]
        found = conditions(status)
        assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "RayWorkerLost")
        assert found["Ready"]["message"] == (
            "0 of 1 engine replicas running; Serve is starting the others"
        )
        assert found["Degraded"]["status"] == "True"
        assert status["readyReplicas"] == 0

    head.engines = [("RUNNING", "10.244.0.9")]
    _again(kube, reconciler, [new_pod])
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Degraded"]["status"]) == ("True", "False")
    assert kube.statuses[-1]["readyReplicas"] == 1


def test_a_lost_worker_is_degraded_while_serve_reports_the_application_deploying() -> None:
    # Serve notices the dead replica and reports the application DEPLOYING; with no engine
    # left on a live pod that is not serving, and the loss must still be said.
    head = FakeHead("s3cret")
    kube, reconciler = _tiny_running_behind(head)
    pod = RayWorkerPod("w", "r0-w0", ready=True, ip="10.244.0.7")
    head.engines = [("RUNNING", "10.244.0.7")]
    _again(kube, reconciler, [pod])
    assert kube.statuses[-1]["readyReplicas"] == 1
    kube.objects[("RayService", "llm", "tiny")]["status"]["activeServiceStatus"][
        "applicationStatuses"
    ]["tiny"]["status"] = "DEPLOYING"
    replacement = RayWorkerPod("w-new", "r0-w0", ready=False, ip="10.244.0.9")
    _again(kube, reconciler, [replacement])
    found = conditions(kube.statuses[-1])
    assert (found["Degraded"]["status"], found["Degraded"]["reason"]) == ("True", "RayWorkerLost")
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "RayWorkerLost")


def test_a_replica_on_a_draining_worker_serves_until_its_replacement_runs() -> None:
    # A worker pod deleted by a scale-down or a node drain drains its Ray node: Serve keeps the
    # replica there (PENDING_MIGRATION) serving while a replacement starts on another worker.
    head = FakeHead("s3cret")
    kube, reconciler = _tiny_running_behind(head)
    draining = RayWorkerPod("w-old", "r1-w0", ready=True, ip="10.244.0.7")
    kept = RayWorkerPod("w", "r0-w0", ready=True, ip="10.244.0.9")
    head.engines = [("PENDING_MIGRATION", "10.244.0.7"), ("STARTING", "10.244.0.9")]
    _again(kube, reconciler, [kept, draining])
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Degraded"]["status"]) == ("True", "False")
    assert kube.statuses[-1]["readyReplicas"] == 1
    # Once the draining pod has stopped, only the replacement counts, and it is still starting.
    head.engines = [("STOPPING", "10.244.0.7"), ("STARTING", "10.244.0.9")]
    _again(kube, reconciler, [kept])
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "EngineStarting")


def test_an_engine_restarting_without_a_lost_pod_is_starting_not_degraded() -> None:
    head = FakeHead("s3cret")
    kube, reconciler = _tiny_running_behind(head)
    head.engines = [("STARTING", "10.244.0.7")]
    pod = RayWorkerPod("w", "r0-w0", ready=True, ip="10.244.0.7")
    _again(kube, reconciler, [pod])
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("False", "EngineStarting")
    assert (found["Progressing"]["status"], found["Degraded"]["status"]) == ("True", "False")


def test_a_head_that_refuses_or_does_not_answer_leaves_kuberays_view() -> None:
    head = FakeHead("another token")  # refuses the Secret's
    kube, reconciler = _tiny_running_behind(head)
    pod = RayWorkerPod("w", "r0-w0", ready=True, ip="10.244.0.7")
    _again(kube, reconciler, [pod])
    assert head.requests, "the head was asked"
    assert conditions(kube.statuses[-1])["Ready"]["status"] == "True"
    del kube.objects[("Secret", "llm", "tiny-raycluster-x7k2p")]
    _again(kube, reconciler, [pod])
    assert conditions(kube.statuses[-1])["Ready"]["status"] == "True"


def test_the_head_is_read_without_a_token_when_authentication_is_disabled() -> None:
    def without_authentication(status: dict[str, Any] | None = None) -> dict[str, Any]:
        document = body("tiny-vllm", status)
        document["spec"].setdefault("serving", {})["rayAuthentication"] = "disabled"
        return document

    head = FakeHead(None)
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(
        kube, CONFIG, clock=lambda: START, head_transport=httpx.MockTransport(head)
    )
    run(reconciler, without_authentication())
    _running_ray_service(kube)
    head.engines = [("STARTING", "10.244.0.7")]
    pod = RayWorkerPod("w", "r0-w0", ready=True, ip="10.244.0.7")
    run(reconciler, without_authentication(kube.statuses[-1]), [pod])
    assert head.requests, "the head was asked"
    assert conditions(kube.statuses[-1])["Ready"]["reason"] == "EngineStarting"


def test_a_configuration_update_is_not_ready_when_the_host_gives_no_replica_counts() -> None:
    # UPDATING may replace every replica (new code or args), and KubeRay does not say how many
    # are up, so readiness is not claimed.
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    run(reconciler, body("maverick"))
    _ray_service_scaling(kube, "UPDATING")
    run(reconciler, body("maverick", status={**kube.statuses[-1], "readyReplicas": 1}))
    found = conditions(kube.statuses[-1])
    assert found["Ready"]["status"] == "False"
    assert "LLMServer UPDATING" in found["Ready"]["message"]
    assert kube.statuses[-1]["readyReplicas"] == 0


def _external_details(status: str, llm_server_states: list[str]) -> dict[str, Any]:
    """Ray Serve's REST details for the tiny app, with its replicas' states."""

    def deployment(states: list[str]) -> dict[str, Any]:
        return {
            "status": "HEALTHY" if set(states) == {"RUNNING"} else "UPSCALING",
            "replicas": [{"replica_id": f"r{i}", "state": s} for i, s in enumerate(states)],
        }

    return {
        "applications": {
            "llm-tiny": {
                "status": status,
                "message": "",
                "deployments": {
                    "OpenAIIngress": deployment(["RUNNING"]),
                    "LLMServer": deployment(llm_server_states),
                },
            }
        }
    }


@pytest.mark.parametrize(
    ("app_status", "llm_server_states", "ready", "ready_replicas"),
    [
        ("RUNNING", ["RUNNING", "RUNNING"], "True", 2),
        ("DEPLOYING", ["RUNNING", "STARTING"], "True", 1),  # scaling up: one answers
        ("DEPLOYING", ["STARTING", "STARTING"], "False", 0),  # first start: none answers yet
        ("UNHEALTHY", ["RUNNING", "RUNNING"], "False", 0),
    ],
)
def test_external_ray_mode_counts_the_engine_replicas_that_run(
    app_status: str, llm_server_states: list[str], ready: str, ready_replicas: int
) -> None:
    details = _external_details(app_status, llm_server_states)

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=details if request.method == "GET" else {})

    dashboard = RayDashboard("http://10.0.0.5:8265", transport=httpx.MockTransport(handle))
    config = OperatorConfig(
        image="img", ray_version="2.60.0", external_ray_dashboard="http://10.0.0.5:8265"
    )
    kube = FakeKube(h100_hosts(2))
    reconciler = Reconciler(kube, config, dashboard, clock=lambda: START)
    run(reconciler, body("tiny-reference", replicas=2))
    status = kube.statuses[-1]
    assert conditions(status)["Ready"]["status"] == ready
    assert status["readyReplicas"] == ready_replicas


def test_unchanged_conditions_keep_their_time_and_post_no_new_events() -> None:
    kube = FakeKube(h100_hosts(1))
    clock = iter([START, START + timedelta(minutes=5)])
    reconciler = Reconciler(kube, CONFIG, clock=lambda: next(clock))
    run(reconciler, body("maverick"))
    events_after_first = len(kube.events)
    run(reconciler, body("maverick", status=kube.statuses[-1]))
    first, second = (conditions(s) for s in kube.statuses)
    assert second["Fits"]["lastTransitionTime"] == first["Fits"]["lastTransitionTime"]
    assert len(kube.events) == events_after_first


def test_model_that_does_not_fit_gets_no_children_and_a_warning() -> None:
    kube = FakeKube(h100_hosts(1, gpus=4))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    fit_failures = metrics.FIT_FAILURES._value.get()
    bf16 = body("maverick")
    bf16["spec"]["model"]["quantization"] = "bf16"
    run(reconciler, bf16)
    assert kube.applied == []
    found = conditions(kube.statuses[-1])
    assert found["Fits"]["status"] == "False"
    assert "the cluster has 4 x H100 80GB" in found["Fits"]["message"]
    assert found["Ready"]["status"] == "False"
    assert kube.statuses[-1]["placement"] is None
    assert kube.statuses[-1]["endpoint"] == ""
    warnings = [m for t, r, m in kube.events if t == "Warning" and r == "DoesNotFit"]
    assert any("model.quantization: int4" in m for m in warnings)
    assert metrics.FIT_FAILURES._value.get() == fit_failures + 1


def test_spec_changed_to_impossible_removes_existing_children() -> None:
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    run(reconciler, body("maverick"))
    assert kube.objects
    impossible = body("maverick", status=kube.statuses[-1])
    impossible["spec"]["model"]["quantization"] = "bf16"
    run(reconciler, impossible)
    assert kube.objects == {}
    assert any(r == "ChildrenRemoved" for _, r, _ in kube.events)


def test_invalid_spec_is_a_permanent_error_reported_in_status() -> None:
    kube = FakeKube(h100_hosts(1))
    bad = body("maverick", autoscaling={"minReplicas": 5, "maxReplicas": 2})
    with pytest.raises(kopf.PermanentError, match=r"spec\.autoscaling"):
        run(Reconciler(kube, CONFIG, clock=lambda: START), bad)
    assert kube.applied == []
    found = conditions(kube.statuses[-1])
    assert found["Ready"]["reason"] == "InvalidSpec"
    assert "minReplicas (5) must not exceed" in found["Degraded"]["message"]


def test_temporary_api_errors_propagate_and_are_counted() -> None:
    kube = FakeKube(h100_hosts(1))
    kube.fail_with = kopf.TemporaryError("409 conflict", delay=1)
    errors = metrics.RECONCILE_ERRORS.labels(kind="temporary")._value.get()
    with pytest.raises(kopf.TemporaryError):
        run(Reconciler(kube, CONFIG, clock=lambda: START), body("maverick"))
    assert metrics.RECONCILE_ERRORS.labels(kind="temporary")._value.get() == errors + 1


def test_a_child_the_api_server_refuses_is_reported_in_status() -> None:
    kube = FakeKube(h100_hosts(1))
    kube.fail_with = kopf.PermanentError("apply Service llm/maverick: 422 Invalid")
    with pytest.raises(kopf.PermanentError):
        run(Reconciler(kube, CONFIG, clock=lambda: START), body("maverick"))
    found = conditions(kube.statuses[-1])
    assert found["Ready"]["reason"] == "ApplyFailed"
    assert "422 Invalid" in found["Degraded"]["message"]
    assert found["Fits"]["status"] == "True"


def test_scaling_down_keeps_the_removed_worker_group_at_zero() -> None:
    kube = FakeKube(h100_hosts(2))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    run(reconciler, body("maverick", replicas=2))
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=1))
    ray_service = kube.objects[("RayService", "llm", "maverick")]
    groups = {
        g["groupName"]: g["replicas"]
        for g in ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    # KubeRay scales a group in place but would treat a vanished group as a new cluster.
    assert groups == {"r0-w0": 1, "r1-w0": 0}
    assert kube.statuses[-1]["replicas"] == 1


def test_replicas_without_room_mark_degraded() -> None:
    kube = FakeKube(h100_hosts(1))
    run(Reconciler(kube, CONFIG, clock=lambda: START), body("maverick", replicas=2))
    found = conditions(kube.statuses[-1])
    assert found["Degraded"]["status"] == "True"
    assert found["Degraded"]["reason"] == "InsufficientFreeGPUs"
    assert kube.statuses[-1]["replicas"] == 1


def test_a_recovery_from_degraded_is_not_announced_as_a_degradation() -> None:
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(kube, CONFIG, clock=lambda: START)
    run(reconciler, body("maverick", replicas=2))
    kube.events.clear()
    run(reconciler, body("maverick", status=kube.statuses[-1], replicas=1))
    assert conditions(kube.statuses[-1])["Degraded"]["status"] == "False"
    assert ("Normal", "AsExpected", "not Degraded: every replica is placed") in kube.events
    assert not [e for e in kube.events if e.message.startswith("Degraded:") and e.type == "Normal"]


def test_the_reconciler_writes_its_part_of_the_status_and_leaves_the_others() -> None:
    theirs = {
        "tokensPerSecond": 12.5,
        "autoscaling": {"managesReplicas": True, "desiredReplicas": 1},
        "placement": {"rebalanceMessage": "balance 0.920 is at or above 0.800", "rebalances": 2},
    }
    document = body("maverick", status=json.loads(json.dumps(theirs)))
    kube = FakeKube(h100_hosts(1), deployment=document)
    run(Reconciler(kube, CONFIG, clock=lambda: START), document)
    (patch,) = kube.statuses
    assert not {"tokensPerSecond", "autoscaling"} & patch.keys()
    assert not {"rebalanceMessage", "rebalances", "measuredBalance"} & patch["placement"].keys()
    status = document["status"]
    assert status["tokensPerSecond"] == theirs["tokensPerSecond"]
    assert status["autoscaling"] == theirs["autoscaling"]
    assert status["placement"]["rebalanceMessage"] == "balance 0.920 is at or above 0.800"
    assert status["placement"]["rebalances"] == 2
    assert status["placement"]["expertPlanVersion"] == patch["placement"]["expertPlanVersion"]


def test_external_ray_mode_puts_the_app_and_keeps_the_others() -> None:
    requests: list[httpx.Request] = []
    other_app = {"name": "someone-else", "import_path": "x:y", "route_prefix": "/x"}

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.method == "GET":
            return httpx.Response(
                200,
                json={
                    "applications": {
                        "someone-else": {"status": "RUNNING", "deployed_app_config": other_app},
                        "llm-tiny": {"status": "DEPLOYING", "message": "starting replicas"},
                    }
                },
            )
        return httpx.Response(200, json={})

    dashboard = RayDashboard("http://10.0.0.5:8265", transport=httpx.MockTransport(handle))
    config = OperatorConfig(
        image="img", ray_version="2.60.0", external_ray_dashboard="http://10.0.0.5:8265"
    )
    kube = FakeKube(h100_hosts(1))
    run(Reconciler(kube, config, dashboard, clock=lambda: START), body("tiny-reference"))
    puts = [r for r in requests if r.method == "PUT"]
    assert [str(r.url) for r in puts] == ["http://10.0.0.5:8265/api/serve/applications/"]
    apps = json.loads(puts[0].content)["applications"]
    assert [a["name"] for a in apps] == ["someone-else", "llm-tiny"]
    assert apps[1]["import_path"] == "llama4_serving.app:build_app"
    assert apps[1]["route_prefix"] == "/llm/tiny"
    assert "RayService/tiny" not in kube.applied
    found = conditions(kube.statuses[-1])
    assert found["Ready"]["status"] == "False"
    assert "DEPLOYING: starting replicas" in found["Ready"]["message"]
    assert kube.statuses[-1]["endpoint"] == "http://10.0.0.5:8000/llm/tiny/v1"


def test_scaled_to_zero_in_external_mode_the_app_stays_and_status_says_a_request_wakes_it() -> None:
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.method == "GET":
            return httpx.Response(200, json={"applications": {}})
        return httpx.Response(200, json={})

    dashboard = RayDashboard("http://10.0.0.5:8265", transport=httpx.MockTransport(handle))
    config = OperatorConfig(
        image="img", ray_version="2.60.0", external_ray_dashboard="http://10.0.0.5:8265"
    )
    kube = FakeKube(h100_hosts(1))
    sleepy = {"enabled": True, "minReplicas": 0}
    reconciler = Reconciler(kube, config, dashboard, clock=lambda: START)
    run(reconciler, body("tiny-reference", replicas=0, autoscaling=sleepy))
    (put,) = [r for r in requests if r.method == "PUT"]
    (app,) = json.loads(put.content)["applications"]
    (engine,) = (d for d in app["deployments"] if d["name"] == "LLMServer")
    assert engine["autoscaling_config"]["initial_replicas"] == 0
    found = conditions(kube.statuses[-1])
    assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("True", "ScaledToZero")
    assert "the next request starts a replica" in found["Ready"]["message"]
    assert kube.statuses[-1]["endpoint"] == "http://10.0.0.5:8000/llm/tiny/v1"
    # At zero without an autoscaler to wake it, the application is removed.
    requests.clear()
    run(reconciler, body("tiny-reference", replicas=0))
    assert not [r for r in requests if r.method == "PUT" and "llm-tiny" in r.content.decode()]
    assert conditions(kube.statuses[-1])["Ready"]["reason"] == "NoReplicas"


def test_external_ray_mode_puts_nothing_when_the_app_is_already_declared() -> None:
    # A PUT restarts a Serve build in progress, so the resync must not repeat an identical one.
    declared: dict[str, Any] = {}
    methods: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        methods.append(request.method)
        if request.method == "PUT":
            for app in json.loads(request.content)["applications"]:
                declared[app["name"]] = app
            return httpx.Response(200, json={})
        apps = {
            name: {"status": "DEPLOYING", "deployed_app_config": app}
            for name, app in declared.items()
        }
        return httpx.Response(200, json={"applications": apps})

    dashboard = RayDashboard("http://ray.example:8265", transport=httpx.MockTransport(handle))
    config = OperatorConfig(
        image="img", ray_version="2.60.0", external_ray_dashboard="http://ray.example:8265"
    )
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(kube, config, dashboard, clock=lambda: START)
    run(reconciler, body("tiny-reference"))
    run(reconciler, body("tiny-reference", status=kube.statuses[-1]))
    assert methods.count("PUT") == 1
    changed = body("tiny-reference", status=kube.statuses[-1])
    changed["spec"]["model"]["maxContextLength"] = 512
    run(reconciler, changed)
    assert methods.count("PUT") == 2


def test_a_failed_serve_application_is_its_own_condition_and_warning() -> None:
    failure = (
        "Deploying application llm-tiny failed with exception:\nTraceback (most recent call "
        'last):\n  File "app.py", line 9, in build_app\n    raise ValueError(...)\n'
        "ValueError: engine.extraArgs: vLLM 0.32.0 takes no engine argument named nope\n"
    )
    # Each reconcile reads the details twice (for the deploy, then for health).
    statuses = iter(["DEPLOYING", "DEPLOYING", "DEPLOY_FAILED", "DEPLOY_FAILED"])

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(200, json={})
        status = next(statuses)
        message = failure if status == "DEPLOY_FAILED" else ""
        app = {"status": status, "message": message}
        return httpx.Response(200, json={"applications": {"llm-tiny": app}})

    dashboard = RayDashboard("http://ray.example:8265", transport=httpx.MockTransport(handle))
    config = OperatorConfig(
        image="img", ray_version="2.60.0", external_ray_dashboard="http://ray.example:8265"
    )
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(kube, config, dashboard, clock=lambda: START)
    run(reconciler, body("tiny-reference"))
    assert conditions(kube.statuses[-1])["Ready"]["reason"] == "ServeApplicationNotHealthy"
    run(reconciler, body("tiny-reference", status=kube.statuses[-1]))
    found = conditions(kube.statuses[-1])
    expected = (
        "Serve application status DEPLOY_FAILED: Deploying application llm-tiny failed with "
        "exception: ValueError: engine.extraArgs: vLLM 0.32.0 takes no engine argument named "
        "nope (traceback in Ray's Serve logs)"
    )
    assert found["Ready"] | {"lastTransitionTime": None, "observedGeneration": None} == {
        "type": "Ready",
        "status": "False",
        "reason": "ServeApplicationFailed",
        "message": expected,
        "lastTransitionTime": None,
        "observedGeneration": None,
    }
    assert found["Progressing"]["status"] == "False"
    assert found["Degraded"]["status"] == "True"
    assert ("Warning", "ServeApplicationFailed", f"Ready: {expected}") in kube.events


def test_external_ray_mode_sends_the_token_of_its_file_and_reads_it_on_each_call(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json={"applications": {}})

    dashboard = RayDashboard(
        "http://ray.example:8265", transport=httpx.MockTransport(handle), token_file=str(token_file)
    )
    asyncio.run(dashboard.application("llm-tiny"))
    token_file.write_text("rotated")
    asyncio.run(dashboard.application("llm-tiny"))
    assert seen == ["Bearer first", "Bearer rotated"]


def test_a_refused_ray_token_is_a_condition_and_a_slow_retry(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong")
    methods: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        methods.append(request.method)
        return httpx.Response(401, text="Unauthorized: Invalid authentication token")

    dashboard = RayDashboard(
        "http://ray.example:8265", transport=httpx.MockTransport(handle), token_file=str(token_file)
    )
    config = OperatorConfig(
        image="img", ray_version="2.60.0", external_ray_dashboard="http://ray.example:8265"
    )
    kube = FakeKube(h100_hosts(1))
    reconciler = Reconciler(kube, config, dashboard, clock=lambda: START)
    with pytest.raises(RayAuthenticationError) as raised:
        run(reconciler, body("tiny-reference"))
    assert raised.value.delay == 60.0  # not the 15 s of an unreachable dashboard
    assert methods == ["GET"]  # nothing is PUT with a refused token
    found = conditions(kube.statuses[-1])
    assert found["Ready"]["status"] == "False"
    assert found["Ready"]["reason"] == "RayAuthenticationFailed"
    message = found["Ready"]["message"]
    assert f"refused the token from {token_file} (401" in message
    assert "--ray-auth-token-file" in message
    assert ("Warning", "RayAuthenticationFailed") in [(e[0], e[1]) for e in kube.events]


def test_kopf_settings_use_the_project_names() -> None:
    from llama4_operator.handlers import kopf_handlers as handlers

    settings = kopf.OperatorSettings()
    handlers.configure_settings(settings, CONFIG)
    assert settings.persistence.finalizer == "serving.llama4.dev/finalizer"
    progress = settings.persistence.progress_storage
    assert isinstance(progress, kopf.AnnotationsProgressStorage)
    assert progress.prefix == "serving.llama4.dev"
    assert settings.peering.standalone is True
    assert settings.watching.server_timeout == 300
    assert settings.background.cancellation_polling == 1


def test_operator_help_lists_its_options() -> None:
    result = CliRunner().invoke(operator_command, ["--help"])
    assert result.exit_code == 0
    for option in (
        "--namespace",
        "--all-namespaces",
        "--metrics-port",
        "--external-ray-dashboard",
        "--kubeconfig",
        "--ray-head-cpu",
        "--ray-head-memory",
        "--ray-worker-cpu-per-gpu",
        "--ray-worker-memory-per-gpu",
    ):
        assert option in result.output
    assert "small dev nodes" in result.output


def test_operator_refuses_conflicting_namespace_flags() -> None:
    result = CliRunner().invoke(operator_command, ["-n", "a", "--all-namespaces"])
    assert result.exit_code != 0
    assert "not both" in result.output


def test_operator_refuses_a_dashboard_that_is_not_a_url() -> None:
    result = CliRunner().invoke(operator_command, ["--external-ray-dashboard", "ray-head:8265"])
    assert result.exit_code != 0
    assert "must be an http(s) URL" in result.output


def test_operator_fails_fast_on_unusable_credentials(tmp_path: Path) -> None:
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    result = CliRunner().invoke(operator_command, ["--kubeconfig", str(empty)])
    assert result.exit_code != 0
    assert "cannot load Kubernetes credentials" in result.output


SIZES = {
    ENV_RAY_HEAD_CPU: "500m",
    ENV_RAY_HEAD_MEMORY: "2Gi",
    ENV_RAY_WORKER_CPU_PER_GPU: "250m",
    ENV_RAY_WORKER_MEMORY_PER_GPU: "1536Mi",
}


def test_ray_pod_sizes_default_to_the_renderers_defaults_and_are_read_from_the_environment() -> (
    None
):
    config = OperatorConfig.from_env({})
    defaults = RayPodSettings(image="x", ray_version="2")
    assert (config.ray_head_cpu, config.ray_head_memory) == ("2", "8Gi")
    assert (config.ray_worker_cpu_per_gpu, config.ray_worker_memory_per_gpu) == ("8", "64Gi")
    assert (config.ray_head_cpu, config.ray_head_memory) == (
        defaults.head_cpu,
        defaults.head_memory,
    )
    assert (config.ray_worker_cpu_per_gpu, config.ray_worker_memory_per_gpu) == (
        defaults.worker_cpu_per_gpu,
        defaults.worker_memory_per_gpu,
    )
    sized = OperatorConfig.from_env(SIZES)
    assert (sized.ray_head_cpu, sized.ray_head_memory) == ("500m", "2Gi")
    assert (sized.ray_worker_cpu_per_gpu, sized.ray_worker_memory_per_gpu) == ("250m", "1536Mi")


@pytest.mark.parametrize(
    ("env", "value", "flag"),
    [
        (ENV_RAY_HEAD_CPU, "2 cores", "--ray-head-cpu"),
        (ENV_RAY_HEAD_CPU, "0", "--ray-head-cpu"),
        (ENV_RAY_HEAD_CPU, "-1", "--ray-head-cpu"),
        (ENV_RAY_WORKER_CPU_PER_GPU, "0.0005", "--ray-worker-cpu-per-gpu"),  # half a millicore
        (ENV_RAY_HEAD_MEMORY, "8GB", "--ray-head-memory"),
        (ENV_RAY_HEAD_MEMORY, "8", "--ray-head-memory"),  # 8 bytes: the unit is missing
        (ENV_RAY_WORKER_MEMORY_PER_GPU, "100m", "--ray-worker-memory-per-gpu"),  # 0.1 bytes
    ],
)
def test_a_bad_ray_pod_size_is_refused_naming_the_flag_and_the_fix(
    env: str, value: str, flag: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{flag} \\({env}\\) must be a (CPU|memory) quantity"):
        OperatorConfig.from_env({env: value})
    result = CliRunner().invoke(operator_command, [f"{flag}={value}"])
    assert result.exit_code != 0
    assert flag in result.output
    assert "such as" in result.output
    from_env = CliRunner().invoke(operator_command, [], env={env: value})
    assert from_env.exit_code != 0
    assert flag in from_env.output


def test_the_reconciler_sizes_the_ray_pods_and_declares_a_custom_accelerator() -> None:
    config = OperatorConfig.from_env(SIZES | {ENV_ACCELERATOR: "fake_gpu"})
    kube = FakeKube(h100_hosts(1))
    run(Reconciler(kube, config, clock=lambda: START), body("maverick"))
    cluster = kube.objects[("RayService", "llm", "maverick")]["spec"]["rayClusterConfig"]
    [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["resources"]["limits"] == {"cpu": "500m", "memory": "2Gi"}
    assert head["resources"]["requests"] == head["resources"]["limits"]
    [group] = cluster["workerGroupSpecs"]
    [worker] = group["template"]["spec"]["containers"]
    # Maverick takes 8 GPUs: 8 x 250m and 8 x 1536Mi.
    assert worker["resources"]["limits"] == {
        "cpu": "2",
        "memory": "12Gi",
        "nvidia.com/gpu": "8",
    }
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    assert group["rayStartParams"] == {"num-gpus": "0", "resources": "'{\"fake_gpu\":8}'"}


def test_the_handlers_share_one_runtime_from_kopfs_memo() -> None:
    """Startup puts the runtime in the memo; a handler that runs before it asks Kopf to retry,
    and the resource handlers reconcile through it, under its planning lock."""
    from llama4_operator.handlers import kopf_handlers as handlers

    obj = body("maverick")
    memo = kopf.Memo()
    no_workers = cast(handlers.RayWorkers, {})  # the pod index, empty

    def reconcile() -> None:  # what the create, update, resume and resync handlers call
        raw = cast(kopf.RawBody, obj)
        asyncio.run(handlers._reconcile_locked(kopf.Body(raw), memo, LOG, no_workers))

    with pytest.raises(kopf.TemporaryError, match="still starting"):
        reconcile()

    kube = FakeKube(h100_hosts(2))
    runtime = handlers.OperatorRuntime.for_reconciler(Reconciler(kube, CONFIG), CONFIG)
    assert runtime.rebalancer.lock is runtime.planning_lock  # re-plans wait for reconciles
    memo["runtime"] = runtime
    reconcile()
    assert "RayService/maverick" in kube.applied
    assert handlers.runtime_of(memo) is runtime

"""The Serve application as the operator renders it (`renderers.serving.serve_application`), on
a real local Ray cluster: a new expert plan or replica count changes only `LLMServer`'s
deployment-level override, and Ray Serve applies it to the running replicas instead of
replacing them; at zero replicas a request waits at the ingress, which counts it (`/-/queue`),
until Serve starts a replica for it. Also the rebalance path on live counters: the operator's
metrics source reads the replicas, the planners re-plan from the routed tokens, and the
rendered plan goes live."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from ray import serve
from ray.util.state import list_actors
from serving_cluster import API_KEY, APP, MODEL, ServingCluster, wait_running

from llama4_operator.planners.expert_load import decide_on_window, routed_load, too_few_tokens
from llama4_operator.planners.placement_metrics import Topology
from llama4_operator.renderers.serving import serve_application
from llama4_operator.serving_metrics import DeploymentTarget, DirectSource, ServingSnapshot
from llama4_serving.config import ExpertPlacement, ServingConfig

# One GPU per replica holding all four experts, so that two replicas fit the two fake-GPU
# nodes (2 each) with room to spare.
ONE_GPU_V0: dict[str, Any] = {
    "nodes": 1,
    "gpus_per_node": 1,
    "slots_per_gpu": 4,
    "phy2log": [[0, 1, 2, 3], [3, 2, 1, 0]],
    "version": 0,
}
ONE_GPU_V1: dict[str, Any] = {**ONE_GPU_V0, "phy2log": [[1, 0, 3, 2], [0, 1, 2, 3]], "version": 1}
# Two GPUs, experts 0 and 1 on the first: the tiny model's random router sends most tokens of
# its second MoE layer to experts 0 and 1, so this plan is out of balance there.
TWO_GPUS: dict[str, Any] = {
    "nodes": 1,
    "gpus_per_node": 2,
    "slots_per_gpu": 2,
    "phy2log": [[0, 1, 2, 3], [0, 1, 2, 3]],
    "version": 0,
}
TIMEOUT_S = 420.0  # generous: the test machine is shared and slow


def rendered(cluster: ServingCluster, replicas: int, plan: dict[str, Any]) -> dict[str, Any]:
    config = ServingConfig.model_validate(
        {**cluster.args, "num_replicas": replicas, "placement": plan}
    )
    return serve_application(config, APP, "/")


def actor_ids(deployment: str) -> set[str]:
    """Live replica actors of one of the application's deployments."""
    return {
        a.actor_id
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if a.class_name.endswith(deployment)
    }


def replica_actor_ids() -> set[str]:
    return actor_ids("LLMServer")


def plan_versions() -> set[int | None]:
    """The plan version each live replica reports (a handle call reaches one replica: ask often)."""
    handle = serve.get_deployment_handle("LLMServer", app_name=APP)
    return {handle.shard_info.remote().result(timeout_s=60)["version"] for _ in range(8)}


def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll `check`; while replicas come and go a call may fail, which counts as not yet."""
    deadline = time.monotonic() + TIMEOUT_S
    last: object = None
    while True:
        try:
            if check():
                return
        except Exception as error:  # reported if the wait times out
            last = error
        assert time.monotonic() < deadline, f"timed out waiting until {what} (last error: {last})"
        time.sleep(1.0)


def completes(cluster: ServingCluster, prompt: str = "hello", tokens: int = 4) -> bool:
    response = httpx.post(
        f"{cluster.base_url}/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "prompt": prompt, "max_tokens": tokens, "seed": 1},
        timeout=120,
    )
    return response.status_code == 200


def read_counters(cluster: ServingCluster) -> ServingSnapshot:
    """What the operator's direct source reads: the ingress' target list, each replica's
    /metrics."""
    target = DeploymentTarget("llm", "tiny", MODEL, f"{cluster.base_url}/v1")
    return asyncio.run(DirectSource().snapshot(target))


def test_rendered_plan_and_replica_changes_reconfigure_in_place(
    serving_cluster: ServingCluster,
) -> None:
    first = rendered(serving_cluster, 1, ONE_GPU_V0)
    try:
        # The first rendered config replaces the fixture's replicas (its args carry a plan).
        serving_cluster.deploy_application(first)
        wait_until(
            lambda: len(replica_actor_ids()) == 1 and plan_versions() == {0},
            "one replica serves plan version 0",
        )
        wait_running()
        replicas = replica_actor_ids()

        # A rebalanced plan: same args, new user_config; the replica swaps plans in place.
        rebalanced = rendered(serving_cluster, 1, ONE_GPU_V1)
        assert json.dumps(rebalanced["args"]) == json.dumps(first["args"])
        serving_cluster.deploy_application(rebalanced)
        wait_until(lambda: plan_versions() == {1}, "the replica serves plan version 1")
        assert replica_actor_ids() == replicas

        # One more replica: same args again; Serve adds a replica and keeps the first one.
        scaled = rendered(serving_cluster, 2, ONE_GPU_V1)
        assert json.dumps(scaled["args"]) == json.dumps(first["args"])
        serving_cluster.deploy_application(scaled)
        wait_until(lambda: len(replica_actor_ids()) == 2, "a second replica is alive")
        wait_running()
        assert replicas < replica_actor_ids()  # the first replica was never replaced
        assert plan_versions() == {1}  # the new replica started with the current plan
        assert completes(serving_cluster)

        # Zero, as a deployment the autoscaler put to sleep: Serve stops the replicas and keeps
        # the ingress (same args, same code version: nothing is rebuilt).
        ingress = actor_ids("OpenAIIngress")
        asleep = rendered(serving_cluster, 0, ONE_GPU_V1)
        assert json.dumps(asleep["args"]) == json.dumps(first["args"])
        serving_cluster.deploy_application(asleep)
        wait_until(lambda: not replica_actor_ids(), "no replica is alive")
        queue_url = f"{serving_cluster.base_url}/-/queue"
        assert httpx.get(queue_url, timeout=10).json() == {"waiting_requests": 0}
        # A request now is held, and counted, until Serve has started a replica for it.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            answered = pool.submit(completes, serving_cluster, "wake up", 4)
            wait_until(
                lambda: httpx.get(queue_url, timeout=10).json()["waiting_requests"] == 1,
                "the ingress counts the waiting request",
            )
            assert answered.result(timeout=TIMEOUT_S)
            print(f"answered {time.monotonic() - started:.1f} s after arriving at zero replicas")
        assert httpx.get(queue_url, timeout=10).json() == {"waiting_requests": 0}
        assert len(replica_actor_ids()) == 1
        assert actor_ids("OpenAIIngress") == ingress
    finally:
        serving_cluster.deploy()  # back to the fixture's application for other tests
        wait_until(lambda: len(replica_actor_ids()) == 1, "the fixture's replica is back")
        wait_running()


def test_measured_load_rebalances_the_live_replica_in_place(
    serving_cluster: ServingCluster,
) -> None:
    first = rendered(serving_cluster, 1, TWO_GPUS)
    try:
        serving_cluster.deploy_application(first)
        wait_until(
            lambda: len(replica_actor_ids()) == 1 and plan_versions() == {0},
            "one replica serves the two-GPU plan",
        )
        wait_running()
        replicas = replica_actor_ids()
        before = read_counters(serving_cluster)
        prompts = [f"Ray Serve replicas answer question {i}" for i in range(16)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda p: completes(serving_cluster, p, 48), prompts))
        after = read_counters(serving_cluster)
        arch = serving_cluster.architecture
        load = routed_load(before, after, arch.moe_layers, arch.num_local_experts)
        assert too_few_tokens(load, gpus=2) == ""
        decision = decide_on_window(
            TWO_GPUS["phy2log"],
            Topology(nodes=1, gpus_per_node=2, slots_per_gpu=2),
            load,
            threshold=0.95,
            max_experts_moved=4,
        )
        assert decision.rebalance, f"{decision.reason}; load {load.tolist()}"
        assert decision.phy2log is not None
        plan = ExpertPlacement.model_validate(
            {**TWO_GPUS, "phy2log": decision.phy2log.tolist(), "version": 1}
        )

        rebalanced = rendered(serving_cluster, 1, plan.model_dump())
        assert json.dumps(rebalanced["args"]) == json.dumps(first["args"])
        serving_cluster.deploy_application(rebalanced)
        wait_until(lambda: plan_versions() == {1}, "the replica serves the rebalanced plan")
        assert replica_actor_ids() == replicas
        assert completes(serving_cluster)
    finally:
        serving_cluster.deploy()
        wait_until(lambda: len(replica_actor_ids()) == 1, "the fixture's replica is back")
        wait_running()

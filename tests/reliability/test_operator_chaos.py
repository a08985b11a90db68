"""The operator under faults, on a real API server: SIGKILLed at seeded random points while it
reconciles several resources, the API server restarted under it, the spec and status written
concurrently with it, and two replicas competing through Kopf peering. Each test ends with the
same check: every deployment converges to its latest generation, with exactly one of each child
and its status (observedGeneration, conditions, placement) present.

Expected values come from the public contract (docs/api.md: children and status; the samples:
Scout int4 takes 1 GPU per replica, Maverick FP8 8), never from the operator's output.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from reliability_api import Api, assert_converged, sample, wait_all_reconciled

from llama4_operator.devenv.cluster import LocalCluster
from support import GROUP, PLURAL, VERSION, Kubectl, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

SEED = 20260
CONVERGE_TIMEOUT_S = 180  # several resources on a loaded 2-core machine


def create_fleet(api: Api, namespace: str) -> list[str]:
    """Two Maverick FP8 (8 GPUs each) and three Scout int4 (1 GPU per replica) deployments."""
    names = []
    for index in range(2):
        names.append(
            api.create(namespace, sample("maverick", f"maverick-{index}"))["metadata"]["name"]
        )
    for index in range(3):
        manifest = sample("scout", f"scout-{index}")
        manifest["spec"]["replicas"] = index + 1
        names.append(api.create(namespace, manifest)["metadata"]["name"])
    return names


def test_operator_killed_at_random_points_converges_without_duplicates(
    api: Api, operator: OperatorProcess, namespace: str
) -> None:
    rng = random.Random(SEED)
    names = create_fleet(api, namespace)
    for round_ in range(4):
        # Spec changes keep it busy: every kill lands while some reconciliation is due.
        api.patch_spec(namespace, "scout-0", {"replicas": 1 + round_ % 3})
        api.patch_spec(
            namespace, f"maverick-{round_ % 2}", {"placement": {"redundantExpertSlots": 8 * round_}}
        )
        time.sleep(rng.uniform(0.3, 3.0))
        assert operator.process is not None
        assert operator.process.poll() is None, operator.log()[-3000:]
        operator.kill()
        assert operator.process.returncode == -9
        operator.start()
    wait_all_reconciled(api, namespace, names, CONVERGE_TIMEOUT_S)
    deployments = {d["metadata"]["name"]: d for d in assert_converged(api, namespace, names)}
    assert deployments["scout-0"]["spec"]["replicas"] == 1 + 3 % 3
    assert deployments["scout-0"]["status"]["replicas"] == 1
    assert deployments["scout-2"]["status"]["replicas"] == 3
    # The last round's change is what the RayService runs (nothing older won a race).
    serve_config = yaml.safe_load(api.ray_service(namespace, "maverick-1")["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["args"]["engine_args"]["eplb_config"]["num_redundant_experts"] == 24
    assert "Traceback" not in operator.log(), operator.log()[-3000:]


def test_api_server_restart_is_survived_and_later_changes_reconciled(
    chaos_cluster: LocalCluster, api: Api, operator: OperatorProcess, namespace: str
) -> None:
    api.create(namespace, sample("scout"))
    wait_all_reconciled(api, namespace, ["scout"], CONVERGE_TIMEOUT_S)
    chaos_cluster.restart_component("kube-apiserver")
    assert operator.process is not None
    assert operator.process.poll() is None, "the operator exited when the API server went away"
    # A change made after the restart reaches the children: the operator's watch reconnected.
    api.patch_spec(namespace, "scout", {"replicas": 2})
    wait_all_reconciled(api, namespace, ["scout"], CONVERGE_TIMEOUT_S)
    (deployment,) = assert_converged(api, namespace, ["scout"])
    assert deployment["status"]["replicas"] == 2
    groups = api.ray_service(namespace, "scout")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(g["replicas"] for g in groups) == 2  # Scout int4: one 1-GPU worker per replica
    assert operator.process.poll() is None, operator.log()[-3000:]


def _replace_with_retry(api: Api, namespace: str, name: str, replicas: int) -> int:
    """Read-modify-write with the read's resourceVersion, as `kubectl edit` does: a write that
    raced another (the operator's status patch, say) gets 409 Conflict and is retried. Returns
    how many 409s it met."""
    conflicts = 0
    while True:
        current = api.deployment(namespace, name)
        assert current is not None
        current["spec"]["replicas"] = replicas
        try:
            api.custom.replace_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, current
            )
        except ApiException as error:
            if error.status != 409:
                raise
            conflicts += 1
        else:
            return conflicts


def test_spec_writes_racing_the_operator_lose_no_update_and_no_status(
    api: Api, operator: OperatorProcess, namespace: str
) -> None:
    names = create_fleet(api, namespace)
    wait_all_reconciled(api, namespace, names, CONVERGE_TIMEOUT_S)
    conflicts = [0, 0]
    last = {"scout-1": 0, "scout-2": 0}

    def writer(slot: int, name: str) -> None:
        rng = random.Random(SEED + slot)
        for _ in range(15):
            last[name] = rng.randint(1, 3)
            conflicts[slot] += _replace_with_retry(api, namespace, name, last[name])
            time.sleep(rng.uniform(0.0, 0.4))

    # Two writers on two objects while the operator writes their status after each change,
    # and a third hand clears a status outright (a status written by someone else is lost).
    threads = [
        threading.Thread(target=writer, args=(0, "scout-1")),
        threading.Thread(target=writer, args=(1, "scout-2")),
    ]
    for thread in threads:
        thread.start()
    api.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "maverick-0",
        {"status": {"conditions": None, "placement": None, "observedGeneration": None}},
    )  # fmt: skip
    for thread in threads:
        thread.join(timeout=300)
    wait_all_reconciled(api, namespace, names, CONVERGE_TIMEOUT_S)
    deployments = {d["metadata"]["name"]: d for d in assert_converged(api, namespace, names)}
    for name, replicas in last.items():
        assert deployments[name]["spec"]["replicas"] == replicas  # no write was lost
        assert deployments[name]["status"]["replicas"] == replicas  # nor its reconciliation
        groups = api.ray_service(namespace, name)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert sum(g["replicas"] for g in groups) == replicas
    assert deployments["maverick-0"]["status"]["placement"]  # the cleared status came back
    print(f"409 conflicts met and retried by the writers: {sum(conflicts)}")


def peering_priorities(api: Api, peering: str) -> list[int]:
    """Priorities of the operator instances recorded in a ClusterKopfPeering's status."""
    found = api.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
    return sorted(peer["priority"] for peer in (found.get("status") or {}).values())


def handled(replica: OperatorProcess, namespace: str) -> list[str]:
    """Log lines of handlers run on objects in `namespace` (the operator prefixes each such
    line with [namespace/name])."""
    return [line for line in replica.log().splitlines() if f"[{namespace}/" in line]


def test_two_peered_replicas_one_acts_and_the_other_takes_over(
    chaos_cluster: LocalCluster,
    api: Api,
    kubectl: Kubectl,
    namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    peering = f"reliability-{namespace}"
    kubectl.apply(
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}},
        namespace,
    )
    leader, standby = (
        OperatorProcess(
            chaos_cluster.kubeconfig,
            tmp_path_factory.mktemp(f"replica-{priority}"),
            extra_args=(f"--peering={peering}", f"--peering-priority={priority}"),
        )
        for priority in (200, 100)
    )

    def logs() -> str:
        return f"\nleader:\n{leader.log()[-3000:]}\nstandby:\n{standby.log()[-3000:]}"

    try:
        # Both record themselves in the peering; the standby starts paused (the peering is
        # mandatory) and stays so while the leader's record is live. Starting them in turn
        # makes the pause the standby's first state, which is what a rolling update meets.
        leader.start()
        wait_for(lambda: peering_priorities(api, peering) == [200], 120, "the leader's record")
        standby.start()
        wait_for(
            lambda: peering_priorities(api, peering) == [100, 200], 120, "the standby's record"
        )
        names = create_fleet(api, namespace)
        wait_all_reconciled(api, namespace, names, CONVERGE_TIMEOUT_S)
        assert_converged(api, namespace, names)
        assert handled(leader, namespace), f"the leader's handlers left no log line{logs()}"
        assert not handled(standby, namespace), f"the paused replica handled objects{logs()}"
        # A rolling update: the leader stops cleanly (its peering record goes with it) and the
        # standby takes over: it reconciles a change made after, with no second set of children.
        leader.stop()
        wait_for(lambda: peering_priorities(api, peering) == [100], 60, "the leader's record gone")
        wait_for(
            lambda: "Resuming operations" in standby.log(),
            60,
            "the standby replica to resume when the leader left",
        )
        api.patch_spec(namespace, "scout-0", {"replicas": 2})
        wait_all_reconciled(api, namespace, names, CONVERGE_TIMEOUT_S)
        deployments = {d["metadata"]["name"]: d for d in assert_converged(api, namespace, names)}
        assert deployments["scout-0"]["status"]["replicas"] == 2
        assert any(f"[{namespace}/scout-0]" in line for line in handled(standby, namespace))
    except AssertionError as error:
        raise AssertionError(f"{error}{logs()}") from None
    finally:
        leader.stop()
        standby.stop()
        kubectl.run("delete", "clusterkopfpeering", peering, "--ignore-not-found")

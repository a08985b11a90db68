"""`llama4ctl operator`: run the Llama4Deployment operator (Kopf, in this process)."""

from __future__ import annotations

import importlib
import os
import secrets

import click
import kopf

from llama4_operator import kube, metrics
from llama4_operator.handlers import config as operator_config


@click.command("operator")
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    metavar="NS",
    help="Watch this namespace (repeatable; glob patterns such as 'team-*' work).",
)
@click.option(
    "--all-namespaces",
    "-A",
    is_flag=True,
    help="Watch every namespace (the default when no --namespace is given).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=operator_config.DEFAULT_METRICS_PORT,
    show_default=True,
    help="Serve the operator's Prometheus metrics on this port (0: off).",
)
@click.option(
    "--external-ray-dashboard",
    metavar="URL",
    envvar=operator_config.ENV_EXTERNAL_RAY,
    help=(
        "Deploy Serve applications to this existing Ray cluster's dashboard (e.g. "
        "http://ray-head:8265) instead of creating RayServices."
    ),
)
@click.option(
    "--external-ray-serve-port",
    type=click.IntRange(1, 65535),
    default=operator_config.DEFAULT_EXTERNAL_RAY_SERVE_PORT,
    show_default=True,
    envvar=operator_config.ENV_EXTERNAL_RAY_SERVE_PORT,
    help=(
        "Port of that Ray cluster's Serve HTTP proxy (`serve start --http-port`), where the "
        "deployments' OpenAI endpoints answer."
    ),
)
@click.option(
    "--ray-auth-token-file",
    metavar="FILE",
    envvar=operator_config.ENV_RAY_TOKEN_FILE,
    help=(
        "File holding that Ray cluster's token, when it has token authentication on "
        "(RAY_AUTH_MODE=token); read on every call, so a rotated Secret needs no restart. "
        "Default: the RAY_AUTH_TOKEN environment variable, if set."
    ),
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    envvar="KUBECONFIG",
    help="Kubeconfig file (default: in-cluster config, else ~/.kube/config).",
)
@click.option(
    "--resync-interval",
    type=click.FloatRange(min=1),
    default=operator_config.DEFAULT_RESYNC_S,
    show_default=True,
    help="Seconds between re-checks of each resource (drift, health).",
)
@click.option(
    "--image",
    default=operator_config.DEFAULT_IMAGE,
    show_default=True,
    envvar=operator_config.ENV_IMAGE,
    help="Default container image of the Ray pods (spec.engine.image overrides it).",
)
@click.option(
    "--ray-accelerator-resource",
    default="GPU",
    show_default=True,
    envvar=operator_config.ENV_ACCELERATOR,
    help=(
        "Ray resource each expert shard takes: GPU, or a custom resource (e.g. fake_gpu) on a "
        "CPU Ray cluster for demos. With a custom one, the RayService workers declare N units "
        "of it to Ray instead of N GPUs (their pods still request N nvidia.com/gpu)."
    ),
)
@click.option(
    "--ray-head-cpu",
    metavar="QUANTITY",
    default=operator_config.DEFAULT_RAY_HEAD_CPU,
    show_default=True,
    envvar=operator_config.ENV_RAY_HEAD_CPU,
    help=(
        "CPU of each Ray head pod, a Kubernetes quantity (e.g. 500m); requests = limits, for "
        "the Guaranteed QoS class. Lower it so the head fits small nodes (a 2-CPU dev node)."
    ),
)
@click.option(
    "--ray-head-memory",
    metavar="QUANTITY",
    default=operator_config.DEFAULT_RAY_HEAD_MEMORY,
    show_default=True,
    envvar=operator_config.ENV_RAY_HEAD_MEMORY,
    help="Memory of each Ray head pod (e.g. 2Gi); requests = limits. Lower it for small nodes.",
)
@click.option(
    "--ray-worker-cpu-per-gpu",
    metavar="QUANTITY",
    default=operator_config.DEFAULT_RAY_WORKER_CPU_PER_GPU,
    show_default=True,
    envvar=operator_config.ENV_RAY_WORKER_CPU_PER_GPU,
    help=(
        "CPU of a Ray worker pod per GPU it takes (a worker on 2 GPUs gets twice this); "
        "requests = limits. Lower it (e.g. 250m) for small dev nodes, raise it for "
        "CPU-hungry engines."
    ),
)
@click.option(
    "--ray-worker-drain-seconds",
    type=click.IntRange(min=1),
    default=operator_config.DEFAULT_RAY_WORKER_DRAIN_S,
    show_default=True,
    envvar=operator_config.ENV_RAY_WORKER_DRAIN,
    help=(
        "How long a deleted Ray worker pod (scale-down, node drain, upgrade) drains its Ray "
        "node: Serve starts its replicas on other workers and stops them there only then. "
        "Longer than an engine takes to load the model."
    ),
)
@click.option(
    "--ray-cpu-limit/--no-ray-cpu-limit",
    default=True,
    show_default=True,
    envvar=operator_config.ENV_RAY_CPU_LIMIT,
    help=(
        "Limit the Ray containers' CPU to their request (Guaranteed QoS). --no-ray-cpu-limit "
        "leaves requests only, so engines use idle cores instead of being throttled at the "
        "request: for small shared dev nodes. Ray counts the request's CPUs either way."
    ),
)
@click.option(
    "--ray-worker-memory-per-gpu",
    metavar="QUANTITY",
    default=operator_config.DEFAULT_RAY_WORKER_MEMORY_PER_GPU,
    show_default=True,
    envvar=operator_config.ENV_RAY_WORKER_MEMORY_PER_GPU,
    help=(
        "Memory of a Ray worker pod per GPU it takes (times the worker's GPUs); requests = "
        "limits. Lower it (e.g. 1Gi) for small dev nodes."
    ),
)
@click.option(
    "--rebalance-tick",
    type=click.FloatRange(min=1),
    default=operator_config.DEFAULT_REBALANCE_TICK_S,
    show_default=True,
    envvar=operator_config.ENV_REBALANCE_TICK,
    help=(
        "Seconds between rebalance timer ticks; each deployment is still checked only every "
        "spec.placement.rebalance.intervalSeconds (lower it for tests and demos)."
    ),
)
@click.option(
    "--prometheus-url",
    metavar="URL",
    envvar=operator_config.ENV_PROMETHEUS_URL,
    help=(
        "Prometheus the autoscaler queries for serving metrics (e.g. http://prometheus:9090); "
        "omitted: it scrapes the replicas the deployment's endpoint lists (/-/metrics/targets)."
    ),
)
@click.option(
    "--autoscale-interval",
    type=click.FloatRange(min=1),
    default=operator_config.DEFAULT_AUTOSCALE_INTERVAL_S,
    show_default=True,
    envvar=operator_config.ENV_AUTOSCALE_INTERVAL,
    help="Seconds between autoscaling decisions of each deployment with autoscaling enabled.",
)
@click.option(
    "--ray-network-policy",
    metavar="JSON",
    envvar=operator_config.ENV_RAY_NETWORK_POLICY,
    help=(
        "Render a NetworkPolicy around each RayService's head: only the deployment's own Ray "
        "pods reach every port, the operator's pods the dashboard, servingClients (NetworkPolicy "
        "peers; empty: anyone) the OpenAI port, anyone the metrics ports. JSON: "
        f"{operator_config.NETWORK_POLICY_EXAMPLE}. Omitted: no policy."
    ),
)
@click.option(
    "--liveness-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help=(
        "Serve Kopf's liveness endpoint on this port at /healthz: it answers only while the "
        "operator's event loop runs its probes (0: off)."
    ),
)
@click.option("--verbose", "-v", is_flag=True, help="Log every reconciliation step (debug).")
@click.option(
    "--peering",
    metavar="NAME",
    help="Coordinate with other operator instances through this Kopf peering object.",
)
@click.option(
    "--peering-priority",
    type=click.IntRange(min=0),
    help=(
        "This instance's priority among peers: only the highest live one acts, the others "
        "stand by. Default: a random one, so that replicas never tie (a tie pauses all)."
    ),
)
def operator_command(
    *,
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    metrics_port: int,
    external_ray_dashboard: str | None,
    external_ray_serve_port: int,
    ray_auth_token_file: str | None,
    kubeconfig: str | None,
    resync_interval: float,
    image: str,
    peering: str | None,
    peering_priority: int | None,
    verbose: bool,
    ray_accelerator_resource: str,
    rebalance_tick: float,
    prometheus_url: str | None,
    autoscale_interval: float,
    liveness_port: int,
    ray_network_policy: str | None,
    ray_head_cpu: str,
    ray_cpu_limit: bool,
    ray_worker_drain_seconds: int,
    ray_head_memory: str,
    ray_worker_cpu_per_gpu: str,
    ray_worker_memory_per_gpu: str,
) -> None:
    """Run the Llama4Deployment operator against a cluster until interrupted."""
    if namespaces and all_namespaces:
        raise click.UsageError("give --namespace or --all-namespaces, not both")
    settings = {
        operator_config.ENV_METRICS_PORT: str(metrics_port),
        operator_config.ENV_RESYNC: str(resync_interval),
        operator_config.ENV_IMAGE: image,
        operator_config.ENV_EXTERNAL_RAY: external_ray_dashboard or "",
        operator_config.ENV_EXTERNAL_RAY_SERVE_PORT: str(external_ray_serve_port),
        operator_config.ENV_RAY_TOKEN_FILE: ray_auth_token_file or "",
        operator_config.ENV_PEERING: peering or "",
        operator_config.ENV_ACCELERATOR: ray_accelerator_resource,
        operator_config.ENV_REBALANCE_TICK: str(rebalance_tick),
        operator_config.ENV_PROMETHEUS_URL: prometheus_url or "",
        operator_config.ENV_AUTOSCALE_INTERVAL: str(autoscale_interval),
        operator_config.ENV_RAY_NETWORK_POLICY: ray_network_policy or "",
        operator_config.ENV_RAY_HEAD_CPU: ray_head_cpu,
        operator_config.ENV_RAY_CPU_LIMIT: str(ray_cpu_limit).lower(),
        operator_config.ENV_RAY_WORKER_DRAIN: str(ray_worker_drain_seconds),
        operator_config.ENV_RAY_HEAD_MEMORY: ray_head_memory,
        operator_config.ENV_RAY_WORKER_CPU_PER_GPU: ray_worker_cpu_per_gpu,
        operator_config.ENV_RAY_WORKER_MEMORY_PER_GPU: ray_worker_memory_per_gpu,
    }
    if kubeconfig:
        settings[operator_config.ENV_KUBECONFIG] = os.path.abspath(kubeconfig)
    try:
        operator_config.OperatorConfig.from_env(settings)
    except operator_config.ConfigError as error:
        raise click.BadParameter(str(error)) from error
    try:
        kube.load_client_config(settings.get(operator_config.ENV_KUBECONFIG))
    except kube.KubeConfigError as error:
        raise click.ClickException(str(error)) from error
    if metrics_port:
        try:
            metrics.serve(metrics_port)
        except OSError as error:
            raise click.ClickException(
                f"cannot serve metrics on port {metrics_port}: {error}; pick another "
                "--metrics-port (0 turns metrics off)"
            ) from error
    # The handlers read these when imported (the timer's interval is fixed at registration).
    os.environ.update(settings)
    # INFO logs by default, DEBUG with -v; each object's lines start with [namespace/name].
    kopf.configure(debug=verbose, verbose=verbose, log_prefix=True)
    importlib.import_module("llama4_operator.handlers.kopf_handlers")  # registers the handlers
    kopf.run(
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=peering is None,
        peering_name=peering,
        priority=secrets.randbelow(2**31) if peering_priority is None else peering_priority,
        registry=kopf.get_default_registry(),
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )

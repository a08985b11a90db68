"""Operator-wide settings, read from the environment once (`llama4ctl operator` sets them from
its flags before the handlers are imported; the Helm chart sets them on the Deployment)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

from llama4_operator.renderers.children import NetworkPolicySettings
from llama4_operator.renderers.quantities import Quantity, parse_quantity
from llama4_operator.renderers.serving import SERVE_HTTP_PORT

ENV_IMAGE = "LLAMA4_SERVING_IMAGE"
ENV_RAY_VERSION = "LLAMA4_RAY_VERSION"
ENV_EXTERNAL_RAY = "LLAMA4_EXTERNAL_RAY_DASHBOARD"
ENV_EXTERNAL_RAY_SERVE_PORT = "LLAMA4_EXTERNAL_RAY_SERVE_PORT"
DEFAULT_EXTERNAL_RAY_SERVE_PORT = SERVE_HTTP_PORT
ENV_RAY_TOKEN_FILE = "LLAMA4_RAY_AUTH_TOKEN_FILE"
ENV_RESYNC = "LLAMA4_RESYNC_INTERVAL_SECONDS"
ENV_METRICS_PORT = "LLAMA4_METRICS_PORT"
ENV_KUBECONFIG = "KUBECONFIG"
ENV_PEERING = "LLAMA4_PEERING"
ENV_ACCELERATOR = "LLAMA4_RAY_ACCELERATOR_RESOURCE"
ENV_REBALANCE_TICK = "LLAMA4_REBALANCE_TICK_SECONDS"
ENV_PROMETHEUS_URL = "LLAMA4_PROMETHEUS_URL"
ENV_AUTOSCALE_INTERVAL = "LLAMA4_AUTOSCALE_INTERVAL_SECONDS"
ENV_RAY_NETWORK_POLICY = "LLAMA4_RAY_NETWORK_POLICY"
ENV_RAY_HEAD_CPU = "LLAMA4_RAY_HEAD_CPU"
ENV_RAY_HEAD_MEMORY = "LLAMA4_RAY_HEAD_MEMORY"
ENV_RAY_WORKER_CPU_PER_GPU = "LLAMA4_RAY_WORKER_CPU_PER_GPU"
ENV_RAY_WORKER_MEMORY_PER_GPU = "LLAMA4_RAY_WORKER_MEMORY_PER_GPU"
ENV_RAY_CPU_LIMIT = "LLAMA4_RAY_CPU_LIMIT"
ENV_RAY_WORKER_DRAIN = "LLAMA4_RAY_WORKER_DRAIN_SECONDS"

DEFAULT_IMAGE = "llama4-serving:0.1.0"
DEFAULT_RESYNC_S = 60.0
# The rebalance timer's tick: spec.placement.rebalance.intervalSeconds is at least 30 s.
DEFAULT_REBALANCE_TICK_S = 30.0
DEFAULT_METRICS_PORT = 8080
DEFAULT_AUTOSCALE_INTERVAL_S = 15.0
# Sizes of the Ray pods (requests = limits); a worker's are per GPU, times its GPUs.
DEFAULT_RAY_HEAD_CPU = "2"
DEFAULT_RAY_HEAD_MEMORY = "8Gi"
DEFAULT_RAY_WORKER_CPU_PER_GPU = "8"
DEFAULT_RAY_WORKER_MEMORY_PER_GPU = "64Gi"
# A deleted worker's replicas move before it stops: long enough for an engine to load elsewhere.
DEFAULT_RAY_WORKER_DRAIN_S = 600
# (flag, environment variable) of each size, for the messages.
RAY_HEAD_CPU = ("--ray-head-cpu", ENV_RAY_HEAD_CPU)
RAY_HEAD_MEMORY = ("--ray-head-memory", ENV_RAY_HEAD_MEMORY)
RAY_WORKER_CPU_PER_GPU = ("--ray-worker-cpu-per-gpu", ENV_RAY_WORKER_CPU_PER_GPU)
RAY_WORKER_MEMORY_PER_GPU = ("--ray-worker-memory-per-gpu", ENV_RAY_WORKER_MEMORY_PER_GPU)


class ConfigError(ValueError):
    """An operator setting that cannot be used."""


def _default_ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return "2.60.0"


@dataclass(frozen=True)
class OperatorConfig:
    """Settings every reconciliation shares."""

    image: str = DEFAULT_IMAGE
    ray_version: str = ""
    external_ray_dashboard: str | None = None
    external_ray_serve_port: int = DEFAULT_EXTERNAL_RAY_SERVE_PORT
    """Port of that Ray cluster's Serve HTTP proxy, where its applications answer."""
    ray_auth_token_file: str | None = None
    """File holding the external Ray cluster's token; None: $RAY_AUTH_TOKEN, if set."""
    resync_interval_s: float = DEFAULT_RESYNC_S
    metrics_port: int = DEFAULT_METRICS_PORT
    kubeconfig: str | None = None
    peering: str | None = None
    accelerator_resource: str = "GPU"
    rebalance_tick_s: float = DEFAULT_REBALANCE_TICK_S
    prometheus_url: str | None = None
    """Where the autoscaler reads serving metrics; None: straight from the replicas."""
    autoscale_interval_s: float = DEFAULT_AUTOSCALE_INTERVAL_S
    ray_network_policy: NetworkPolicySettings | None = None
    """A NetworkPolicy around each RayService's head; None: none rendered."""
    ray_head_cpu: str = DEFAULT_RAY_HEAD_CPU
    """CPU of each Ray head pod (a Kubernetes quantity; requests = limits)."""
    ray_head_memory: str = DEFAULT_RAY_HEAD_MEMORY
    ray_worker_cpu_per_gpu: str = DEFAULT_RAY_WORKER_CPU_PER_GPU
    """CPU of a Ray worker pod per GPU it takes (a quantity, times the worker's GPUs)."""
    ray_worker_memory_per_gpu: str = DEFAULT_RAY_WORKER_MEMORY_PER_GPU
    ray_cpu_limit: bool = True
    """Limit the Ray containers' CPU to their request; False: requests only (Burstable)."""
    ray_worker_drain_s: int = DEFAULT_RAY_WORKER_DRAIN_S
    """How long a deleted Ray worker pod drains its node (its replicas start elsewhere first)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        try:
            resync = float(env.get(ENV_RESYNC, DEFAULT_RESYNC_S))
            metrics_port = int(env.get(ENV_METRICS_PORT, DEFAULT_METRICS_PORT))
        except ValueError as error:
            raise ConfigError(
                f"{ENV_RESYNC} must be a number of seconds and {ENV_METRICS_PORT} a port: {error}"
            ) from error
        if resync < 1:
            raise ConfigError(f"{ENV_RESYNC} must be at least 1 second, got {resync}")
        dashboard = _url(env, ENV_EXTERNAL_RAY, "http://ray-head:8265", "")
        return cls(
            image=env.get(ENV_IMAGE) or DEFAULT_IMAGE,
            ray_version=env.get(ENV_RAY_VERSION) or _default_ray_version(),
            external_ray_dashboard=dashboard,
            external_ray_serve_port=_port(
                env, ENV_EXTERNAL_RAY_SERVE_PORT, DEFAULT_EXTERNAL_RAY_SERVE_PORT
            ),
            ray_auth_token_file=env.get(ENV_RAY_TOKEN_FILE) or None,
            resync_interval_s=resync,
            metrics_port=metrics_port,
            kubeconfig=env.get(ENV_KUBECONFIG) or None,
            peering=env.get(ENV_PEERING) or None,
            accelerator_resource=env.get(ENV_ACCELERATOR) or "GPU",
            rebalance_tick_s=_seconds(env, ENV_REBALANCE_TICK, DEFAULT_REBALANCE_TICK_S),
            prometheus_url=_url(
                env,
                ENV_PROMETHEUS_URL,
                "http://prometheus:9090",
                ", or empty to read the replicas directly",
            ),
            autoscale_interval_s=_seconds(
                env, ENV_AUTOSCALE_INTERVAL, DEFAULT_AUTOSCALE_INTERVAL_S
            ),
            ray_network_policy=network_policy_settings(env.get(ENV_RAY_NETWORK_POLICY) or ""),
            ray_head_cpu=cpu_quantity(env, RAY_HEAD_CPU, DEFAULT_RAY_HEAD_CPU),
            ray_head_memory=memory_quantity(env, RAY_HEAD_MEMORY, DEFAULT_RAY_HEAD_MEMORY),
            ray_worker_cpu_per_gpu=cpu_quantity(
                env, RAY_WORKER_CPU_PER_GPU, DEFAULT_RAY_WORKER_CPU_PER_GPU
            ),
            ray_worker_memory_per_gpu=memory_quantity(
                env, RAY_WORKER_MEMORY_PER_GPU, DEFAULT_RAY_WORKER_MEMORY_PER_GPU
            ),
            ray_cpu_limit=_flag(env, ENV_RAY_CPU_LIMIT, default=True),
            ray_worker_drain_s=round(
                _seconds(env, ENV_RAY_WORKER_DRAIN, DEFAULT_RAY_WORKER_DRAIN_S)
            ),
        )


NETWORK_POLICY_EXAMPLE = (
    '{"operatorNamespace": "llama4-system", "operatorPodLabels": '
    '{"app.kubernetes.io/name": "llama4-operator"}, "servingClients": []}'
)


def network_policy_settings(text: str) -> NetworkPolicySettings | None:
    """`--ray-network-policy`'s JSON, checked field by field; empty: no policy."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigError(
            f"{ENV_RAY_NETWORK_POLICY} must be JSON such as {NETWORK_POLICY_EXAMPLE}: {error}"
        ) from error
    if not isinstance(value, dict):
        raise ConfigError(
            f"{ENV_RAY_NETWORK_POLICY} must be a JSON object: {NETWORK_POLICY_EXAMPLE}"
        )
    namespace = value.get("operatorNamespace")
    labels = value.get("operatorPodLabels")
    clients = value.get("servingClients", [])
    if not isinstance(namespace, str) or not namespace:
        raise ConfigError(
            f"{ENV_RAY_NETWORK_POLICY}: operatorNamespace must name the operator's namespace"
        )
    if (
        not isinstance(labels, dict)
        or not labels
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        raise ConfigError(
            f"{ENV_RAY_NETWORK_POLICY}: operatorPodLabels must be a non-empty map of the "
            "operator pods' labels (strings)"
        )
    if not isinstance(clients, list) or not all(isinstance(peer, dict) for peer in clients):
        raise ConfigError(
            f"{ENV_RAY_NETWORK_POLICY}: servingClients must be a list of NetworkPolicy peers "
            '(e.g. [{"namespaceSelector": {...}}]); empty: any client'
        )
    unknown = set(value) - {"operatorNamespace", "operatorPodLabels", "servingClients"}
    if unknown:
        raise ConfigError(f"{ENV_RAY_NETWORK_POLICY}: unknown fields {sorted(unknown)}")
    return NetworkPolicySettings(namespace, dict(labels), tuple(clients))


def cpu_quantity(env: Mapping[str, str], setting: tuple[str, str], default: str) -> str:
    """A CPU size from the environment: a Kubernetes quantity above 0, whole millicores."""
    text = (env.get(setting[1]) or default).strip()
    fix = "a CPU quantity such as 2, 1.5 or 500m (cores, or millicores with m)"
    value = _quantity(text, setting, fix).value
    if value <= 0 or (value * 1000).denominator != 1:
        raise ConfigError(
            f"{_name(setting)} must be {fix}, above 0 and in whole millicores; got {text!r}"
        )
    return text


def memory_quantity(env: Mapping[str, str], setting: tuple[str, str], default: str) -> str:
    """A memory size from the environment: a Kubernetes quantity of whole bytes, at least 1Mi
    (anything less is a missing unit: "8" is 8 bytes, "8Gi" 8 GiB)."""
    text = (env.get(setting[1]) or default).strip()
    fix = "a memory quantity with a unit, such as 8Gi, 512Mi or 4G"
    value = _quantity(text, setting, fix).value
    if value.denominator != 1 or value < 1024**2:
        raise ConfigError(
            f"{_name(setting)} must be {fix}: whole bytes, at least 1Mi; got {text!r}"
        )
    return text


def _quantity(text: str, setting: tuple[str, str], fix: str) -> Quantity:
    try:
        return parse_quantity(text)
    except ValueError as error:
        raise ConfigError(f"{_name(setting)} must be {fix}; got {text!r}") from error


def _name(setting: tuple[str, str]) -> str:
    flag, env = setting
    return f"{flag} ({env})"


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A period in seconds, at least 1, from the environment variable `name`."""
    text = env.get(name) or str(default)
    try:
        seconds = float(text)
    except ValueError as error:
        raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from error
    if seconds < 1:
        raise ConfigError(f"{name} must be at least 1 second, got {seconds}")
    return seconds


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    """A TCP port (1-65535) from the environment variable `name`."""
    text = env.get(name) or str(default)
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{name} must be a TCP port (1-65535), got {text!r}")
    return int(text)


def _url(env: Mapping[str, str], name: str, example: str, when_empty: str) -> str | None:
    url = env.get(name) or None
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{name} must be an http(s) URL such as {example}{when_empty}; got {url!r}"
        )
    return url


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")

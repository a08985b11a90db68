"""The serving configuration: the contract between the operator (which renders it into a Ray Serve
config's `args`) and the serving application (whose `build_app(args)` validates it).

Fields may be added (with defaults); renaming or removing one breaks deployed resources.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Quantization = Literal["bf16", "fp8", "int4"]
EngineName = Literal["reference", "vllm"]
EngineScalar = str | int | float | bool
EngineArgValue = EngineScalar | dict[str, EngineScalar]
# Engine arguments the serving app reads itself; every other key of `engine_args` is an engine
# argument (vLLM's `AsyncEngineArgs` for `vllm`).
REPLICA_NUM_CPUS = "replica_num_cpus"  # CPUs Ray reserves for one engine replica
TORCH_THREADS = "torch_threads"  # intra-op threads of the reference engine
CPU_KV_CACHE_GIB = "cpu_kv_cache_gib"  # vLLM on CPU: KV-cache space (VLLM_CPU_KVCACHE_SPACE)
PROJECT_ENGINE_ARGS = frozenset({REPLICA_NUM_CPUS, TORCH_THREADS, CPU_KV_CACHE_GIB})


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelArchitecture(_Strict):
    """The Llama 4 text architecture, named as in `transformers`' `Llama4TextConfig`."""

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="Routed and shared expert FFN width.")
    intermediate_size_mlp: int = Field(gt=0, description="Dense (non-MoE) layer FFN width.")
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    num_local_experts: int = Field(gt=0)
    num_experts_per_tok: int = Field(default=1, gt=0)
    interleave_moe_layer_step: int = Field(
        default=1, gt=0, description="Every n-th layer is MoE (1: all layers)."
    )
    attention_chunk_size: int = Field(
        default=8192, gt=0, description="Local attention window of the RoPE layers."
    )
    no_rope_layer_interval: int = Field(
        default=4, gt=0, description="Every n-th layer has no RoPE and attends globally."
    )
    rope_theta: float = Field(default=500000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    max_position_embeddings: int = Field(default=8192, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelArchitecture:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "num_attention_heads must be a multiple of num_key_value_heads (GQA groups)"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError("num_experts_per_tok cannot exceed num_local_experts")
        return self

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the MoE layers (Llama 4: layer i is MoE when (i + 1) % step == 0)."""
        step = self.interleave_moe_layer_step
        return [i for i in range(self.num_hidden_layers) if (i + 1) % step == 0]


class WeightsSource(_Strict):
    """Where the engine reads weights and tokenizer from. Nothing is fetched at run time:
    `huggingface` names a repository already present in the local Hugging Face cache."""

    kind: Literal["huggingface", "path", "random"] = "path"
    uri: str = Field(default="", description="Hugging Face repo id, or a directory path.")
    tokenizer_path: str | None = Field(
        default=None, description="Directory with tokenizer files; defaults to the weights dir."
    )
    seed: int = Field(default=0, description="Seed for `random` weights (tests and demos).")


class ExpertPlacement(_Strict):
    """Which logical expert each physical slot holds, per MoE layer (see `llama4ctl plan experts`).

    Slot p lies on GPU p // slots_per_gpu; GPU q on node q // gpus_per_node.
    """

    nodes: int = Field(default=1, gt=0)
    gpus_per_node: int = Field(default=1, gt=0)
    slots_per_gpu: int = Field(gt=0)
    phy2log: list[list[int]] = Field(description="One list of expert ids per MoE layer.")
    version: int = Field(default=0, ge=0, description="Bumped on every rebalance.")

    @model_validator(mode="after")
    def _shapes(self) -> ExpertPlacement:
        slots = self.nodes * self.gpus_per_node * self.slots_per_gpu
        for layer, row in enumerate(self.phy2log):
            if len(row) != slots:
                raise ValueError(
                    f"phy2log[{layer}] has {len(row)} slots; nodes x gpus_per_node x "
                    f"slots_per_gpu = {slots}"
                )
        return self


class BatchingLimits(_Strict):
    """Continuous-batching limits of one replica."""

    max_num_seqs: int = Field(default=32, gt=0, description="Sequences decoded together.")
    max_num_batched_tokens: int = Field(
        default=2048, gt=0, description="Prefill token budget per engine step."
    )
    max_model_len: int = Field(default=2048, gt=0, description="Prompt plus output tokens.")


# The ingresses' count of generation requests waiting for their answer (`waiting.py`): how the
# operator's autoscaler sees demand while a deployment is scaled to zero.
QUEUE_PATH = "/-/queue"

# Seconds a request may wait for its first output (queueing plus prefill) before a 503, where
# replicas are not expected to be starting.
FIRST_OUTPUT_TIMEOUT_S = 90.0


class ServingConfig(_Strict):
    """Everything one Ray Serve application of a Llama4Deployment needs."""

    served_model_name: str = Field(min_length=1, description="Name in /v1/models.")
    architecture: ModelArchitecture
    weights: WeightsSource = WeightsSource(kind="random")
    quantization: Quantization = "bf16"
    engine: EngineName = "reference"
    engine_args: dict[str, EngineArgValue] = Field(
        default_factory=dict,
        description="Engine arguments: vLLM's engine arguments for `vllm` (nested ones such as "
        "`eplb_config` as objects), plus the project's own keys (see PROJECT_ENGINE_ARGS).",
    )
    num_replicas: int = Field(default=1, ge=0)
    first_output_timeout_s: float = Field(
        default=FIRST_OUTPUT_TIMEOUT_S,
        gt=0,
        description="Seconds a request waits for its first output (queued while no engine "
        "replica is up, then prefill) before the reference engine's ingress answers 503; "
        "longer than a cold start where the deployment scales to zero.",
    )
    placement: ExpertPlacement | None = None
    batching: BatchingLimits = BatchingLimits()
    api_key_file: str | None = Field(
        default=None, description="File holding the API key (a mounted Secret); none: no auth."
    )
    accelerator_resource: str = Field(
        default="GPU",
        min_length=1,
        description="Ray resource one expert shard actor takes: `GPU` on GPU nodes; a custom "
        "resource such as `fake_gpu` on CPU test clusters.",
    )
    metrics_port: int | None = Field(
        default=8090,
        ge=0,
        le=65535,
        description="Port on which each engine replica serves Prometheus metrics (/metrics); "
        "0 picks a free port, none turns the server off.",
    )
    metrics_target_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels the ingress attaches to its replica list (GET /-/metrics/targets, "
        "Prometheus HTTP service discovery), e.g. {namespace: ...} so PromQL can select them.",
    )

    @field_validator("metrics_target_labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in labels if not _LABEL_NAME.fullmatch(k) or k.startswith("__"))
        if bad:
            raise ValueError(
                f"metrics_target_labels: {bad} are not Prometheus label names "
                "([a-zA-Z_][a-zA-Z0-9_]*, not starting with __): rename them"
            )
        return labels

    @model_validator(mode="after")
    def _placement_fits_architecture(self) -> ServingConfig:
        if self.placement is None:
            return self
        moe_layers = len(self.architecture.moe_layers)
        experts = self.architecture.num_local_experts
        if len(self.placement.phy2log) != moe_layers:
            raise ValueError(
                f"placement.phy2log has {len(self.placement.phy2log)} rows; the architecture has "
                f"{moe_layers} MoE layers: give one row per MoE layer"
            )
        for layer, row in enumerate(self.placement.phy2log):
            missing = sorted(set(range(experts)) - set(row))
            unknown = sorted(e for e in set(row) if not 0 <= e < experts)
            if unknown:
                raise ValueError(
                    f"placement.phy2log[{layer}] names experts {unknown}; valid ids are "
                    f"0..{experts - 1}"
                )
            if missing:
                raise ValueError(
                    f"placement.phy2log[{layer}] holds no copy of experts {missing}: every "
                    "expert needs at least one slot"
                )
        return self


LLM_SERVER_DEPLOYMENT = "LLMServer"  # the engine deployment that runtime overrides address


def engine_number(config: ServingConfig, key: str, default: float) -> float:
    """A numeric project key of `engine_args` (e.g. `replica_num_cpus`), or `default`."""
    value = config.engine_args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        # A user's value: reported like every other invalid config field.
        raise ValueError(f"engine_args.{key} must be a number, not {value!r}")  # noqa: TRY004
    return float(value)


def engine_deployment_name(config: ServingConfig) -> str:
    """The Serve deployment that runs the engine: `LLMServer` for the reference engine;
    `LLMServer:<model id>` for vLLM, as `ray.serve.llm` names it (`/` becomes `--`, `.` `_`)."""
    if config.engine == "reference":
        return LLM_SERVER_DEPLOYMENT
    model_id = config.served_model_name.replace("/", "--").replace(".", "_")
    return f"{LLM_SERVER_DEPLOYMENT}:{model_id}"


def is_engine_deployment(name: str) -> bool:
    """Whether a Serve deployment of an application is its engine (either engine's naming)."""
    return name == LLM_SERVER_DEPLOYMENT or name.startswith(f"{LLM_SERVER_DEPLOYMENT}:")


class RuntimeKnobs(_Strict):
    """The `user_config` of the reference engine's `LLMServer`: what can change without
    restarting a replica."""

    batching: BatchingLimits | None = None
    placement: ExpertPlacement | None = None


def max_ongoing_requests(batching: BatchingLimits) -> int:
    """Requests Serve hands one engine replica: beyond the batch they wait in the engine's
    queue, not in Serve's."""
    return 2 * batching.max_num_seqs


def application_args(config: ServingConfig) -> dict[str, Any]:
    """The Serve application's `args`: the config without what `llm_server_overrides` carries
    (those fields at fixed defaults). Ray Serve hashes `args` into the application's code
    version, and a new version replaces every replica; with this split, a new replica count,
    expert plan or batching limit leaves `args` byte-identical and is applied in place.
    vLLM sizes its batch when its engine starts, so its batching limits stay in `args`: a
    change restarts the replicas, one at a time."""
    fixed: dict[str, Any] = {"num_replicas": 1, "placement": None}
    if config.engine == "reference":
        fixed["batching"] = BatchingLimits()
    return config.model_copy(update=fixed).model_dump(mode="json")


# A deployment scaled to zero keeps a replica Serve woke for a request this long after its last
# one: time for the operator's autoscaler (which decides every 15 s by default) to take it over.
WOKEN_REPLICA_HOLD_S = 60.0


def replica_count_options(num_replicas: int) -> dict[str, Any]:
    """How the engine deployment's replica count is given to Serve: always as Serve autoscaling.
    Serve refuses `num_replicas: 0`, and Ray 2.60 counts whether each deployment has an
    `autoscaling_config` in the application's code version, so switching between the two forms
    would rebuild the application and replace every replica, the ingress with the requests it
    holds included. So: pinned (min = max = N) while replicas run; at zero, 0 to 1 starting at
    0, so that requests wait in Serve's router rather than fail, and their queue makes Serve
    start one replica wherever the Ray cluster has room for it (on KubeRay, once the operator
    has added its GPU worker group); the operator's autoscaler takes the count over from there.
    """
    if num_replicas > 0:
        pinned = {"min_replicas": num_replicas, "max_replicas": num_replicas}
        return {"autoscaling_config": {**pinned, "initial_replicas": num_replicas}}
    return {
        "autoscaling_config": {
            "min_replicas": 0,
            "initial_replicas": 0,
            "max_replicas": 1,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": WOKEN_REPLICA_HOLD_S,
            "downscale_to_zero_delay_s": WOKEN_REPLICA_HOLD_S,
        }
    }


def rendered_replicas(options: Mapping[str, Any]) -> int:
    """The replica count that `replica_count_options` (or a deployment override holding them)
    gives Serve: 0 for a deployment at zero."""
    return int(options["autoscaling_config"]["min_replicas"])


def llm_server_overrides(config: ServingConfig) -> dict[str, Any]:
    """The deployment-level options of the engine deployment in a Serve config
    (`applications[].deployments`): the options Serve changes without replacing replicas
    (the replica count as `autoscaling_config`, see `replica_count_options`;
    `max_ongoing_requests`; for the reference engine also `user_config`, which its `reconfigure`
    applies between engine steps)."""
    overrides: dict[str, Any] = {
        "name": engine_deployment_name(config),
        **replica_count_options(config.num_replicas),
        "max_ongoing_requests": max_ongoing_requests(config.batching),
    }
    if config.engine == "reference":
        knobs = RuntimeKnobs(batching=config.batching, placement=config.placement)
        overrides["user_config"] = knobs.model_dump(mode="json")
    return overrides

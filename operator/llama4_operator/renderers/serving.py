"""The serving side of a deployment: the expert placement, the `ServingConfig` and the Ray Serve
application that carries it (`import_path: llama4_serving.app:build_app`; `args`: the config
without its runtime knobs, which go in `LLMServer`'s deployment-level override)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from llama4_operator.api.catalog import architecture_of, weights_uri_of
from llama4_operator.api.models import (
    DEPLOYMENT_SERIES_LABEL,
    CustomArchitecture,
    ExpertBalancer,
    Llama4DeploymentSpec,
)
from llama4_operator.planners import placement_metrics
from llama4_operator.planners.expert_placement import plan_experts, uniform_load
from llama4_operator.planners.fit import Layout
from llama4_operator.planners.placement_metrics import Topology
from llama4_operator.renderers.engine_placement import vllm_expert_parallel_args
from llama4_serving.config import (
    FIRST_OUTPUT_TIMEOUT_S,
    BatchingLimits,
    EngineArgValue,
    ExpertPlacement,
    ModelArchitecture,
    ServingConfig,
    WeightsSource,
    application_args,
    llm_server_overrides,
)

IMPORT_PATH = "llama4_serving.app:build_app"
SERVE_HTTP_PORT = 8000
ENGINE_METRICS_PORT = 8090  # each engine replica's /metrics (the serving app's own metrics)
API_KEY_MOUNT_DIR = "/var/run/secrets/llama4/api-key"


@dataclass(frozen=True)
class ExpertLayout:
    """An expert placement with its balance under uniform load (1.0: every GPU equal)."""

    placement: ExpertPlacement
    balance: float


def expert_topology(arch: CustomArchitecture, layout: Layout, redundant_slots: int) -> Topology:
    """Slots of one replica: the expert-parallel GPUs, enough slots each for every expert copy."""
    if layout.expert_parallel:
        nodes, gpus_per_node = layout.nodes, layout.gpus_per_node
    else:
        nodes, gpus_per_node = 1, 1  # each tensor-parallel group holds every expert
    gpus = nodes * gpus_per_node
    slots_per_gpu = math.ceil((arch.num_local_experts + redundant_slots) / gpus)
    return Topology(nodes=nodes, gpus_per_node=gpus_per_node, slots_per_gpu=slots_per_gpu)


def fits_topology(
    placement: ExpertPlacement, topology: Topology, layers: int, experts: int
) -> bool:
    """Whether `placement` is a valid plan for this topology: its shape, one row per MoE layer,
    every expert held and no unknown id."""
    return (
        placement.nodes == topology.nodes
        and placement.gpus_per_node == topology.gpus_per_node
        and placement.slots_per_gpu == topology.slots_per_gpu
        and len(placement.phy2log) == layers
        and all(sorted(set(row)) == list(range(experts)) for row in placement.phy2log)
    )


def plan_initial_experts(
    arch: CustomArchitecture,
    layout: Layout,
    redundant_slots: int,
    previous: ExpertPlacement | None = None,
) -> ExpertLayout:
    """The expert placement: `previous` verbatim while it still fits the layout (it may be a
    plan the rebalance loop made from measured load, which a resync must not undo); else a plan
    for uniform load (no load is measured yet), with the version bumped past `previous`."""
    topology = expert_topology(arch, layout, redundant_slots)
    layers, experts = arch.moe_layer_count, arch.num_local_experts
    if previous is not None and fits_topology(previous, topology, layers, experts):
        placement = previous
    else:
        plan = plan_experts(topology, layers, experts)
        placement = ExpertPlacement(
            nodes=topology.nodes,
            gpus_per_node=topology.gpus_per_node,
            slots_per_gpu=topology.slots_per_gpu,
            phy2log=plan.phy2log.tolist(),
            version=0 if previous is None else previous.version + 1,
        )
    gpu_load = placement_metrics.dispatch(
        np.asarray(placement.phy2log, dtype=np.int64), topology, uniform_load(layers, experts)
    ).gpu_load
    return ExpertLayout(placement=placement, balance=placement_metrics.balance(gpu_load))


def serving_architecture(arch: CustomArchitecture, max_context: int) -> ModelArchitecture:
    """The serving package's architecture. Without chunked attention every layer attends over
    the whole context with RoPE: a chunk as long as the context and no NoPE layer say the same."""
    chunk = arch.attention_chunk_size
    no_rope_interval = arch.no_rope_layer_interval
    if chunk is None:
        chunk = max(max_context, 1)
        no_rope_interval = arch.num_hidden_layers + 1
    return ModelArchitecture(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        intermediate_size_mlp=arch.intermediate_size_mlp or arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        num_local_experts=arch.num_local_experts,
        num_experts_per_tok=arch.num_experts_per_tok,
        interleave_moe_layer_step=arch.interleave_moe_layer_step,
        attention_chunk_size=chunk,
        no_rope_layer_interval=no_rope_interval,
        max_position_embeddings=max_context,
    )


def parse_extra_args(extra: dict[str, str]) -> dict[str, EngineArgValue]:
    """`engine.extraArgs` values are strings in the CRD; read "true", "4", "0.9" as YAML scalars
    and "{key: value}" as a flat mapping (vLLM's nested arguments, e.g. `eplb_config`)."""
    parsed: dict[str, EngineArgValue] = {}
    for key, text in extra.items():
        try:
            value = yaml.safe_load(text) if text else text
        except yaml.YAMLError:
            value = text
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in value.items()
        ):
            parsed[key] = value
        else:
            parsed[key] = value if isinstance(value, str | int | float | bool) else text
    return parsed


def engine_args(
    spec: Llama4DeploymentSpec, layout: Layout, experts: ExpertPlacement | None = None
) -> dict[str, EngineArgValue]:
    """Engine arguments: for vLLM its parallelism and, with expert parallelism, the shape of
    the expert plan (`experts`: its slots beyond one per expert are vLLM's redundant experts,
    which its own EPLB places), then the user's extras. The batching limits travel in the
    config's `batching`, which the engine reads."""
    args: dict[str, EngineArgValue] = {}
    if spec.engine.name == "vllm":
        args = {
            "tensor_parallel_size": layout.tensor,
            "pipeline_parallel_size": layout.pipeline,
        }
        if layout.data > 1:
            args["data_parallel_size"] = layout.data
        # Expert parallelism over one GPU is none: vLLM (and its EPLB) stay off it.
        if layout.expert_parallel and layout.expert_width > 1 and experts is not None:
            args.update(
                vllm_expert_parallel_args(
                    experts.phy2log,
                    experts=architecture_of(spec.model).num_local_experts,
                    engine_rebalances=spec.placement.rebalance.enabled,
                )
            )
        if spec.model.quantization == "fp8":
            args["quantization"] = "fp8"
    args.update(parse_extra_args(spec.engine.extra_args))
    return args


def expert_balancer(spec: Llama4DeploymentSpec, args: Mapping[str, Any]) -> ExpertBalancer:
    """Who keeps the experts balanced: `operator` (the reference engine takes the operator's
    plans), `vllm-eplb` (vLLM's own balancer, on with expert parallelism) or `none`."""
    if spec.engine.name == "reference":
        return "operator" if spec.placement.rebalance.enabled else "none"
    return "vllm-eplb" if args.get("enable_eplb") is True else "none"


def serving_config(
    spec: Llama4DeploymentSpec,
    name: str,
    layout: Layout,
    replicas: int,
    experts: ExpertPlacement | None,
    accelerator_resource: str = "GPU",
    *,
    namespace: str = "",
    metrics_port: int = ENGINE_METRICS_PORT,
) -> ServingConfig:
    """The `args` of the Serve application for this spec and plan. `accelerator_resource` is
    the Ray resource an expert shard takes (`GPU`, or a custom one on a CPU demo cluster).
    `namespace` and `name` label the replicas' metrics targets (so PromQL selects this
    deployment's series, whatever the served model name);
    `metrics_port` 0 lets replicas sharing a host (external Ray) each pick a free port."""
    model = spec.model
    weights = model.weights
    api_key_file = None
    if spec.serving.api_key_secret_ref is not None:
        api_key_file = f"{API_KEY_MOUNT_DIR}/{spec.serving.api_key_secret_ref.key}"
    return ServingConfig(
        served_model_name=model.served_model_name or name,
        architecture=serving_architecture(architecture_of(model), model.max_context_length),
        weights=WeightsSource(
            kind=weights.source,
            uri=weights_uri_of(model),
            tokenizer_path=weights.tokenizer_path,
            seed=weights.seed,
        ),
        quantization=model.quantization,
        engine=spec.engine.name,
        engine_args=engine_args(spec, layout, experts),
        num_replicas=replicas,
        # A request that finds the deployment scaled to zero waits for a replica to start.
        first_output_timeout_s=FIRST_OUTPUT_TIMEOUT_S
        + (spec.autoscaling.cold_start_seconds if spec.autoscaling.scales_to_zero else 0),
        # vLLM takes no external plan: its own EPLB balances the experts.
        placement=experts if spec.engine.name == "reference" else None,
        batching=BatchingLimits(
            max_num_seqs=spec.serving.batching.max_num_seqs,
            max_num_batched_tokens=spec.serving.batching.max_num_batched_tokens,
            max_model_len=model.max_context_length,
        ),
        api_key_file=api_key_file,
        accelerator_resource=accelerator_resource,
        metrics_port=metrics_port,
        metrics_target_labels={
            **({"namespace": namespace} if namespace else {}),
            DEPLOYMENT_SERIES_LABEL: name,
        },
    )


def serve_application(config: ServingConfig, app_name: str, route_prefix: str) -> dict[str, Any]:
    """One application of a Ray Serve config (the multi-application schema). What changes at
    run time (replicas, expert plan, batching) is a deployment-level override of `LLMServer`;
    `args` stay byte-identical across such changes, so Serve applies them without replacing
    replicas (see `application_args`)."""
    return {
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": application_args(config),
        "deployments": [llm_server_overrides(config)],
    }


def serve_config_v2(config: ServingConfig, app_name: str, request_timeout_s: float) -> str:
    """A RayService's `serveConfigV2`: YAML of the Serve config with one application at `/`.
    The proxy ends each request after `request_timeout_s` (408), so none waits forever on a
    replica that is gone."""
    document = {
        "http_options": {
            "host": "0.0.0.0",
            "port": SERVE_HTTP_PORT,
            "request_timeout_s": request_timeout_s,
        },
        "applications": [serve_application(config, app_name, "/")],
    }
    return yaml.safe_dump(document, sort_keys=False)

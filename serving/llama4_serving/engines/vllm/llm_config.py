"""The `ray.serve.llm` `LLMConfig` of a `ServingConfig` with `engine: vllm`, as plain data.

Pure (no Ray, no vLLM import), so the operator's tests can check every rendered config against
Ray's own `LLMConfig` and vLLM's `AsyncEngineArgs` without starting anything.
"""

from __future__ import annotations

from typing import Any

from llama4_serving.config import (
    CPU_KV_CACHE_GIB,
    PROJECT_ENGINE_ARGS,
    REPLICA_NUM_CPUS,
    EngineArgValue,
    ServingConfig,
    engine_number,
    max_ongoing_requests,
    replica_count_options,
)

GPU = "GPU"
DEFAULT_CPU_KV_CACHE_GIB = 1  # vLLM's own default (4 GiB) is more than a tiny CPU model needs
# Activations and unquantised weights; fp8 and int4 weights are formats vLLM reads from the
# checkpoint's own quantization config (or `quantization: fp8` quantises bf16 weights online).
DTYPE = "bfloat16"
TOOL_CALLING: dict[str, EngineArgValue] = {
    "enable_auto_tool_choice": True,
    "tool_call_parser": "llama4_pythonic",
}


class VLLMConfigError(ValueError):
    """The config cannot be served by vLLM; the message names the field and the fix."""


def on_cpu(config: ServingConfig) -> bool:
    """vLLM runs on CPU where the cluster declares a custom accelerator resource (local and test
    clusters; the Ray image carries vLLM's CPU build there) and on GPUs where it is `GPU`."""
    return config.accelerator_resource != GPU


def model_source(config: ServingConfig) -> str:
    """The directory (or Hugging Face repo id, from the local cache) vLLM loads."""
    weights = config.weights
    if weights.kind == "random" or not weights.uri:
        raise VLLMConfigError(
            "weights: the vllm engine loads a checkpoint; set spec.model.weights.source to "
            "'path' (a directory with config.json, safetensors and a tokenizer) or "
            "'huggingface' with a uri, or use engine.name: reference for random weights"
        )
    return weights.uri


def engine_kwargs(config: ServingConfig) -> dict[str, EngineArgValue]:
    """vLLM's engine arguments: the batching limits, the dtype, tool calling, then the rendered
    and user-given `engine_args` (less the project's own keys)."""
    kwargs: dict[str, EngineArgValue] = {
        "max_model_len": config.batching.max_model_len,
        "max_num_seqs": config.batching.max_num_seqs,
        "max_num_batched_tokens": config.batching.max_num_batched_tokens,
        "dtype": DTYPE,
    }
    if config.weights.tokenizer_path:
        kwargs["tokenizer"] = config.weights.tokenizer_path
    # Tool calls in the format Llama 4 was trained on (a named or required tool choice needs a
    # parser too); a user's engine arguments may name another.
    kwargs.update(TOOL_CALLING)
    if on_cpu(config):
        # The local Ray nodes are CPU nodes: no CUDA graphs to capture.
        kwargs["enforce_eager"] = True
    kwargs.update({k: v for k, v in config.engine_args.items() if k not in PROJECT_ENGINE_ARGS})
    return kwargs


def placement_bundles(config: ServingConfig) -> list[dict[str, float]] | None:
    """Ray resources of one replica. On GPUs `ray.serve.llm` derives them from the parallelism
    (None); on CPU one bundle with the replica's CPUs and one unit of the custom accelerator
    resource, so the operator's GPU accounting and Ray's agree."""
    if not on_cpu(config):
        return None
    cpus = engine_number(config, REPLICA_NUM_CPUS, 1)
    return [{"CPU": cpus, config.accelerator_resource: 1.0}]


def llm_config(config: ServingConfig) -> dict[str, Any]:
    """`LLMConfig` fields for `ray.serve.llm.build_openai_app`."""
    if config.engine != "vllm":
        raise VLLMConfigError(f"engine: {config.engine!r} is not vllm")
    if config.placement is not None:
        raise VLLMConfigError(
            "placement: vLLM takes no external expert placement; it balances experts itself "
            "(EPLB, engine argument enable_eplb)"
        )
    loading: dict[str, Any] = {
        "model_id": config.served_model_name,
        "model_source": model_source(config),
    }
    env_vars: dict[str, str] = {}
    if on_cpu(config):
        space = engine_number(config, CPU_KV_CACHE_GIB, DEFAULT_CPU_KV_CACHE_GIB)
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = f"{space:g}"
        # vLLM pins its CPU threads to the first cores it is allowed. Pods without exclusive
        # cpusets (no static CPU manager) are allowed every core, so every engine on a node
        # would pin to core 0 and starve the others (found with two replicas on one node:
        # the second engine took over 5 minutes to build); the kernel schedules them instead.
        env_vars["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    result: dict[str, Any] = {
        "model_loading_config": loading,
        "engine_kwargs": engine_kwargs(config),
        "deployment_config": {
            **replica_count_options(config.num_replicas),
            "max_ongoing_requests": max_ongoing_requests(config.batching),
        },
        "log_engine_metrics": True,
        "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", **env_vars}},
    }
    bundles = placement_bundles(config)
    if bundles is not None:
        result["placement_group_config"] = {"bundles": bundles}
        # The replica actor only relays to the engine process; without this Ray adds a CPU of
        # its own to the first bundle.
        result["deployment_config"]["ray_actor_options"] = {"num_cpus": 0}
    return result

"""Builds the reference engine's model and tokenizer from local files only (never a hub)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import Llama4ForCausalLM, Llama4TextConfig, PreTrainedTokenizerFast

from llama4_serving.config import ModelArchitecture, ServingConfig, WeightsSource


class WeightsError(ValueError):
    """The weights or tokenizer named by the configuration cannot be loaded."""


def text_config(arch: ModelArchitecture) -> Llama4TextConfig:
    """The `transformers` configuration of the architecture the operator describes."""
    return Llama4TextConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        intermediate_size_mlp=arch.intermediate_size_mlp,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        num_local_experts=arch.num_local_experts,
        num_experts_per_tok=arch.num_experts_per_tok,
        interleave_moe_layer_step=arch.interleave_moe_layer_step,
        attention_chunk_size=arch.attention_chunk_size,
        no_rope_layer_interval=arch.no_rope_layer_interval,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position_embeddings,
    )


def default_device() -> torch.device:
    """The replica's GPU when Ray gave it one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype() -> torch.dtype:
    """bf16 on GPUs; float32 on CPU, where bf16 matmuls are slow and imprecise."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _local_dir(source: WeightsSource) -> Path:
    if source.kind == "path":
        path = Path(source.uri)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            path = Path(snapshot_download(source.uri, local_files_only=True))
        except Exception as error:
            raise WeightsError(
                f"weights.uri {source.uri!r} is not in the local Hugging Face cache "
                f"({error}); download it into the cache first, or use kind 'path'"
            ) from error
    if not path.is_dir():
        raise WeightsError(f"weights.uri {str(path)!r} is not a directory with safetensors files")
    return path


def load_model(config: ServingConfig, dtype: torch.dtype | None = None) -> Llama4ForCausalLM:
    """Random weights for `kind: random` (seeded), else safetensors from a local directory."""
    dtype = dtype or default_dtype()
    source = config.weights
    if source.kind == "random":
        torch.manual_seed(source.seed)
        model = Llama4ForCausalLM(text_config(config.architecture))
        torch.nn.Module.to(model, default_device(), dtype)
        return model.eval()  # type: ignore[no-any-return]
    directory = _local_dir(source)
    if not any(directory.glob("*.safetensors")):
        raise WeightsError(f"weights.uri {str(directory)!r} holds no *.safetensors file")
    model = Llama4ForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    loaded = model.config
    expected = text_config(config.architecture)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_local_experts"):
        if getattr(loaded, name) != getattr(expected, name):
            raise WeightsError(
                f"architecture.{name} is {getattr(expected, name)} but the checkpoint in "
                f"{directory} has {getattr(loaded, name)}: make the two agree"
            )
    torch.nn.Module.to(model, default_device())
    return model.eval()  # type: ignore[no-any-return]


def load_tokenizer(config: ServingConfig) -> PreTrainedTokenizerFast:
    """The tokenizer from `weights.tokenizer_path`, else from the weights directory."""
    source = config.weights
    if source.tokenizer_path:
        directory = Path(source.tokenizer_path)
    elif source.kind == "random":
        raise WeightsError(
            "weights.tokenizer_path is required with kind 'random': random weights come "
            "with no tokenizer files"
        )
    else:
        directory = _local_dir(source)
    if not (directory / "tokenizer.json").is_file():
        raise WeightsError(f"no tokenizer.json in {str(directory)!r}: set weights.tokenizer_path")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise WeightsError(f"{directory} does not hold a fast tokenizer (tokenizer.json)")
    return tokenizer

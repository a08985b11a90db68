"""A tiny random Llama 4 checkpoint and tokenizer made locally (tests, benchmarks, the demo).

Nothing can be downloaded here, so the files are written with `transformers`' `save_pretrained`
(safetensors) and a byte-level BPE tokenizer trained by the `tokenizers` library on a few lines.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Llama4ForCausalLM, PreTrainedTokenizerFast

from llama4_serving.config import ModelArchitecture
from llama4_serving.engines.reference.loader import text_config

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Llama 4 interleaves dense and sparse layers, with chunked attention.",
    "Kubernetes operators reconcile the desired state of a cluster.",
    "Ray Serve replicas answer requests with continuous batching.",
    "Hello, world! How are you today? I am fine, thank you.",
]


def tiny_architecture(**overrides: int | float) -> ModelArchitecture:
    """Hidden 64, 4 layers (MoE every second one), 4 experts, vocab up to 512, chunk 8."""
    values: dict[str, int | float] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 64,
        "intermediate_size_mlp": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 4,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": 8,
        "no_rope_layer_interval": 4,
        "max_position_embeddings": 512,
    }
    values.update(overrides)
    return ModelArchitecture.model_validate(values)


def write_tokenizer(directory: Path, vocab_size: int) -> int:
    """Train a byte-level BPE on the corpus, save it as a `PreTrainedTokenizerFast`, return its
    vocabulary size (at most `vocab_size`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|end_of_text|>",
    )
    fast.save_pretrained(directory)
    return len(fast)


def write_tiny_model(
    directory: Path, arch: ModelArchitecture | None = None, seed: int = 0
) -> ModelArchitecture:
    """Write random weights (safetensors) and a tokenizer into `directory`; return the shape."""
    arch = arch or tiny_architecture()
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory, vocab_size=arch.vocab_size)
    # A few sentences give fewer merges than asked for: size the model to the real vocabulary,
    # so that every token the model can emit decodes to text.
    arch = arch.model_copy(update={"vocab_size": vocab})
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(text_config(arch))
    model.save_pretrained(directory, safe_serialization=True)
    return arch

"""A tiny random Llama 4 checkpoint and tokenizer made locally (tests, benchmarks, the demo).

Nothing can be downloaded here, so the files are written with `transformers`' `save_pretrained`
(safetensors) and a byte-level BPE tokenizer trained by the `tokenizers` library on a few lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Llama4ForCausalLM, PreTrainedTokenizerFast

from llama4_serving.config import ModelArchitecture
from llama4_serving.engines.reference.loader import text_config
from llama4_serving.openai_protocol import DEFAULT_CHAT_TEMPLATE

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


def engine_tiny_architecture() -> ModelArchitecture:
    """The tiny model both engines load, in the shape vLLM's CPU build is known to serve: larger
    than `tiny_architecture` (hidden 256, head 64, 8 experts, every layer MoE, chunk 2048;
    about 17M parameters)."""
    return tiny_architecture(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        intermediate_size_mlp=512,
        head_dim=64,
        num_local_experts=8,
        interleave_moe_layer_step=1,
        attention_chunk_size=2048,
        max_position_embeddings=4096,
    )


# Llama 4's image tokens, as the released checkpoints name them (Llama4Processor's defaults).
IMAGE_TOKENS = [
    "<|image|>",
    "<|patch|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
]
TINY_IMAGE_SIZE = 56  # pixels: 4 x 4 patches of 14


def write_tokenizer(
    directory: Path, vocab_size: int, extra_special: list[str] | None = None
) -> int:
    """Train a byte-level BPE on the corpus, save it as a `PreTrainedTokenizerFast`, return its
    vocabulary size (at most `vocab_size`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + (extra_special or []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|end_of_text|>",
    )
    # Servers that apply the tokenizer's own template (vLLM) and the reference engine agree.
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
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


def write_tiny_multimodal_model(directory: Path, seed: int = 0) -> ModelArchitecture:
    """The same text model inside a `Llama4ForConditionalGeneration` with a tiny vision tower
    (hidden 64, 2 layers, 56-pixel tiles of 14-pixel patches, pixel shuffle 0.5), its image
    processor and processor, and the image tokens in the tokenizer: Llama 4 is natively
    multimodal, and vLLM serves image parts for this layout."""
    from transformers import (  # noqa: PLC0415  (only this writer needs them)
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4ImageProcessor,
        Llama4Processor,
        Llama4VisionConfig,
    )

    arch = engine_tiny_architecture()
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory, arch.vocab_size, IMAGE_TOKENS)
    arch = arch.model_copy(update={"vocab_size": vocab})
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in IMAGE_TOKENS}
    vision_output = 128
    vision = Llama4VisionConfig(
        hidden_size=64,
        intermediate_size=256,  # 4 x hidden: what the pixel shuffle's MLP expects
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        vision_output_dim=vision_output,
        projector_input_dim=vision_output,
        projector_output_dim=vision_output,
    )
    config = Llama4Config(
        vision_config=vision.to_dict(),
        text_config=text_config(arch).to_dict(),
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
    )
    torch.manual_seed(seed)
    Llama4ForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    image_processor = Llama4ImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        max_patches=4,
        resize_to_max_canvas=False,
    )
    # transformers' Llama 4 chat template (the processor's default) places <|image|> per part.
    Llama4Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return arch


def main(argv: list[str] | None = None) -> None:
    """`python -m llama4_serving.tiny DIR`: write the tiny checkpoint both engines load."""
    parser = argparse.ArgumentParser(
        prog="python -m llama4_serving.tiny",
        description="Write a tiny random Llama 4 checkpoint (safetensors, config.json) with a "
        "byte-level BPE tokenizer and a chat template, loadable by vLLM and the reference engine.",
    )
    parser.add_argument("directory", type=Path, help="where to write it (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--multimodal",
        action="store_true",
        help="write a Llama4ForConditionalGeneration with a tiny vision tower and its processor",
    )
    args = parser.parse_args(argv)
    if args.multimodal:
        arch = write_tiny_multimodal_model(args.directory, seed=args.seed)
    else:
        arch = write_tiny_model(args.directory, engine_tiny_architecture(), seed=args.seed)
    print(
        f"wrote a tiny Llama 4 ({arch.num_hidden_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_local_experts} experts, vocabulary {arch.vocab_size}) to {args.directory}"
    )


if __name__ == "__main__":
    main()

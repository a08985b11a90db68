"""The built-in model catalog: the architectures behind `model.variant` scout, maverick, behemoth.

Scout and Maverick are the published Hugging Face `Llama4TextConfig`s (model cards:
https://huggingface.co/meta-llama/Llama-4-Scout-17B-16E-Instruct and
https://huggingface.co/meta-llama/Llama-4-Maverick-17B-128E-Instruct, April 2025): 48 layers,
hidden 5120, expert FFN 8192, 40 query / 8 KV heads of 128, vocabulary 202,048, iRoPE with
8,192-token chunks and a global layer every 4th; Scout 16 experts on every layer (109B total /
17B active, 10M-token context), Maverick 128 experts on every other layer with dense FFN 16384
in between (400B / 17B, 1M context).

Behemoth's configuration is not published. Meta's announcement (https://ai.meta.com/blog/
llama-4-multimodal-intelligence/) reports about 2T total and 288B active parameters with 16
experts; the entry below is an assumed architecture chosen to match those totals (about 2.0T /
0.27T by `ModelFootprint`), good for capacity planning and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama4_operator.api.models import CustomArchitecture, ModelSpec


@dataclass(frozen=True)
class CatalogEntry:
    """A built-in model: its architecture, published context and weights repository."""

    display_name: str
    architecture: CustomArchitecture
    published_context: int
    huggingface_repo: str
    estimated: bool = False


_LLAMA4_COMMON = {
    "num_hidden_layers": 48,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 202048,
    "num_experts_per_tok": 1,
    "num_shared_experts": 1,
    "attention_chunk_size": 8192,
    "no_rope_layer_interval": 4,
}

CATALOG: dict[str, CatalogEntry] = {
    "scout": CatalogEntry(
        display_name="Llama 4 Scout 17B-16E",
        architecture=CustomArchitecture.model_validate(
            {**_LLAMA4_COMMON, "num_local_experts": 16, "interleave_moe_layer_step": 1}
        ),
        published_context=10_485_760,
        huggingface_repo="meta-llama/Llama-4-Scout-17B-16E-Instruct",
    ),
    "maverick": CatalogEntry(
        display_name="Llama 4 Maverick 17B-128E",
        architecture=CustomArchitecture.model_validate(
            {
                **_LLAMA4_COMMON,
                "num_local_experts": 128,
                "interleave_moe_layer_step": 2,
                "intermediate_size_mlp": 16384,
            }
        ),
        published_context=1_048_576,
        huggingface_repo="meta-llama/Llama-4-Maverick-17B-128E-Instruct",
    ),
    "behemoth": CatalogEntry(
        display_name="Llama 4 Behemoth (estimated)",
        architecture=CustomArchitecture(
            num_hidden_layers=64,
            hidden_size=16384,
            intermediate_size=36864,
            num_attention_heads=128,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=202048,
            num_local_experts=16,
            num_experts_per_tok=1,
            num_shared_experts=1,
            attention_chunk_size=8192,
            no_rope_layer_interval=4,
        ),
        published_context=1_048_576,
        huggingface_repo="",
        estimated=True,
    ),
}


def architecture_of(model: ModelSpec) -> CustomArchitecture:
    """The architecture of a model spec: the catalog's, or the custom one."""
    if model.architecture is not None:
        return model.architecture
    return CATALOG[model.variant].architecture


def weights_uri_of(model: ModelSpec) -> str:
    """The weights location: the spec's `uri`, or the catalog model's published repository."""
    if model.weights.uri or model.variant == "custom":
        return model.weights.uri
    return CATALOG[model.variant].huggingface_repo

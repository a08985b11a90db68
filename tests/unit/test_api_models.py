"""The Llama4Deployment spec models: defaults, wire names, and the errors users see."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llama4_operator.api.catalog import CATALOG, architecture_of, weights_uri_of
from llama4_operator.api.models import CustomArchitecture, Llama4DeploymentSpec
from llama4_operator.planners.fit import footprint

MIXTRAL_8X22B = {
    # Mistral AI's published config for Mixtral-8x22B-v0.1.
    "numHiddenLayers": 56,
    "hiddenSize": 6144,
    "intermediateSize": 16384,
    "numAttentionHeads": 48,
    "numKeyValueHeads": 8,
    "headDim": 128,
    "vocabSize": 32768,
    "numLocalExperts": 8,
    "numExpertsPerTok": 2,
    "numSharedExperts": 0,
}
DEEPSEEK_V3 = {
    # DeepSeek-V3's published config (config.json of deepseek-ai/DeepSeek-V3).
    "numHiddenLayers": 61,
    "hiddenSize": 7168,
    "intermediateSize": 2048,
    "intermediateSizeMlp": 18432,
    "numAttentionHeads": 128,
    "numKeyValueHeads": 128,
    "headDim": 128,
    "vocabSize": 129280,
    "numLocalExperts": 256,
    "numExpertsPerTok": 8,
    "numSharedExperts": 1,
    "firstKDenseLayers": 3,
    "numExpertGroups": 8,
    "topKGroups": 4,
    "kvLoraRank": 512,
    "qkRopeHeadDim": 64,
}
HF_MIXTRAL = {"source": "huggingface", "uri": "mistralai/Mixtral-8x22B-v0.1"}
HF_DEEPSEEK = {"source": "huggingface", "uri": "deepseek-ai/DeepSeek-V3"}


def spec(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": {"variant": "scout"}}
    body.update(overrides)
    return body


def error_text(body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        Llama4DeploymentSpec.model_validate(body)
    return str(caught.value)


def test_minimal_spec_gets_documented_defaults() -> None:
    parsed = Llama4DeploymentSpec.model_validate(spec())
    assert parsed.replicas == 1
    assert parsed.model.quantization == "bf16"
    assert parsed.engine.name == "vllm"
    assert parsed.resources.parallelism.strategy == "auto"
    assert parsed.autoscaling.enabled is False
    assert parsed.serving.port == 8000
    assert parsed.monitoring.service_monitor is False


def test_wire_names_are_camel_case_both_ways() -> None:
    parsed = Llama4DeploymentSpec.model_validate(
        spec(model={"variant": "maverick", "maxContextLength": 65536})
    )
    assert parsed.model.max_context_length == 65536
    dumped = parsed.model_dump(mode="json")
    assert dumped["model"]["maxContextLength"] == 65536
    assert "max_context_length" not in dumped["model"]


def test_unknown_variant_names_the_field_and_the_choices() -> None:
    text = error_text(spec(model={"variant": "llama5"}))
    assert "model.variant" in text
    assert "'scout', 'maverick', 'behemoth' or 'custom'" in text


def test_unknown_quantization_is_rejected() -> None:
    text = error_text(spec(model={"variant": "scout", "quantization": "int8"}))
    assert "model.quantization" in text


def test_negative_gpus_per_node_is_rejected() -> None:
    text = error_text(spec(resources={"gpusPerNode": -1}))
    assert "resources.gpusPerNode" in text


def test_unknown_field_is_rejected_not_ignored() -> None:
    text = error_text(spec(replica=2))
    assert "replica" in text


def test_autoscaling_min_above_max_is_rejected() -> None:
    text = error_text(spec(autoscaling={"minReplicas": 5, "maxReplicas": 2}))
    assert "minReplicas (5) must not exceed autoscaling.maxReplicas (2)" in text


def test_custom_variant_requires_architecture() -> None:
    text = error_text(spec(model={"variant": "custom"}))
    assert "model.architecture is required" in text


def test_catalog_variant_refuses_an_architecture() -> None:
    text = error_text(spec(model={"variant": "scout", "architecture": MIXTRAL_8X22B}))
    assert "must be omitted" in text


def test_manual_parallelism_needs_its_sizes() -> None:
    text = error_text(spec(resources={"parallelism": {"strategy": "manual", "tensor": 8}}))
    assert "required when strategy is manual" in text


def test_mixtral_is_expressible_and_counts_about_141b_parameters() -> None:
    parsed = Llama4DeploymentSpec.model_validate(
        spec(model={"variant": "custom", "architecture": MIXTRAL_8X22B, "weights": HF_MIXTRAL})
    )
    arch = architecture_of(parsed.model)
    assert arch.num_experts_per_tok == 2
    assert arch.moe_layer_count == 56
    # Mistral's announcement: about 141B total, 39B active.
    model = footprint(arch)
    assert model.total_params == pytest.approx(141e9, rel=0.02)
    assert model.active_params == pytest.approx(39e9, rel=0.03)


def test_deepseek_v3_is_expressible_with_dense_layers_and_groups() -> None:
    parsed = Llama4DeploymentSpec.model_validate(
        spec(model={"variant": "custom", "architecture": DEEPSEEK_V3, "weights": HF_DEEPSEEK})
    )
    arch = architecture_of(parsed.model)
    assert arch.moe_layer_count == 58  # 61 layers, the first 3 dense
    assert not arch.is_moe_layer(2)
    assert arch.is_moe_layer(3)
    # 671B total per DeepSeek's report; attention is counted as if it were GQA (an over-estimate).
    assert footprint(arch).total_params == pytest.approx(671e9, rel=0.05)


def test_reference_engine_refuses_non_llama4_features() -> None:
    text = error_text(
        spec(
            model={"variant": "custom", "architecture": DEEPSEEK_V3, "weights": HF_DEEPSEEK},
            engine={"name": "reference"},
        )
    )
    assert "engine.name: reference runs the Llama 4 architecture only" in text


def test_heads_must_group_evenly() -> None:
    with pytest.raises(ValidationError, match="multiple of numKeyValueHeads"):
        CustomArchitecture.model_validate({**MIXTRAL_8X22B, "numKeyValueHeads": 7})


def test_catalog_matches_the_model_cards() -> None:
    # Totals from the model cards: Scout 109B, Maverick 400B (17B active each). Scout's 109B
    # includes the vision encoder, which a text-only count leaves out.
    scout = footprint(CATALOG["scout"].architecture)
    maverick = footprint(CATALOG["maverick"].architecture)
    assert scout.total_params == pytest.approx(109e9, rel=0.02)
    assert maverick.total_params == pytest.approx(400e9, rel=0.01)
    assert scout.active_params == pytest.approx(17e9, rel=0.02)
    assert maverick.active_params == pytest.approx(17e9, rel=0.02)
    assert CATALOG["maverick"].architecture.moe_layer_count == 24
    behemoth = footprint(CATALOG["behemoth"].architecture)
    assert behemoth.total_params == pytest.approx(2e12, rel=0.05)


def test_catalog_weights_default_to_the_published_repository() -> None:
    parsed = Llama4DeploymentSpec.model_validate(spec())
    assert weights_uri_of(parsed.model) == "meta-llama/Llama-4-Scout-17B-16E-Instruct"

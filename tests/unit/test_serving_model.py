"""The reference engine's batched forward agrees with `transformers`' own Llama 4 forward."""

from __future__ import annotations

import pytest
import torch
from transformers import Llama4ForCausalLM

from llama4_serving.engines.reference.loader import text_config
from llama4_serving.engines.reference.model import BatchedLlama4, KVCache, SequenceChunk
from llama4_serving.tiny import tiny_architecture


def _model(**overrides: int | float) -> Llama4ForCausalLM:
    torch.manual_seed(1)
    config = text_config(tiny_architecture(vocab_size=200, **overrides))
    model = Llama4ForCausalLM(config)
    model.eval()
    return model


@pytest.mark.parametrize("experts_per_token", [1, 2])
def test_mixed_prefill_and_decode_match_transformers(experts_per_token: int) -> None:
    model = _model(num_experts_per_tok=experts_per_token)
    batched = BatchedLlama4(model)
    ids = torch.randint(0, 200, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(ids).logits  # one full forward per sequence, no cache
    first, second = KVCache.empty(4), KVCache.empty(4)
    # Unequal prompt lengths in one batch; positions cross the 8-token attention chunks.
    result = batched.step(
        [SequenceChunk(ids[0, :13].tolist(), first), SequenceChunk(ids[1, :5].tolist(), second)]
    )
    torch.testing.assert_close(result.logits[0], reference[0, 12])
    torch.testing.assert_close(result.logits[1], reference[1, 4])
    for step in range(8):
        # One decode token for the first sequence, a two-token prefill chunk for the second.
        chunk = ids[1, 5 + 2 * step : 7 + 2 * step].tolist()
        result = batched.step(
            [SequenceChunk([int(ids[0, 13 + step])], first), SequenceChunk(chunk, second)]
        )
        torch.testing.assert_close(result.logits[0], reference[0, 13 + step])
        torch.testing.assert_close(result.logits[1], reference[1, 6 + 2 * step])
    assert first.length == 21
    assert second.length == 21


def test_routed_token_counts_cover_every_token_of_each_moe_layer() -> None:
    model = _model(num_experts_per_tok=2)
    result = BatchedLlama4(model).step([SequenceChunk(list(range(10)), KVCache.empty(4))])
    assert len(result.routed_tokens) == len(model.config.moe_layers or []) == 2
    for counts in result.routed_tokens:
        assert int(counts.sum()) == 10 * 2


def test_temperature_tuning_of_global_layers_matches_transformers() -> None:
    # A small floor_scale makes the NoPE layers' query scaling differ from 1 at short lengths.
    torch.manual_seed(2)
    config = text_config(tiny_architecture(vocab_size=200))
    config.floor_scale = 4
    model = Llama4ForCausalLM(config).eval()
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = model(ids).logits[0, -1]
    cache = KVCache.empty(4)
    batched = BatchedLlama4(model)
    batched.step([SequenceChunk(ids[0, :11].tolist(), cache)])
    result = batched.step([SequenceChunk([int(ids[0, 11])], cache)])
    torch.testing.assert_close(result.logits[0], reference)


def test_empty_chunk_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        BatchedLlama4(_model()).step([SequenceChunk([], KVCache.empty(4))])

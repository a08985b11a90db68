"""Continuous batching, sampling and stop conditions of the reference engine (in process)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import GenerationConfig, Llama4ForCausalLM, PreTrainedTokenizerFast

from llama4_serving.config import BatchingLimits, ModelArchitecture, ServingConfig, WeightsSource
from llama4_serving.engines.reference.engine import (
    AsyncEngine,
    ReferenceEngine,
    RequestOutput,
    RequestRejectedError,
)
from llama4_serving.engines.reference.loader import WeightsError, load_model, load_tokenizer
from llama4_serving.engines.reference.model import (
    BatchedLlama4,
    LocalExperts,
    SequenceChunk,
    StepResult,
)
from llama4_serving.engines.reference.sampling import SamplingParams, sample_token
from llama4_serving.metrics import EngineMetrics
from llama4_serving.tiny import write_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ServingConfig:
    directory = tmp_path_factory.mktemp("tiny")
    arch = write_tiny_model(directory)
    return ServingConfig(
        served_model_name="tiny",
        architecture=arch,
        weights=WeightsSource(kind="path", uri=str(directory)),
        batching=BatchingLimits(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64),
    )


@pytest.fixture(scope="module")
def model(config: ServingConfig) -> Llama4ForCausalLM:
    return load_model(config)


@pytest.fixture(scope="module")
def tokenizer(config: ServingConfig) -> PreTrainedTokenizerFast:
    return load_tokenizer(config)


def _engine(
    model: Llama4ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    limits: BatchingLimits,
    metrics: EngineMetrics | None = None,
) -> ReferenceEngine:
    return ReferenceEngine(BatchedLlama4(model), tokenizer, limits, metrics)


def _run(
    engine: ReferenceEngine, prompts: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {name: [] for name in prompts}
    for name, (ids, params) in prompts.items():
        engine.add_request(name, ids, params, outputs[name].append)
    engine.run_until_idle()
    return outputs


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def test_greedy_output_equals_transformers_generate(
    config: ServingConfig, model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    ids = tokenizer.encode(PROMPT)
    with torch.inference_mode():
        # transformers' decorated `generate` is typed with `self` twice; the call is fine.
        expected = model.generate(  # type: ignore[misc]
            torch.tensor([ids]),
            generation_config=GenerationConfig(
                max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            ),
        )[0, len(ids) :].tolist()
    engine = _engine(model, tokenizer, config.batching)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = _run(engine, {"a": (ids, params)})["a"]
    assert _tokens(outputs) == expected
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].completion_tokens == 12
    assert outputs[-1].prompt_tokens == len(ids)


def test_seeded_request_samples_the_same_tokens_alone_or_in_a_batch(
    config: ServingConfig, model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    ids = tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = _run(_engine(model, tokenizer, config.batching), {"a": (ids, params)})["a"]
    crowd = {
        f"other{i}": (tokenizer.encode(f"Ray Serve {i}"), SamplingParams(max_tokens=5 + i))
        for i in range(5)
    }
    together = _run(_engine(model, tokenizer, config.batching), {"a": (ids, params), **crowd})
    assert _tokens(together["a"]) == _tokens(alone)
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True)
    different = _run(_engine(model, tokenizer, config.batching), {"a": (ids, other_seed)})["a"]
    assert _tokens(different) != _tokens(alone)


class _RecordingModel(BatchedLlama4):
    """Records the chunk lengths of every step (a spy on the real forward)."""

    def __init__(self, model: Llama4ForCausalLM) -> None:
        super().__init__(model)
        self.steps: list[list[int]] = []

    def step(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        self.steps.append([len(c.token_ids) for c in chunks])
        return super().step(chunks)


def test_batching_limits_bound_running_sequences_and_prefill_chunks(
    model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    limits = BatchingLimits(max_num_seqs=2, max_num_batched_tokens=4, max_model_len=64)
    recording = _RecordingModel(model)
    engine = ReferenceEngine(recording, tokenizer, limits)
    ids = tokenizer.encode("Mixture of experts models route each token")
    assert len(ids) > 4  # so that each prompt takes several prefill chunks
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outputs = _run(engine, {f"r{n}": (ids, params) for n in range(3)})
    assert all(len(step) <= 2 for step in recording.steps)
    assert all(sum(step) <= 4 for step in recording.steps)
    # The third request joined a running batch once a slot freed up (continuous batching):
    # some step mixes a decode (1 token) with a prefill chunk.
    assert any(1 in step and max(step) > 1 for step in recording.steps)
    # Greedy requests with the same prompt agree, however they were chunked and batched.
    assert _tokens(outputs["r0"]) == _tokens(outputs["r1"]) == _tokens(outputs["r2"])
    assert all(len(_tokens(o)) == 3 for o in outputs.values())


def test_stop_string_truncates_text_and_is_never_streamed(
    config: ServingConfig, model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    ids = tokenizer.encode(PROMPT)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    plain = _run(_engine(model, tokenizer, config.batching), {"a": (ids, greedy)})["a"]
    full = "".join(o.text for o in plain)
    stop = full[5:8]  # a piece from the middle of what the model says
    assert len(stop) == 3
    assert full.find(stop) >= 5
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=(stop,))
    outputs = _run(_engine(model, tokenizer, config.batching), {"a": (ids, params)})["a"]
    streamed = "".join(o.text for o in outputs)
    assert streamed == full[: full.find(stop)]
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].completion_tokens < 20


def test_too_long_or_empty_prompts_are_rejected_with_the_limit(
    config: ServingConfig, model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    engine = _engine(model, tokenizer, config.batching)
    with pytest.raises(RequestRejectedError, match="at most 63"):
        engine.add_request("long", [1] * 64, SamplingParams(), lambda _: None)
    with pytest.raises(RequestRejectedError, match="empty"):
        engine.add_request("empty", [], SamplingParams(), lambda _: None)
    with pytest.raises(RequestRejectedError, match="token ids"):
        engine.add_request("bad", [10**6], SamplingParams(), lambda _: None)


def test_output_stops_at_max_model_len(
    model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    limits = BatchingLimits(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=10)
    ids = tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    outputs = _run(_engine(model, tokenizer, limits), {"a": (ids, params)})["a"]
    assert outputs[-1].finish_reason == "length"
    assert len(ids) + outputs[-1].completion_tokens == 10


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 3.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("max_tokens", 0, "max_tokens"),
    ],
)
def test_sampling_params_name_the_bad_field(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_small_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    params = SamplingParams(temperature=1.0, top_p=0.01)
    generator = torch.Generator().manual_seed(0)
    assert {sample_token(logits, params, generator) for _ in range(50)} == {1}
    wide = SamplingParams(temperature=1.0, top_p=1.0)
    assert len({sample_token(logits, wide, generator) for _ in range(200)}) > 2


def test_metrics_count_tokens_and_routed_experts(
    config: ServingConfig, model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    metrics = EngineMetrics("tiny")
    engine = _engine(model, tokenizer, config.batching, metrics)
    prompts = {
        f"r{i}": (
            tokenizer.encode(f"Hello, world {i}"),
            SamplingParams(max_tokens=4, ignore_eos=True),
        )
        for i in range(3)
    }
    _run(engine, prompts)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    prompt_tokens = sum(len(ids) for ids, _ in prompts.values())
    assert samples[("llama4_prompt_tokens_total", (("model_name", "tiny"),))] == prompt_tokens
    assert samples[("llama4_generation_tokens_total", (("model_name", "tiny"),))] == 12
    assert samples[("llama4_time_to_first_token_seconds_count", (("model_name", "tiny"),))] == 3
    assert samples[("llama4_requests_running", (("model_name", "tiny"),))] == 0
    # Every token that passes a MoE layer is routed to one expert (top-1): the last token of
    # each request is sampled but never fed back.
    fed = prompt_tokens + 3 * (4 - 1)
    for layer in (1, 3):
        routed = sum(
            value
            for (name, labels), value in samples.items()
            if name == "llama4_expert_routed_tokens_total" and ("layer", str(layer)) in labels
        )
        assert routed == fed


def test_waiting_prompt_tokens_gauge_counts_the_prefill_backlog(
    model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    metrics = EngineMetrics("tiny")
    # One sequence at a time, 4 prompt tokens per step: the backlog drains chunk by chunk.
    limits = BatchingLimits(max_num_seqs=1, max_num_batched_tokens=4, max_model_len=64)
    engine = _engine(model, tokenizer, limits, metrics)
    ids = tokenizer.encode("Mixture of experts models route each token")
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for name in ("a", "b"):
        engine.add_request(name, ids, params, lambda _: None)

    def gauge() -> float:
        return next(
            s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples
            if s.name == "llama4_prompt_tokens_waiting"
        )

    assert engine.waiting_prompt_tokens() == 2 * len(ids)
    engine.step()  # "a" admitted, its first chunk of 4 prefilled; "b" still queued
    assert gauge() == engine.waiting_prompt_tokens() == 2 * len(ids) - 4
    engine.run_until_idle()
    assert gauge() == engine.waiting_prompt_tokens() == 0


def test_async_engine_streams_and_aborts_on_cancel(
    config: ServingConfig, model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    engine = _engine(model, tokenizer, config.batching)
    runner = AsyncEngine(engine)

    async def scenario() -> tuple[list[RequestOutput], int]:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outputs = [o async for o in runner.generate("a", tokenizer.encode(PROMPT), params)]
        endless = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
        stream = runner.generate("b", tokenizer.encode(PROMPT), endless)
        await anext(stream)
        await stream.aclose()  # the client went away
        for _ in range(100):
            if not engine.has_work():
                break
            await asyncio.sleep(0.01)
        return outputs, len(engine._running) + len(engine._waiting)

    try:
        outputs, left = asyncio.run(scenario())
    finally:
        runner.shutdown()
    assert [o.finished for o in outputs] == [False] * 5 + [True]
    assert left == 0


def test_missing_weights_and_tokenizer_errors_name_the_field(tmp_path: Path) -> None:
    config = ServingConfig(
        served_model_name="x",
        architecture=ModelArchitecture(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            intermediate_size_mlp=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=8,
            num_local_experts=1,
        ),
        weights=WeightsSource(kind="path", uri=str(tmp_path)),
    )
    with pytest.raises(WeightsError, match=r"weights.uri .* no \*.safetensors"):
        load_model(config)
    with pytest.raises(WeightsError, match="tokenizer"):
        load_tokenizer(config)


class _BrokenExperts:
    """An expert backend whose shards stopped answering (a fake, for the failure path)."""

    def run(self, moe_index: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("expert shard of MoE layer 0 failed")


def test_a_failing_expert_backend_ends_requests_with_a_clear_error(
    config: ServingConfig, model: Llama4ForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    batched = BatchedLlama4(model, _BrokenExperts())
    engine = ReferenceEngine(batched, tokenizer, config.batching)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    failed = _run(engine, {"a": (tokenizer.encode(PROMPT), params)})["a"]
    assert failed[-1].finish_reason == "error"
    assert "expert shard of MoE layer 0 failed" in str(failed[-1].error)
    # The engine keeps serving once the experts answer again.
    batched.experts = LocalExperts(model)
    healed = _run(engine, {"b": (tokenizer.encode(PROMPT), params)})["b"]
    assert healed[-1].finish_reason == "length"

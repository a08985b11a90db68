"""Throughput and latency of the reference engine beside plain `transformers` `generate`.

Both run the same tiny random Llama 4 checkpoint (written here) on this machine's CPU, greedy, with
every request of a batch arriving at once. For each batch size: generated tokens per second over
the whole batch, mean time to first token (TTFT) and mean time per output token after the first
(TPOT). `transformers` token times come from a logits processor, called once per decoding step.

Run: .venv/bin/python benchmarks/serving/run.py [--batches 1 8 32] [--prompt-len 32] [--new 32]
     [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GenerationConfig, Llama4ForCausalLM, LogitsProcessorList

from llama4_serving.config import BatchingLimits, ServingConfig, WeightsSource
from llama4_serving.engines.reference.engine import ReferenceEngine, RequestOutput
from llama4_serving.engines.reference.loader import load_model, load_tokenizer
from llama4_serving.engines.reference.model import BatchedLlama4
from llama4_serving.engines.reference.sampling import SamplingParams
from llama4_serving.tiny import write_tiny_model


class _StepClock:
    """A logits processor that only notes when each decoding step happens."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(5, vocab, (batch, length), generator=generator).tolist()


def run_engine(
    model: Llama4ForCausalLM, config: ServingConfig, prompts: list[list[int]], new: int
) -> tuple[float, float, float, list[list[int]]]:
    limits = BatchingLimits(
        max_num_seqs=len(prompts),
        max_num_batched_tokens=max(2048, len(prompts) * len(prompts[0])),
        max_model_len=len(prompts[0]) + new + 1,
    )
    engine = ReferenceEngine(BatchedLlama4(model), load_tokenizer(config), limits)
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}

    def record(output: RequestOutput) -> None:
        if output.token_ids:
            times.setdefault(output.request_id, []).append(time.perf_counter())
            tokens.setdefault(output.request_id, []).extend(output.token_ids)

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params, record)
    engine.run_until_idle()
    wall = time.perf_counter() - start
    ttft = statistics.mean(t[0] - start for t in times.values())
    tpot = statistics.mean((t[-1] - t[0]) / (len(t) - 1) for t in times.values())
    ordered = [tokens[f"r{i}"] for i in range(len(prompts))]
    return len(prompts) * new / wall, ttft, tpot, ordered


def run_transformers(
    model: Llama4ForCausalLM, prompts: list[list[int]], new: int
) -> tuple[float, float, float, list[list[int]]]:
    clock = _StepClock()
    config = GenerationConfig(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    inputs = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            inputs, generation_config=config, logits_processor=LogitsProcessorList([clock])
        )
    end = time.perf_counter()
    steps = clock.times
    ttft = steps[0] - start
    tpot = (steps[-1] - steps[0]) / (len(steps) - 1)
    return len(prompts) * new / (end - start), ttft, tpot, out[:, inputs.shape[1] :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="tokens generated per request")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both systems (1: tiny matrices gain nothing from more, and "
        "a shared 2-core machine makes extra threads wait on each other)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    directory = Path(tempfile.mkdtemp(prefix="llama4-bench-"))
    arch = write_tiny_model(directory)
    config = ServingConfig(
        served_model_name="tiny",
        architecture=arch,
        weights=WeightsSource(kind="path", uri=str(directory)),
    )
    model = load_model(config)
    print(
        f"tiny Llama 4: hidden {arch.hidden_size}, {arch.num_hidden_layers} layers "
        f"(MoE {arch.moe_layers}), {arch.num_local_experts} experts, vocab {arch.vocab_size}; "
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"prompt {args.prompt_len} tokens, {args.new} new tokens per request, greedy"
    )
    warm = _prompts(1, args.prompt_len, arch.vocab_size)
    run_engine(model, config, warm, 4)
    run_transformers(model, warm, 4)
    header = f"{'batch':>5} {'system':<22} {'tokens/s':>10} {'TTFT ms':>9} {'TPOT ms':>9}"
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        prompts = _prompts(batch, args.prompt_len, arch.vocab_size)
        ours = run_engine(model, config, prompts, args.new)
        theirs = run_transformers(model, prompts, args.new)
        for name, (rate, ttft, tpot, _) in (
            ("reference engine", ours),
            ("transformers generate", theirs),
        ):
            print(f"{batch:>5} {name:<22} {rate:>10.1f} {ttft * 1e3:>9.1f} {tpot * 1e3:>9.2f}")
        same = sum(a == b for a, b in zip(ours[3], theirs[3], strict=True))
        print(f"{batch:>5} greedy tokens identical for {same}/{batch} requests")


if __name__ == "__main__":
    main()

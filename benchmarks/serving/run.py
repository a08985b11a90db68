"""Throughput and latency of the two engines, vLLM (its CPU build) and the reference engine,
beside plain `transformers` `generate`.

All three run the same tiny random Llama 4 checkpoint (written here; the one the demo serves) on
this machine's CPU, float32, greedy, with the same prompts and threads, every request of a batch
arriving at once. For each batch size: generated tokens per second over the whole batch, mean time
to first token (TTFT) and mean time per output token after the first (TPOT). `transformers`
token times come from a logits processor, called once per decoding step; the reference engine's
from its outputs. vLLM's offline `LLM` reports no per-token times, so its TTFT is the wall time of
the batch with one new token and its TPOT the rest of the full run's wall time per further token.

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
from llama4_serving.tiny import engine_tiny_architecture, write_tiny_model

Result = tuple[float, float, float, list[list[int]]]  # tokens/s, TTFT s, TPOT s, token ids


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


class VLLMRunner:
    """vLLM's offline engine on the checkpoint, on `threads` cores (none reserved for itself)."""

    def __init__(self, directory: Path, threads: int, max_model_len: int) -> None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM  # noqa: PLC0415  (loads vLLM only when benchmarked)

        self.llm = LLM(
            model=str(directory),
            dtype="float32",
            enforce_eager=True,
            max_model_len=max_model_len,
            max_num_seqs=64,
            seed=0,
        )

    def _generate(self, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        from vllm import SamplingParams as VLLMSamplingParams  # noqa: PLC0415
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        params = VLLMSamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        wall = time.perf_counter() - start
        return wall, [list(o.outputs[0].token_ids) for o in outputs]

    def run(self, prompts: list[list[int]], new: int) -> Result:
        first, _ = self._generate(prompts, 1)
        wall, tokens = self._generate(prompts, new)
        return len(prompts) * new / wall, first, max(wall - first, 0.0) / (new - 1), tokens


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
    arch = write_tiny_model(directory, engine_tiny_architecture())
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
    vllm = VLLMRunner(directory, args.threads, args.prompt_len + args.new + 8)
    warm = _prompts(1, args.prompt_len, arch.vocab_size)
    run_engine(model, config, warm, 4)
    run_transformers(model, warm, 4)
    vllm.run(warm, 4)
    header = f"{'batch':>5} {'system':<22} {'tokens/s':>10} {'TTFT ms':>9} {'TPOT ms':>9}"
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        prompts = _prompts(batch, args.prompt_len, arch.vocab_size)
        results = {
            "vllm engine (vLLM CPU)": vllm.run(prompts, args.new),
            "reference engine": run_engine(model, config, prompts, args.new),
            "transformers generate": run_transformers(model, prompts, args.new),
        }
        for name, (rate, ttft, tpot, _) in results.items():
            print(f"{batch:>5} {name:<22} {rate:>10.1f} {ttft * 1e3:>9.1f} {tpot * 1e3:>9.2f}")
        baseline = results["transformers generate"][3]
        for name in ("vllm engine (vLLM CPU)", "reference engine"):
            same = sum(a == b for a, b in zip(results[name][3], baseline, strict=True))
            print(f"{batch:>5} {name}: greedy tokens equal transformers' for {same}/{batch}")


if __name__ == "__main__":
    main()

"""The replica model the simulator replays requests against, and the numbers it uses.

One replica is Llama 4 Maverick (400B total / 17B active parameters, FP8 weights, BF16 KV cache)
on one HGX H100 node (8 x H100 SXM 80 GB), batching continuously like vLLM with chunked prefill.
An engine iteration takes `a + b x (prefill tokens in it) + c x (sum of decode context tokens)`:

- `a = 0.018 s`: every iteration streams each GPU's share of the weights once. At the batch sizes
  served here nearly all 128 experts of each MoE layer are touched, so each GPU reads
  400 GB / 8 = 50 GB at 3.35 TB/s (H100 SXM HBM3 datasheet) = 15 ms, plus about 3 ms of kernel
  launches and 8-way NVLink collectives.
- `b = 5.4e-6 s/token`: a prefill token costs 2 x 17e9 = 34 GFLOP; 8 GPUs x 1,979 TFLOP/s (dense
  FP8, H100 SXM datasheet) at 40% model FLOPs utilisation = 6.3 PFLOP/s.
- `c = 7.3e-9 s/token`: a decode step reads the KV cache of its whole context. Maverick has
  48 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes = 196,608 bytes per token (its
  Hugging Face config), split over 8 GPUs and read at 3.35 TB/s.
- KV capacity 900,000 tokens: 80 GB - 50 GB of weights - about 6 GB of activations and graphs
  leaves 24 GB per GPU, 24 GB / 24.6 kB per token per GPU = 975k tokens, rounded down.
- 64 sequences per batch and an 8,192-token prefill budget per iteration: common vLLM settings for
  large MoE models on H100 (`max_num_seqs`, `max_num_batched_tokens`).

These are roofline estimates, not measurements: the project's `reference` engine runs small
configurations on CPU here and cannot stand in for an H100 node. Every number is an option.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaModel:
    """Cost and limits of one continuously batching replica (see the module docstring)."""

    iteration_base_s: float = 0.018
    prefill_s_per_token: float = 5.4e-6
    decode_s_per_context_token: float = 7.3e-9
    prefill_budget_tokens: int = 8192
    max_num_seqs: int = 64
    kv_capacity_tokens: int = 900_000
    gpus_per_replica: int = 8

    def __post_init__(self) -> None:
        positive = {
            "iteration_base_s": self.iteration_base_s,
            "prefill_budget_tokens": self.prefill_budget_tokens,
            "max_num_seqs": self.max_num_seqs,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "gpus_per_replica": self.gpus_per_replica,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.prefill_s_per_token < 0 or self.decode_s_per_context_token < 0:
            raise ValueError("prefill_s_per_token and decode_s_per_context_token must be >= 0")

    def iteration_s(self, prefill_tokens: int, decode_context_tokens: int) -> float:
        """Duration of one engine iteration."""
        return (
            self.iteration_base_s
            + self.prefill_s_per_token * prefill_tokens
            + self.decode_s_per_context_token * decode_context_tokens
        )

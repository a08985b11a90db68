"""The forward pass of the reference engine over a flat batch of sequences.

The weights and sub-modules are those of `transformers`' `Llama4ForCausalLM` (embeddings, norms,
projections, router, shared expert, rotary embedding); this module adds what `transformers`'
own forward does not give a server: many sequences of different lengths in one step, each with
its own KV cache, prefill and decode mixed in one batch, and routed experts computed by a
pluggable backend (in process, or expert-parallel Ray actors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch.nn import functional
from torch.nn.utils.rnn import pad_sequence
from transformers.models.llama4.modeling_llama4 import (
    Llama4ForCausalLM,
    Llama4TextAttention,
    Llama4TextMoe,
    apply_rotary_emb,
)

from llama4_serving.engines.reference.experts import expert_ffn


class ExpertBackend(Protocol):
    """Computes routed experts: `tokens[i]` (already scaled by its router score) goes through
    expert `expert_ids[i]` of MoE layer number `moe_index` (0 = first MoE layer)."""

    def run(self, moe_index: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Return one output row per input row."""
        ...


class LocalExperts:
    """Routed experts computed in this process from the model's own expert weights."""

    def __init__(self, model: Llama4ForCausalLM) -> None:
        self._experts = [
            layer.feed_forward.experts
            for layer in model.model.layers
            if isinstance(layer.feed_forward, Llama4TextMoe)
        ]

    def run(self, moe_index: int, tokens: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        experts = self._experts[moe_index]
        out = torch.zeros_like(tokens)
        for expert in torch.unique(expert_ids).tolist():
            rows = (expert_ids == expert).nonzero(as_tuple=True)[0]
            out[rows] = expert_ffn(
                tokens[rows], experts.gate_up_proj[expert], experts.down_proj[expert]
            )
        return out


@dataclass
class KVCache:
    """Keys and values of one sequence, per layer: [tokens, kv_heads, head_dim]."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls(keys=[None] * num_layers, values=[None] * num_layers)


@dataclass
class SequenceChunk:
    """New tokens of one sequence to run this step; they start at position `cache.length`."""

    token_ids: Sequence[int]
    cache: KVCache


@dataclass
class StepResult:
    """Logits of each chunk's last token, and routed-token counts per (MoE layer, expert)."""

    logits: torch.Tensor
    routed_tokens: list[torch.Tensor] = field(default_factory=list)


class BatchedLlama4:
    """Runs `Llama4ForCausalLM`'s weights over a batch of sequence chunks with KV caches."""

    def __init__(self, model: Llama4ForCausalLM, experts: ExpertBackend | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.experts: ExpertBackend = experts or LocalExperts(model)
        self.moe_index_of_layer = {
            i: n
            for n, i in enumerate(
                i
                for i, layer in enumerate(model.model.layers)
                if isinstance(layer.feed_forward, Llama4TextMoe)
            )
        }

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @torch.inference_mode()
    def step(self, chunks: Sequence[SequenceChunk]) -> StepResult:
        """Append each chunk's tokens to its cache and return next-token logits per chunk."""
        lengths = [len(c.token_ids) for c in chunks]
        if not chunks or min(lengths) == 0:
            raise ValueError("every chunk needs at least one token")
        device = self.model.lm_head.weight.device
        token_ids = torch.tensor([t for c in chunks for t in c.token_ids], device=device)
        positions = torch.cat(
            [
                torch.arange(c.cache.length, c.cache.length + n)
                for c, n in zip(chunks, lengths, strict=True)
            ]
        ).to(device)
        inner = self.model.model
        hidden = inner.embed_tokens(token_ids)
        freqs = inner.rotary_emb(hidden, positions[None])
        routed: list[torch.Tensor] = []
        for index, layer in enumerate(inner.layers):
            normed = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(
                layer_index=index,
                attn=layer.self_attn,
                hidden=normed,
                positions=positions,
                freqs=freqs,
                chunks=chunks,
                lengths=lengths,
            )
            normed = layer.post_attention_layernorm(hidden)
            if isinstance(layer.feed_forward, Llama4TextMoe):
                ffn, counts = self._moe(self.moe_index_of_layer[index], layer.feed_forward, normed)
                routed.append(counts)
            else:
                ffn = layer.feed_forward(normed)
            hidden = hidden + ffn
        for chunk, n in zip(chunks, lengths, strict=True):
            chunk.cache.length += n
        last = torch.tensor(lengths, device=device).cumsum(0) - 1
        logits = self.model.lm_head(inner.norm(hidden[last])).float()
        return StepResult(logits=logits, routed_tokens=routed)

    def _attention(
        self,
        *,
        layer_index: int,
        attn: Llama4TextAttention,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        freqs: torch.Tensor,
        chunks: Sequence[SequenceChunk],
        lengths: list[int],
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        query = attn.q_proj(hidden).view(tokens, -1, attn.head_dim)
        key = attn.k_proj(hidden).view(tokens, -1, attn.head_dim)
        value = attn.v_proj(hidden).view(tokens, -1, attn.head_dim)
        if attn.use_rope:
            rotated_q, rotated_k = apply_rotary_emb(query[None], key[None], freqs)
            query, key = rotated_q[0], rotated_k[0]
        if hasattr(attn, "qk_norm"):
            query, key = attn.qk_norm(query), attn.qk_norm(key)
        if attn.attn_temperature_tuning and not attn.use_rope:
            # Llama 4 scales queries of the global (NoPE) layers with the log of the position.
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / attn.floor_scale))
            query = (query * (scales * attn.attn_scale + 1.0)[:, None, None]).to(query.dtype)
        chunked = (self.config.layer_types or [])[layer_index] == "chunked_attention"
        window = self.config.attention_chunk_size if chunked else None
        keys, values, query_rows, query_positions = [], [], [], []
        start = 0
        for chunk, n in zip(chunks, lengths, strict=True):
            cache = chunk.cache
            new_k, new_v = key[start : start + n], value[start : start + n]
            old_k, old_v = cache.keys[layer_index], cache.values[layer_index]
            all_k = new_k if old_k is None else torch.cat([old_k, new_k])
            all_v = new_v if old_v is None else torch.cat([old_v, new_v])
            cache.keys[layer_index], cache.values[layer_index] = all_k, all_v
            keys.append(all_k)
            values.append(all_v)
            query_rows.append(query[start : start + n])
            query_positions.append(positions[start : start + n])
            start += n
        # One padded attention for the whole batch: [batch, heads, queries, keys].
        q = pad_sequence(query_rows, batch_first=True).transpose(1, 2)
        k = pad_sequence(keys, batch_first=True).transpose(1, 2)
        v = pad_sequence(values, batch_first=True).transpose(1, 2)
        groups = attn.num_key_value_groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        q_pos = pad_sequence(query_positions, batch_first=True, padding_value=-1)[:, :, None]
        k_pos = torch.arange(k.shape[2], device=k.device)[None, None, :]
        cached = torch.tensor([c.shape[0] for c in keys], device=k.device)[:, None, None]
        allowed = (k_pos <= q_pos) & (k_pos < cached)
        if window is not None:
            # iRoPE: RoPE layers attend only within their fixed-size chunk of positions.
            allowed &= (k_pos // window) == (q_pos // window)
        scores = (q @ k.transpose(2, 3)) * attn.scaling
        # The finite minimum keeps padded query rows (no allowed key) free of NaN.
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # [batch, queries, heads, dim]
        real = q_pos[:, :, 0] >= 0
        result: torch.Tensor = attn.o_proj(out[real].reshape(hidden.shape[0], -1))
        return result

    def _moe(
        self, moe_index: int, moe: Llama4TextMoe, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k sigmoid routing plus the shared expert; the routed part goes to the backend."""
        logits = functional.linear(hidden, moe.router.weight)
        top_values, top_experts = torch.topk(logits, moe.top_k, dim=-1)
        scores = torch.sigmoid(top_values.float()).to(hidden.dtype)
        routed_in = (hidden[:, None, :] * scores[..., None]).reshape(-1, hidden.shape[-1])
        flat_experts = top_experts.reshape(-1)
        routed_out = self.experts.run(moe_index, routed_in, flat_experts)
        combined = routed_out.view(hidden.shape[0], moe.top_k, -1).sum(dim=1)
        counts = torch.bincount(flat_experts, minlength=moe.num_experts).cpu()
        return moe.shared_expert(hidden) + combined, counts

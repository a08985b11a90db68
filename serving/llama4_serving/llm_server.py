"""`LLMServer`, the reference engine's deployment: one engine replica and its expert shards.

In the style of `ray.serve.llm`'s `LLMServer`, the ingress calls it with requests it has already
parsed: `chat(ChatCompletionRequest)` and `completions(CompletionRequest)`, both streamed. Each
yields one `Refusal` (a request the engine cannot serve) or the engine's `RequestOutput`s, step by
step; the ingress words them as OpenAI answers. Runtime knobs (batching limits, the expert
placement plan) arrive through `user_config` and `reconfigure`, so a rebalance never restarts a
replica. Each replica serves Prometheus metrics on `ServingConfig.metrics_port`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from prometheus_client import start_http_server
from ray import serve
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from llama4_serving import metrics_targets
from llama4_serving.config import (
    LLM_SERVER_DEPLOYMENT,
    TORCH_THREADS,
    RuntimeKnobs,
    ServingConfig,
    engine_number,
)
from llama4_serving.engines.reference.engine import (
    AsyncEngine,
    ReferenceEngine,
    RequestOutput,
    RequestRejectedError,
)
from llama4_serving.engines.reference.expert_parallel import ShardedExperts
from llama4_serving.engines.reference.loader import load_model, load_tokenizer
from llama4_serving.engines.reference.model import BatchedLlama4, LocalExperts
from llama4_serving.engines.reference.sampling import SamplingParams
from llama4_serving.metrics import EngineMetrics
from llama4_serving.openai_protocol import (
    DEFAULT_CHAT_TEMPLATE,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """A request the engine cannot serve as given; the ingress answers `status` with `message`,
    which says what to change."""

    message: str
    status: int = 400


# What `LLMServer.chat` and `.completions` stream: a `Refusal` (then nothing more), or outputs.
EngineEvent = RequestOutput | Refusal


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest, max_model_len: int
) -> SamplingParams:
    """The engine's sampling parameters for an OpenAI request. The OpenAI defaults (16 tokens
    for completions, temperature and top_p 1, no stop strings) are the request models' own, so
    chat and completions differ only where their models do."""
    max_tokens = request.token_limit()
    if max_tokens is not None and max_tokens >= max_model_len:
        # Never reachable, whatever the prompt (which takes a token at least); smaller values
        # that do not fit beside a given prompt stop at the context instead.
        raise RequestRejectedError(
            f"max_tokens {max_tokens} can never be generated: max_model_len is "
            f"{max_model_len} tokens, prompt included; ask for at most {max_model_len - 1}"
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop_strings(),
    )


@serve.deployment(name=LLM_SERVER_DEPLOYMENT, health_check_period_s=10)
class LLMServer:
    """One engine replica: tokenises, schedules and streams the engine's outputs."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServingConfig.model_validate(config)
        if TORCH_THREADS in self.config.engine_args:
            torch.set_num_threads(int(engine_number(self.config, TORCH_THREADS, 0)))
        self.model = load_model(self.config)
        self.tokenizer = load_tokenizer(self.config)
        self.metrics = EngineMetrics(self.config.served_model_name)
        # Experts run in process until `reconfigure` brings a placement plan.
        self.local_experts = LocalExperts(self.model)
        self.experts: ShardedExperts | None = None
        self.batched = BatchedLlama4(self.model, self.local_experts)
        engine = ReferenceEngine(self.batched, self.tokenizer, self.config.batching, self.metrics)
        self.engine = AsyncEngine(engine)
        self.metrics_port: int | None = None
        if self.config.metrics_port is not None:
            try:
                server, _ = start_http_server(
                    self.config.metrics_port, registry=self.metrics.registry
                )
                self.metrics_port = int(server.server_port)
            except OSError as error:
                logger.warning("metrics port %s unavailable: %s", self.config.metrics_port, error)
        if self.metrics_port is not None:
            metrics_targets.register(f"{ray.util.get_node_ip_address()}:{self.metrics_port}")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply runtime knobs; a changed plan is built aside and swapped in between steps."""
        knobs = RuntimeKnobs.model_validate(user_config)
        if knobs.batching is not None:
            self.engine.engine.set_limits(knobs.batching)
        if knobs.placement is None:
            if self.experts is not None:
                with self.engine.between_steps():
                    self.batched.experts = self.local_experts
                self.experts.shutdown()
                self.experts = None
            return
        # The same rules as at start: one row per MoE layer, every expert held.
        ServingConfig.model_validate(
            {**self.config.model_dump(), "placement": knobs.placement.model_dump()}
        )
        if self.experts is None:
            experts = [
                (layer.feed_forward.experts.gate_up_proj, layer.feed_forward.experts.down_proj)
                for layer in self.model.model.layers
                if isinstance(layer.feed_forward, Llama4TextMoe)
            ]
            sharded = await asyncio.to_thread(
                ShardedExperts, experts, knobs.placement, self.config.accelerator_resource
            )
            with self.engine.between_steps():
                self.batched.experts = sharded
            self.experts = sharded
        elif knobs.placement != self.experts.plan:
            await asyncio.to_thread(
                self.experts.apply_plan, knobs.placement, self.engine.between_steps()
            )

    async def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("the engine loop has stopped")

    async def chat(self, request: ChatCompletionRequest) -> AsyncIterator[EngineEvent]:
        """A chat completion: its messages in the chat template, then `_generate`."""
        async for event in self._generate(request, lambda: self._chat_prompt(request)):
            yield event

    async def completions(self, request: CompletionRequest) -> AsyncIterator[EngineEvent]:
        """A completion of one prompt, text or token ids."""
        async for event in self._generate(request, lambda: self._completion_prompt(request)):
            yield event

    def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if any(message.has_image() for message in request.messages):
            raise RequestRejectedError(
                "the reference engine takes text only: remove the image_url parts, or deploy "
                "an engine that serves images"
            )
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        text = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE,
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(self.tokenizer.encode(str(text), add_special_tokens=False))

    def _completion_prompt(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return [int(t) for t in prompt]
        text = str(prompt[0]) if isinstance(prompt, list) else prompt
        return list(self.tokenizer.encode(text))

    async def _generate(
        self,
        request: CompletionRequest | ChatCompletionRequest,
        prompt_ids: Callable[[], list[int]],
    ) -> AsyncIterator[EngineEvent]:
        """Yield a `Refusal`, or every output of the request. The first output is awaited before
        anything is yielded, so the ingress answers 200 only once the engine has taken the
        request (and its wait for that first item covers queueing and prefill)."""
        try:
            prompt = prompt_ids()
            params = sampling_params(request, self.engine.engine.limits.max_model_len)
            outputs = self.engine.generate(new_id("req"), prompt, params)
            first = await anext(outputs)
        except ValueError as error:  # RequestRejectedError, and SamplingParams' own checks
            yield Refusal(str(error))
            return
        yield first
        async for output in outputs:
            yield output

    async def metrics_address(self) -> tuple[str, int | None]:
        address: str = ray.util.get_node_ip_address()
        return address, self.metrics_port

    async def shard_info(self) -> dict[str, Any]:
        """Where the expert shards run, and where the plan says they must (tests, debugging)."""
        if self.experts is None:
            return {"shards": [], "expected_nodes": [], "version": None}
        infos = await asyncio.to_thread(self.experts.shard_info)
        return {
            "shards": infos,
            "expected_nodes": self.experts.expected_nodes(),
            "version": self.experts.plan.version,
        }

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "experts", None) is not None:
            self.experts.shutdown()  # type: ignore[union-attr]

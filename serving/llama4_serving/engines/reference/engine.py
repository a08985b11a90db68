"""Continuous batching for the reference engine: a scheduler that mixes decodes and (chunked)
prefills in every step, stop conditions, incremental detokenisation, and an asyncio front.

Each step decodes one token for every running sequence and spends what is left of the token
budget (`max_num_batched_tokens`) on prompts, so new requests join a batch between any two steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerFast

from llama4_serving.config import BatchingLimits
from llama4_serving.engines.reference.model import BatchedLlama4, KVCache, SequenceChunk
from llama4_serving.engines.reference.sampling import SamplingParams, sample_token
from llama4_serving.metrics import EngineMetrics

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "abort", "error"]


class RequestRejectedError(ValueError):
    """A request the engine cannot take as given (the message says what to change)."""


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step adds to a request: new text and tokens, and whether it ended."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    cache: KVCache
    generator: torch.Generator
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    computed: int = 0  # prompt tokens already in the cache
    emitted_chars: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt_ids)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might still grow into a stop string or a whole character."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
        hold = max(hold, 1)
    return hold


class ReferenceEngine:
    """The synchronous engine; one thread calls `step`, others add and abort requests."""

    def __init__(
        self,
        model: BatchedLlama4,
        tokenizer: PreTrainedTokenizerFast,
        limits: BatchingLimits,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._aborted: set[str] = set()
        self._lock = threading.Lock()
        eos = tokenizer.eos_token_id
        self._eos_ids = {eos} if isinstance(eos, int) else set()
        self._moe_layers = list(model.moe_index_of_layer)

    # -- requests -------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None],
    ) -> None:
        """Queue a request; raises `RequestRejectedError` when it can never fit."""
        max_len = self.limits.max_model_len
        if not prompt_ids:
            raise RequestRejectedError("the prompt is empty: send at least one token")
        if len(prompt_ids) >= max_len:
            raise RequestRejectedError(
                f"the prompt has {len(prompt_ids)} tokens; this model takes at most "
                f"{max_len - 1} (max_model_len {max_len} includes the output): shorten it"
            )
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt_ids):
            raise RequestRejectedError(f"prompt token ids must lie in [0, {vocab})")
        sequence = _Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            on_output=on_output,
            cache=KVCache.empty(self.model.num_layers),
            generator=params.generator(),
        )
        with self._lock:
            self._waiting.append(sequence)

    def abort(self, request_id: str) -> None:
        """Drop a request at the next step (a client went away)."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def set_limits(self, limits: BatchingLimits) -> None:
        """New batching limits, applied from the next step."""
        self.limits = limits

    def waiting_prompt_tokens(self) -> int:
        """Prompt tokens not prefilled yet: the backlog the autoscaler reads."""
        with self._lock:
            queued = sum(len(s.prompt_ids) for s in self._waiting)
        return queued + sum(len(s.prompt_ids) - s.computed for s in self._running)

    def kv_cache_usage(self) -> float:
        capacity = self.limits.max_num_seqs * self.limits.max_model_len
        return min(1.0, sum(s.cache.length for s in self._running) / capacity)

    # -- stepping -------------------------------------------------------------------------
    def step(self) -> None:
        """Run one batch: a decode for each running sequence plus prompt chunks within budget."""
        self._drop_aborted()
        self._admit()
        batch = self._schedule()
        if batch:
            try:
                result = self.model.step([chunk for _, chunk in batch])
            except Exception as error:
                logger.exception("engine step failed")
                self._fail_all([seq for seq, _ in batch], f"engine step failed: {error}")
                return
            for row, (sequence, _) in enumerate(batch):
                if not sequence.prefilling:
                    self._advance(sequence, result.logits[row])
            routed = [
                (layer, counts.tolist())
                for layer, counts in zip(self._moe_layers, result.routed_tokens, strict=True)
            ]
        else:
            routed = []
        if self.metrics:
            self.metrics.observe_step(
                len(self._running),
                len(self._waiting),
                self.kv_cache_usage(),
                routed,
                waiting_prompt_tokens=self.waiting_prompt_tokens(),
            )

    def run_until_idle(self) -> None:
        """Step until every request has finished (tests and benchmarks)."""
        while self.has_work():
            self.step()

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if not aborted:
                return
            dropped = [s for s in [*self._waiting, *self._running] if s.request_id in aborted]
            self._waiting = deque(s for s in self._waiting if s.request_id not in aborted)
            self._running = [s for s in self._running if s.request_id not in aborted]
        for sequence in dropped:
            self._finish(sequence, "abort", "")

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._running) < self.limits.max_num_seqs:
                self._running.append(self._waiting.popleft())

    def _schedule(self) -> list[tuple[_Sequence, SequenceChunk]]:
        budget = self.limits.max_num_batched_tokens
        batch: list[tuple[_Sequence, SequenceChunk]] = []
        for sequence in self._running:
            if not sequence.prefilling:
                batch.append((sequence, SequenceChunk([sequence.output_ids[-1]], sequence.cache)))
                budget -= 1
        for sequence in self._running:
            if sequence.prefilling and (budget > 0 or not batch):
                take = max(1, min(budget, len(sequence.prompt_ids) - sequence.computed))
                tokens = sequence.prompt_ids[sequence.computed : sequence.computed + take]
                sequence.computed += take
                batch.append((sequence, SequenceChunk(tokens, sequence.cache)))
                budget -= take
        return batch

    def _advance(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        token = sample_token(logits, sequence.params, sequence.generator)
        now = time.monotonic()
        sequence.first_token_at = sequence.first_token_at or now
        sequence.last_token_at = now
        sequence.output_ids.append(token)
        params = sequence.params
        text = str(self.tokenizer.decode(sequence.output_ids, skip_special_tokens=True))
        stop_at = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        reason: FinishReason | None = None
        if stop_at >= 0:
            text, reason = text[:stop_at], "stop"
        elif token in self._eos_ids and not params.ignore_eos:
            reason = "stop"
        elif (params.max_tokens is not None and len(sequence.output_ids) >= params.max_tokens) or (
            len(sequence.prompt_ids) + len(sequence.output_ids) >= self.limits.max_model_len
        ):
            reason = "length"
        if reason is not None:
            with self._lock:
                self._running.remove(sequence)
            self._finish(sequence, reason, text[sequence.emitted_chars :], (token,))
            return
        visible = len(text) - _held_back(text, params.stop)
        new_text = text[sequence.emitted_chars : max(visible, sequence.emitted_chars)]
        sequence.emitted_chars += len(new_text)
        sequence.on_output(
            RequestOutput(
                request_id=sequence.request_id,
                text=new_text,
                token_ids=(token,),
                prompt_tokens=len(sequence.prompt_ids),
                completion_tokens=len(sequence.output_ids),
            )
        )

    def _finish(
        self,
        sequence: _Sequence,
        reason: FinishReason,
        text: str,
        token_ids: tuple[int, ...] = (),
        error: str | None = None,
    ) -> None:
        now = time.monotonic()
        if self.metrics:
            arrival = sequence.arrival
            first, last = sequence.first_token_at, sequence.last_token_at
            self.metrics.observe_finish(
                finish_reason=reason,
                prompt_tokens=len(sequence.prompt_ids),
                generated_tokens=len(sequence.output_ids),
                duration_s=now - arrival,
                first_token_s=None if first is None else first - arrival,
                last_token_s=None if last is None else last - arrival,
            )
        sequence.on_output(
            RequestOutput(
                request_id=sequence.request_id,
                text=text,
                token_ids=token_ids,
                prompt_tokens=len(sequence.prompt_ids),
                completion_tokens=len(sequence.output_ids),
                finish_reason=reason,
                error=error,
            )
        )

    def _fail_all(self, sequences: list[_Sequence], message: str) -> None:
        with self._lock:
            self._running = [s for s in self._running if s not in sequences]
        for sequence in sequences:
            self._finish(sequence, "error", "", error=message)


class AsyncEngine:
    """Runs a `ReferenceEngine` on a background thread and streams outputs to asyncio tasks."""

    def __init__(self, engine: ReferenceEngine) -> None:
        self.engine = engine
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="llama4-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def between_steps(self) -> contextlib.AbstractContextManager[object]:
        """Hold this to change the model (a new expert plan) with no step running."""
        return self._step_lock

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.engine.has_work():
                    self._wake.wait()
                if self._stopped:
                    return
            with self._step_lock:
                try:
                    self.engine.step()
                except Exception:  # a bug must not kill the loop and hang every client
                    logger.exception("unexpected engine error")

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; cancelling the iterator aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def deliver(output: RequestOutput) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, output)

        self.engine.add_request(request_id, prompt_ids, params, deliver)
        with self._wake:
            self._wake.notify()
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.engine.abort(request_id)
                with self._wake:
                    self._wake.notify()

"""The Ray Serve application: `build_app(args)` for the operator's Serve config.

Two plain deployments, in the style of `ray.serve.llm`: `LLMServer` holds the reference engine
(and its expert shards) and streams raw outputs; `OpenAIIngress` is the FastAPI front that speaks
the OpenAI API. Runtime knobs (batching limits, the expert placement plan) arrive through
`user_config` and `reconfigure`, so a rebalance never restarts a replica. Each `LLMServer` replica
serves Prometheus metrics on `ServingConfig.metrics_port`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import start_http_server
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from llama4_serving import metrics_targets
from llama4_serving.api_key import api_key_refusal
from llama4_serving.config import (
    LLM_SERVER_DEPLOYMENT,
    REPLICA_NUM_CPUS,
    TORCH_THREADS,
    RuntimeKnobs,
    ServingConfig,
    application_args,
    engine_number,
    llm_server_overrides,
)
from llama4_serving.engines.reference.engine import (
    AsyncEngine,
    ReferenceEngine,
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
    error_body,
    new_id,
    now,
)

logger = logging.getLogger(__name__)


def _error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message}


# A request body is JSON: its prompt is at most max_model_len tokens, as ids (up to 8 bytes each
# with the comma) or text (a few bytes per token, more once escaped); the rest is small fields.
REQUEST_BYTES_PER_TOKEN = 32
# How long a request may wait for its first output (queueing plus prefill) before a 503.
FIRST_OUTPUT_TIMEOUT_S = 90.0
REQUEST_BYTES_OVERHEAD = 64 * 1024


def max_request_bytes(max_model_len: int) -> int:
    """The largest body a generation request may have: larger ones get 413 unread."""
    return REQUEST_BYTES_OVERHEAD + REQUEST_BYTES_PER_TOKEN * max_model_len


class RequestTooLargeError(ValueError):
    """The body exceeds `max_request_bytes`."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read only up to `limit` bytes (a huge upload is refused, not buffered)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"the request body has {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _not_json(request: Request) -> JSONResponse | None:
    """415 for a declared content type other than JSON (none at all is taken as JSON)."""
    declared = request.headers.get("content-type", "")
    kind = declared.split(";", 1)[0].strip().lower()
    if not kind or kind == "application/json" or kind.endswith("+json"):
        return None
    return JSONResponse(
        error_body(
            f"unsupported Content-Type {declared!r}: send 'Content-Type: application/json'",
            "invalid_request_error",
            code=415,
        ),
        status_code=415,
    )


@serve.deployment(name=LLM_SERVER_DEPLOYMENT, health_check_period_s=10)
class LLMServer:
    """One engine replica: tokenises, schedules and streams raw outputs as dicts."""

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

    def _prompt_ids(self, kind: str, request: dict[str, Any]) -> list[int] | dict[str, Any]:
        if kind == "chat":
            chat = ChatCompletionRequest.model_validate(request)
            if any(m.has_image() for m in chat.messages):
                return _error(
                    400,
                    "the reference engine takes text only: remove the image_url parts, or "
                    "deploy an engine that serves images",
                )
            messages = [{"role": m.role, "content": m.text()} for m in chat.messages]
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE,
                add_generation_prompt=True,
                tokenize=False,
            )
            return list(self.tokenizer.encode(str(text), add_special_tokens=False))
        completion = CompletionRequest.model_validate(request)
        prompt = completion.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return [int(t) for t in prompt]
        text = str(prompt[0]) if isinstance(prompt, list) else prompt
        return list(self.tokenizer.encode(text))

    async def generate(self, kind: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield `start` (or `error`), then one `output` per step of the request."""
        try:
            prompt = self._prompt_ids(kind, request)
            if isinstance(prompt, dict):
                yield prompt
                return
            max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
            if kind == "completion" and "max_tokens" not in request:
                max_tokens = 16  # the OpenAI completions default
            context = self.engine.engine.limits.max_model_len
            if max_tokens is not None and max_tokens >= context:
                # Never reachable, whatever the prompt (which takes a token at least); smaller
                # values that do not fit beside this prompt stop at the context instead.
                yield _error(
                    400,
                    f"max_tokens {max_tokens} can never be generated: max_model_len is "
                    f"{context} tokens, prompt included; ask for at most {context - 1}",
                )
                return
            stops = request.get("stop") or ()
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=float(request.get("temperature", 1.0)),
                top_p=float(request.get("top_p", 1.0)),
                seed=request.get("seed"),
                stop=(stops,) if isinstance(stops, str) else tuple(stops),
            )
            stream = self.engine.generate(new_id("req"), prompt, params)
            first = await anext(stream)
        except (ValidationError, RequestRejectedError, ValueError) as error:
            yield _error(400, str(error))
            return
        yield {"type": "start", "prompt_tokens": len(prompt)}
        output = first
        while True:
            yield {
                "type": "output",
                "text": output.text,
                "token_ids": list(output.token_ids),
                "prompt_tokens": output.prompt_tokens,
                "completion_tokens": output.completion_tokens,
                "finish_reason": output.finish_reason,
                "error": output.error,
            }
            if output.finished:
                return
            output = await anext(stream)

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


api = FastAPI(title="llama4-serving", description="OpenAI-compatible API of a Llama 4 model")


def _invalid(error: ValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
    )
    return JSONResponse(error_body(problems, "invalid_request_error"), status_code=400)


def _engine_lost(error: Exception) -> dict[str, Any]:
    return error_body(
        f"the engine replica failed during the request ({type(error).__name__}); retry it",
        "server_error",
        code=503,
    )


async def _first_output(
    stream: "DeploymentResponseGenerator[dict[str, Any]]",
) -> dict[str, Any] | JSONResponse:
    """The engine's first item, or the 503 to answer with when there is none."""
    try:
        first: dict[str, Any] = await asyncio.wait_for(anext(stream), FIRST_OUTPUT_TIMEOUT_S)
    except TimeoutError:
        # Serve queues a call while no engine replica is up (one crashed and its replacement
        # is still loading): a bounded wait, then an answer, never a hang.
        stream.cancel()
        message = (
            f"no engine replica answered within {FIRST_OUTPUT_TIMEOUT_S:.0f} s (replicas are "
            "starting or overloaded); retry later"
        )
        return JSONResponse(error_body(message, "server_error", code=503), status_code=503)
    except Exception as error:  # the engine replica is gone or failing: say so, no 500
        logger.exception("engine call failed")
        return JSONResponse(
            error_body(f"the engine is unavailable: {error}", "server_error", code=503),
            status_code=503,
        )
    return first


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=512)
@serve.ingress(api)
class OpenAIIngress:
    """The OpenAI-compatible HTTP front; forwards generation to `LLMServer`."""

    def __init__(self, llm_server: "DeploymentHandle[LLMServer]", config: dict[str, Any]) -> None:
        self.llm = llm_server
        self.config = ServingConfig.model_validate(config)

    def _unauthorised(self, request: Request) -> JSONResponse | None:
        key_file = self.config.api_key_file
        if key_file is None:
            return None
        return api_key_refusal(key_file, request.headers.get("authorization", ""))

    def _unknown_model(self, model: str) -> JSONResponse | None:
        if model == self.config.served_model_name:
            return None
        return JSONResponse(
            error_body(
                f"model {model!r} does not exist; this server serves "
                f"{self.config.served_model_name!r}",
                "invalid_request_error",
                "model",
                404,
            ),
            status_code=404,
        )

    @api.get("/-/metrics/targets")
    async def list_metrics_targets(self) -> Response:
        """The live LLMServer replicas' metrics addresses, as Prometheus HTTP service discovery
        (http_sd_configs) reads them; addresses only, so no API key is asked for."""
        app_name = serve.get_replica_context().app_name
        groups = await asyncio.to_thread(
            metrics_targets.service_discovery, app_name, self.config.metrics_target_labels
        )
        return JSONResponse(groups)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if denied := self._unauthorised(request):
            return denied
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.served_model_name,
                        "object": "model",
                        "created": now(),
                        "owned_by": "llama4-operator",
                    }
                ],
            }
        )

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate("completion", CompletionRequest, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate("chat", ChatCompletionRequest, request)

    async def _generate(
        self,
        kind: str,
        schema: type[CompletionRequest] | type[ChatCompletionRequest],
        request: Request,
    ) -> Response:
        # The body is parsed here rather than by FastAPI so that authentication comes first:
        # a caller without the key learns nothing about the request schema.
        if denied := self._unauthorised(request):
            return denied
        if denied := _not_json(request):
            return denied
        try:
            raw = await _read_body(request, max_request_bytes(self.config.batching.max_model_len))
        except RequestTooLargeError as error:
            return JSONResponse(
                error_body(f"{error}: shorten the prompt", "invalid_request_error", code=413),
                status_code=413,
            )
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as error:
            return _invalid(error)
        if denied := self._unknown_model(body.model):
            return denied
        return await self._respond(kind, body.model_dump(exclude_unset=True), body)

    async def _respond(
        self, kind: str, payload: dict[str, Any], body: CompletionRequest | ChatCompletionRequest
    ) -> Response:
        stream: DeploymentResponseGenerator[dict[str, Any]] = self.llm.options(  # type: ignore[assignment]
            stream=True
        ).generate.remote(kind, payload)
        first = await _first_output(stream)
        if isinstance(first, JSONResponse):
            return first
        if first["type"] == "error":
            return JSONResponse(
                error_body(first["message"], "invalid_request_error", code=first["status"]),
                status_code=first["status"],
            )
        request_id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(kind, request_id, body.model, stream, include_usage),
                media_type="text/event-stream",
            )
        text, finish, usage = [], None, (first["prompt_tokens"], 0)
        try:
            async for item in stream:
                if item["error"]:
                    return JSONResponse(
                        error_body(item["error"], "server_error", code=503), status_code=503
                    )
                text.append(item["text"])
                finish = item["finish_reason"]
                usage = (item["prompt_tokens"], item["completion_tokens"])
        except Exception as error:  # the replica died mid-request: an answer, never a 500
            logger.exception("engine stream failed")
            return JSONResponse(_engine_lost(error), status_code=503)
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": now(),
                "model": body.model,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": usage[0],
                    "completion_tokens": usage[1],
                    "total_tokens": usage[0] + usage[1],
                },
            }
        )

    async def _stream(
        self,
        kind: str,
        request_id: str,
        model: str,
        stream: DeploymentResponseGenerator[dict[str, Any]],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        base = {"id": request_id, "object": obj, "created": now(), "model": model}
        if kind == "chat":
            yield _sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ],
                }
            )
        usage = None
        try:
            async for item in stream:
                if item["error"]:
                    yield _sse(error_body(item["error"], "server_error", code=503))
                    break
                choice: dict[str, Any] = {"index": 0, "finish_reason": item["finish_reason"]}
                if kind == "chat":
                    choice["delta"] = {"content": item["text"]} if item["text"] else {}
                else:
                    choice["text"] = item["text"]
                    choice["logprobs"] = None
                yield _sse({**base, "choices": [choice]})
                usage = item
        except Exception as error:  # the replica died mid-stream: end with an error event
            logger.exception("engine stream failed")
            yield _sse(_engine_lost(error))
        if include_usage and usage is not None:
            prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
            yield _sse(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                }
            )
        yield "data: [DONE]\n\n"


def _check_reference_engine(config: ServingConfig) -> None:
    if config.quantization != "bf16":
        raise ValueError(
            f"quantization {config.quantization!r} is not supported by the reference engine: "
            "use 'bf16'"
        )


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` (a `ServingConfig`) and return the Serve application: the reference
    engine's deployments below, or for `engine: vllm` Ray Serve LLM's (`engines/vllm/app.py`).

    `num_replicas`, `batching` and `placement` in `args` set `LLMServer`'s options here. The
    operator renders them instead as a deployment-level override (`llm_server_overrides` in
    `llama4_serving.config`) and keeps them at fixed values in `args`: Serve applies an
    override's replica count in place and its `user_config` through `reconfigure`, whereas new
    `args` make a new code version and replace every replica."""
    config = ServingConfig.model_validate(args)
    if config.engine == "vllm":
        # Imported here: Ray Serve LLM and vLLM load only where the vllm engine runs.
        from llama4_serving.engines.vllm.app import build_vllm_app  # noqa: PLC0415

        return build_vllm_app(config)
    _check_reference_engine(config)
    replica_cpus = engine_number(config, REPLICA_NUM_CPUS, 1)
    # The replicas get the knobs through `reconfigure` only, so both paths start them alike.
    server_args = application_args(config)
    # The same options the operator renders as the deployment-level override (less its name).
    overrides = {k: v for k, v in llm_server_overrides(config).items() if k != "name"}
    server = LLMServer.options(  # type: ignore[attr-defined]
        **overrides, ray_actor_options={"num_cpus": replica_cpus}
    ).bind(server_args)
    app: Application = OpenAIIngress.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0}
    ).bind(server, server_args)
    return app

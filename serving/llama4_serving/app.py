"""The Ray Serve application: `build_app(args)` for the operator's Serve config.

Two plain deployments, in the style of `ray.serve.llm`: `LLMServer` holds the reference engine
(and its expert shards) and streams raw outputs; `OpenAIIngress` is the FastAPI front that speaks
the OpenAI API. Runtime knobs (batching limits, the expert placement plan) arrive through
`user_config` and `reconfigure`, so a rebalance never restarts a replica. Each `LLMServer` replica
serves Prometheus metrics on `ServingConfig.metrics_port`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.
import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import start_http_server
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from llama4_serving.config import BatchingLimits, ExpertPlacement, ServingConfig
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


class RuntimeKnobs(BaseModel):
    """The `user_config` of `LLMServer`: what can change without restarting a replica."""

    model_config = ConfigDict(extra="forbid")

    batching: BatchingLimits | None = None
    placement: ExpertPlacement | None = None


def _error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message}


@serve.deployment(name="LLMServer", health_check_period_s=10)
class LLMServer:
    """One engine replica: tokenises, schedules and streams raw outputs as dicts."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServingConfig.model_validate(config)
        threads = self.config.engine_args.get("torch_threads")
        if threads is not None:
            torch.set_num_threads(int(threads))
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
        try:
            expected = Path(key_file).read_text().strip()
        except OSError as error:
            return JSONResponse(
                error_body(f"the API key file cannot be read: {error}", "server_error", code=503),
                status_code=503,
            )
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
            return JSONResponse(
                error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code=401,
                ),
                status_code=401,
            )
        return None

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
        try:
            body = schema.model_validate_json(await request.body())
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
        try:
            first = await anext(stream)
        except Exception as error:  # the engine replica is gone or failing: say so, no 500
            logger.exception("engine call failed")
            return JSONResponse(
                error_body(f"the engine is unavailable: {error}", "server_error", code=503),
                status_code=503,
            )
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
        async for item in stream:
            if item["error"]:
                return JSONResponse(
                    error_body(item["error"], "server_error", code=503), status_code=503
                )
            text.append(item["text"])
            finish = item["finish_reason"]
            usage = (item["prompt_tokens"], item["completion_tokens"])
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


def _check_engine(config: ServingConfig) -> None:
    if config.engine != "reference":
        raise ValueError(
            f"engine {config.engine!r} is not served by this app: it runs the 'reference' "
            "engine; render vLLM deployments with Ray Serve LLM instead"
        )
    if config.quantization != "bf16":
        raise ValueError(
            f"quantization {config.quantization!r} is not supported by the reference engine: "
            "use 'bf16'"
        )


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` (a `ServingConfig`) and return the Serve application."""
    config = ServingConfig.model_validate(args)
    _check_engine(config)
    knobs = RuntimeKnobs(batching=config.batching, placement=config.placement)
    replica_cpus = float(config.engine_args.get("replica_num_cpus", 1))
    # The runtime knobs travel in `user_config`. A live change (a new plan, new limits) must
    # come as a deployment-level `user_config` override with `args` unchanged: Ray Serve
    # reconfigures the replicas then, whereas new `args` make a new code version and replace them.
    server_args = config.model_copy(
        update={"placement": None, "batching": BatchingLimits()}
    ).model_dump(mode="json")
    server = LLMServer.options(  # type: ignore[attr-defined]
        num_replicas=config.num_replicas,
        user_config=knobs.model_dump(mode="json"),
        # Requests beyond the batch wait in the engine's queue, not in Serve's.
        max_ongoing_requests=2 * config.batching.max_num_seqs,
        ray_actor_options={"num_cpus": replica_cpus},
    ).bind(server_args)
    app: Application = OpenAIIngress.options(  # type: ignore[attr-defined]
        ray_actor_options={"num_cpus": 0}
    ).bind(server, server_args)
    return app

"""The Ray Serve application: `build_app(args)` for the operator's Serve config.

Two plain deployments, in the style of `ray.serve.llm`: `LLMServer` (`llm_server.py`) holds the
reference engine (and its expert shards); `OpenAIIngress`, here, is the FastAPI front that speaks
the OpenAI API. The ingress parses each request once, into `openai_protocol`'s models, and calls
the engine deployment's typed methods, `chat(ChatCompletionRequest)` and
`completions(CompletionRequest)`; it words what they stream as OpenAI answers, in one of two
`AnswerShape`s, so the two routes share every other line.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from llama4_serving import metrics_targets
from llama4_serving.api_key import api_key_refusal
from llama4_serving.config import (
    REPLICA_NUM_CPUS,
    ServingConfig,
    application_args,
    engine_number,
    llm_server_overrides,
)
from llama4_serving.engines.reference.engine import RequestOutput
from llama4_serving.llm_server import EngineEvent, LLMServer, Refusal
from llama4_serving.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
)
from llama4_serving.waiting import QUEUE_PATH, count_waiting_requests, waiting_requests_report

logger = logging.getLogger(__name__)

# A request body is JSON: its prompt is at most max_model_len tokens, as ids (up to 8 bytes each
# with the comma) or text (a few bytes per token, more once escaped); the rest is small fields.
REQUEST_BYTES_PER_TOKEN = 32
REQUEST_BYTES_OVERHEAD = 64 * 1024

OpenAIRequestT = TypeVar("OpenAIRequestT", CompletionRequest, ChatCompletionRequest)
EngineEvents = DeploymentResponseGenerator[EngineEvent]


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
    media_type = declared.split(";", 1)[0].strip().lower()
    if not media_type or media_type == "application/json" or media_type.endswith("+json"):
        return None
    return JSONResponse(
        error_body(
            f"unsupported Content-Type {declared!r}: send 'Content-Type: application/json'",
            "invalid_request_error",
            code=415,
        ),
        status_code=415,
    )


def _invalid(error: ValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
    )
    return JSONResponse(error_body(problems, "invalid_request_error"), status_code=400)


# -- OpenAI answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerShape:
    """Where chat and completion answers differ; everything else about them is common."""

    id_prefix: str
    object: str  # of the whole answer
    chunk_object: str  # of each streamed chunk
    choice: Callable[[str], dict[str, Any]]  # a whole answer's choice fields, from its text
    chunk_choice: Callable[[str], dict[str, Any]]  # a chunk's choice fields, from new text
    opening: dict[str, Any] | None = None  # the choice fields of a first chunk, if any


CHAT_ANSWER = AnswerShape(
    id_prefix="chatcmpl",
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    choice=lambda text: {"message": {"role": "assistant", "content": text}},
    chunk_choice=lambda text: {"delta": {"content": text} if text else {}},
    # A chat stream names the speaker before any text.
    opening={"delta": {"role": "assistant", "content": ""}},
)
COMPLETION_ANSWER = AnswerShape(
    id_prefix="cmpl",
    object="text_completion",
    chunk_object="text_completion",
    choice=lambda text: {"text": text},
    chunk_choice=lambda text: {"text": text, "logprobs": None},
)


def _usage(output: RequestOutput) -> dict[str, int]:
    prompt, completion = output.prompt_tokens, output.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _engine_error(message: str) -> dict[str, Any]:
    return error_body(message, "server_error", code=503)


def _engine_lost(error: Exception) -> dict[str, Any]:
    return _engine_error(
        f"the engine replica failed during the request ({type(error).__name__}); retry it"
    )


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _first_event(events: EngineEvents, timeout_s: float) -> EngineEvent | JSONResponse:
    """The engine's first event, or the 503 to answer with when there is none."""
    try:
        first: EngineEvent = await asyncio.wait_for(anext(events), timeout_s)
    except TimeoutError:
        # Serve queues a call while no engine replica is up (scaled to zero, or one crashed
        # and its replacement is still loading): a bounded wait, then an answer, never a hang.
        events.cancel()
        message = (
            f"no engine replica answered within {timeout_s:.0f} s (replicas are starting or "
            "overloaded); retry later"
        )
        return JSONResponse(_engine_error(message), status_code=503)
    except Exception as error:  # the engine replica is gone or failing: say so, no 500
        logger.exception("engine call failed")
        return JSONResponse(_engine_error(f"the engine is unavailable: {error}"), status_code=503)
    return first


async def _outputs(first: RequestOutput, rest: EngineEvents) -> AsyncIterator[RequestOutput]:
    """Every output of a request the engine took: only a first event can be a `Refusal`."""
    yield first
    async for event in rest:
        if isinstance(event, Refusal):
            raise TypeError(f"the engine refused a request it had taken: {event.message}")
        yield event


async def _answer(
    shape: AnswerShape,
    body: CompletionRequest | ChatCompletionRequest,
    events: EngineEvents,
    first_output_timeout_s: float,
) -> Response:
    """The HTTP answer to a generation request, from the engine's events for it."""
    first = await _first_event(events, first_output_timeout_s)
    if isinstance(first, JSONResponse):
        return first
    if isinstance(first, Refusal):
        return JSONResponse(
            error_body(first.message, "invalid_request_error", code=first.status),
            status_code=first.status,
        )
    request_id = new_id(shape.id_prefix)
    outputs = _outputs(first, events)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _answer_chunks(shape, request_id, body.model, outputs, include_usage),
            media_type="text/event-stream",
        )
    return await _whole_answer(shape, request_id, body.model, first, outputs)


async def _whole_answer(
    shape: AnswerShape,
    request_id: str,
    model: str,
    first: RequestOutput,
    outputs: AsyncIterator[RequestOutput],
) -> JSONResponse:
    text: list[str] = []
    last = first  # `outputs` starts with `first` again
    try:
        async for output in outputs:
            if output.error:
                return JSONResponse(_engine_error(output.error), status_code=503)
            text.append(output.text)
            last = output
    except Exception as error:  # the replica died mid-request: an answer, never a 500
        logger.exception("engine stream failed")
        return JSONResponse(_engine_lost(error), status_code=503)
    choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
    return JSONResponse(
        {
            "id": request_id,
            "object": shape.object,
            "created": now(),
            "model": model,
            "choices": [{**choice, **shape.choice("".join(text))}],
            "usage": _usage(last),
        }
    )


async def _answer_chunks(
    shape: AnswerShape,
    request_id: str,
    model: str,
    outputs: AsyncIterator[RequestOutput],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per output, then usage if asked for, then `[DONE]`."""
    base = {"id": request_id, "object": shape.chunk_object, "created": now(), "model": model}
    if shape.opening is not None:
        yield _sse({**base, "choices": [{"index": 0, **shape.opening, "finish_reason": None}]})
    last = None
    try:
        async for output in outputs:
            if output.error:
                yield _sse(_engine_error(output.error))
                break
            choice = {"index": 0, "finish_reason": output.finish_reason}
            yield _sse({**base, "choices": [{**choice, **shape.chunk_choice(output.text)}]})
            last = output
    except Exception as error:  # the replica died mid-stream: end with an error event
        logger.exception("engine stream failed")
        yield _sse(_engine_lost(error))
    if include_usage and last is not None:
        yield _sse({**base, "choices": [], "usage": _usage(last)})
    yield "data: [DONE]\n\n"


# -- the ingress deployment -----------------------------------------------------------------

api = FastAPI(title="llama4-serving", description="OpenAI-compatible API of a Llama 4 model")
api.middleware("http")(count_waiting_requests)


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=512)
@serve.ingress(api)
class OpenAIIngress:
    """The OpenAI-compatible HTTP front; forwards generation to `LLMServer`."""

    def __init__(self, llm_server: "DeploymentHandle[LLMServer]", config: dict[str, Any]) -> None:
        # `chat` and `completions` are async generators: every call to them streams.
        self.engine = llm_server.options(stream=True)
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

    async def _parse(
        self, request: Request, schema: type[OpenAIRequestT]
    ) -> OpenAIRequestT | JSONResponse:
        """The request body as `schema`, or the error to answer with. The body is parsed here
        rather than by FastAPI so that authentication comes first: a caller without the key
        learns nothing about the request schema."""
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
        return body

    @api.get("/-/metrics/targets")
    async def list_metrics_targets(self) -> Response:
        """The live LLMServer replicas' metrics addresses, as Prometheus HTTP service discovery
        (http_sd_configs) reads them; addresses only, so no API key is asked for."""
        app_name = serve.get_replica_context().app_name
        groups = await asyncio.to_thread(
            metrics_targets.service_discovery, app_name, self.config.metrics_target_labels
        )
        return JSONResponse(groups)

    @api.get(QUEUE_PATH)
    async def queue(self, request: Request) -> Response:
        """Generation requests held here whose answer has not started (see `waiting.py`)."""
        return waiting_requests_report(request)

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
        body = await self._parse(request, CompletionRequest)
        if isinstance(body, Response):
            return body
        events = cast(EngineEvents, self.engine.completions.remote(body))
        return await _answer(COMPLETION_ANSWER, body, events, self.config.first_output_timeout_s)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        if isinstance(body, Response):
            return body
        events = cast(EngineEvents, self.engine.chat.remote(body))
        return await _answer(CHAT_ANSWER, body, events, self.config.first_output_timeout_s)


# -- the application ------------------------------------------------------------------------


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

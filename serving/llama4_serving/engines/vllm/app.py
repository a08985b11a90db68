"""The vLLM engine's Serve application: `ray.serve.llm`'s `LLMServer` running vLLM, behind its
OpenAI ingress, with the additions the project's API promises for every engine: `GET /health`
(200 while every engine replica passes its health check), `GET /-/queue` (requests waiting for
an answer, which wakes a deployment scaled to zero) and the API key of `api_key_file`.

These additions need the ingress' FastAPI app, which `ray.serve.llm.build_openai_app` creates
inside; so this module wires the same parts itself (Ray 2.60's `make_fastapi_ingress` with an
extra route and a middleware). Everything else (request models, vLLM's OpenAI serving, streaming,
metrics) is Ray's and vLLM's.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.
import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import (
    DEFAULT_ENDPOINTS,
    OpenAiIngress,
    init,
    make_fastapi_ingress,
)
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from vllm import __version__ as vllm_version
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import FrontendArgs

from llama4_serving.api_key import api_key_refusal
from llama4_serving.config import ServingConfig
from llama4_serving.engines.vllm.llm_config import llm_config
from llama4_serving.openai_protocol import error_body
from llama4_serving.routes import is_openai_route
from llama4_serving.waiting import QUEUE_PATH, count_waiting_requests, waiting_requests_report

HEALTH_TIMEOUT_S = 10.0


class Llama4Ingress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress plus `GET /health` and `GET /-/queue`."""

    async def health(self) -> Response:
        """200 when every model's engine deployment passes `check_health`, else 503."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                for handle in self._default_serve_handles.values():
                    await handle.check_health.remote()
        except Exception as error:  # any failure or timeout: not healthy, and why
            message = f"the engine is not healthy: {type(error).__name__}: {error}"
            return JSONResponse(error_body(message, "server_error", code=503), status_code=503)
        return JSONResponse({"status": "ok"})

    async def queue(self, request: Request) -> Response:
        """Generation requests held here whose answer has not started (see `waiting.py`)."""
        return waiting_requests_report(request)


def api_key_check(
    key_file: str,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """A middleware that asks `/v1/*` callers for `Authorization: Bearer <key>`."""

    async def check(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if is_openai_route(request):
            refusal = api_key_refusal(key_file, request.headers.get("authorization", ""))
            if refusal is not None:
                return refusal
        return await call_next(request)

    return check


def check_engine_config(config: ServingConfig, rendered: dict[str, Any]) -> None:
    """Refuse at build time, naming the field, what vLLM would refuse only when each replica
    starts its engine (a minute each, retried): unknown engine arguments, a weights directory
    that is not there, a context longer than the checkpoint's."""
    kwargs = rendered["engine_kwargs"]
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    known |= {f.name for f in dataclasses.fields(FrontendArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"engine.extraArgs: vLLM {vllm_version} takes no engine argument named "
            f"{', '.join(unknown)}: remove it or use a name of `vllm serve --help`"
        )
    source = Path(rendered["model_loading_config"]["model_source"])
    if not source.is_absolute():
        return  # a repository id: vLLM looks it up in the local Hugging Face cache
    if not (source / "config.json").is_file():
        raise ValueError(
            f"model.weights.uri: {source} holds no checkpoint (config.json) on this Ray node: "
            "mount the weights there (weights.volumeClaimName mounts a PVC at /models) or fix "
            "the path"
        )
    checkpoint = json.loads((source / "config.json").read_text())
    longest = (checkpoint.get("text_config") or checkpoint).get("max_position_embeddings")
    context = config.batching.max_model_len
    if isinstance(longest, int) and context > longest:
        raise ValueError(
            f"model.maxContextLength: {context} tokens is longer than the checkpoint in {source} "
            f"allows (max_position_embeddings {longest}): ask for at most {longest}"
        )


def build_vllm_app(config: ServingConfig) -> Application:
    """The engine deployment (`LLMServer:<model>`) and the ingress (`OpenAiIngress`)."""
    rendered = llm_config(config)
    check_engine_config(config, rendered)
    llm = LLMConfig.model_validate(rendered)
    server = build_llm_deployment(llm)
    fastapi_app = init()
    fastapi_app.middleware("http")(count_waiting_requests)
    if config.api_key_file is not None:
        fastapi_app.middleware("http")(api_key_check(config.api_key_file))
    endpoints: dict[str, Any] = {
        **DEFAULT_ENDPOINTS,
        "health": lambda app: app.get("/health"),
        "queue": lambda app: app.get(QUEUE_PATH),
    }
    ingress = make_fastapi_ingress(Llama4Ingress, endpoint_map=endpoints, app=fastapi_app)
    options = {
        **Llama4Ingress.get_deployment_options([llm]),
        # One ingress replica, taking no CPU of its own: on a small CPU node the engine's CPUs
        # are all there is, and an ingress waiting for a CPU never starts.
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
    }
    options.pop("autoscaling_config", None)
    app: Application = serve.deployment(**options)(ingress).bind(
        llm_deployments={llm.model_id: server},
        model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
    )
    return app

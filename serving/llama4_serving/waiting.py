"""Generation requests an ingress holds whose answer has not started, and `GET /-/queue`.

While a deployment is scaled to zero, Serve's router holds its requests until a replica runs,
and nothing an engine exports can show them: this count is how the operator's autoscaler sees
demand coming back. It counts `POST /v1/...` requests from arrival to the first byte of their
answer (the start of a stream, or the whole answer), so it also shows requests queued behind
busy replicas. One ingress replica per application, so its count is the application's.

The count lives on the state of the FastAPI app that serves the request: Serve pickles the
ingress with its app into each replica, so a module-level counter would be one object in the
middleware's copy and another in the route's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from llama4_serving.config import QUEUE_PATH
from llama4_serving.routes import is_openai_route

__all__ = ["QUEUE_PATH", "count_waiting_requests", "waiting_requests_report"]

Endpoint = Callable[[Request], Awaitable[Response]]
_STATE_KEY = "llama4_waiting_requests"


def _waiting(request: Request) -> int:
    return int(getattr(request.app.state, _STATE_KEY, 0))


async def count_waiting_requests(request: Request, call_next: Endpoint) -> Response:
    """HTTP middleware of an ingress' FastAPI app: counts generation requests until their
    answer starts."""
    if request.method != "POST" or not is_openai_route(request):
        return await call_next(request)
    state = request.app.state
    setattr(state, _STATE_KEY, _waiting(request) + 1)
    try:
        return await call_next(request)
    finally:
        setattr(state, _STATE_KEY, _waiting(request) - 1)


def waiting_requests_report(request: Request) -> JSONResponse:
    """`GET /-/queue`'s answer: a count only, so no API key is asked for."""
    return JSONResponse({"waiting_requests": _waiting(request)})

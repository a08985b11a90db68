"""Request paths as the application sees them, below its Serve route prefix.

Ray Serve mounts each application at its route prefix (`/` under KubeRay, `/<namespace>/<name>`
on a shared external Ray cluster) and passes the prefix as the ASGI `root_path`; the request's
URL path still begins with it. Middlewares that select the OpenAI routes must look below it.
"""

from __future__ import annotations

from starlette.requests import Request


def route_path(request: Request) -> str:
    """The path below the route prefix: `/v1/completions` whatever the prefix."""
    path: str = request.scope["path"]
    prefix: str = request.scope.get("root_path", "").rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :] or "/"
    return path


def is_openai_route(request: Request) -> bool:
    """Whether the request is for the OpenAI API (`/v1/...`)."""
    return route_path(request).startswith("/v1/")

"""A Ray dashboard's Serve REST API: external-Ray mode deploys Serve applications through it,
and both modes read Serve's replica states from it.

Ray's Serve REST API (https://docs.ray.io/en/latest/serve/api/rest-api.html): `PUT
/api/serve/applications/` declaratively deploys a *complete* list of applications and removes any
application not listed, so every write here reads the current declarative config first (`GET`,
each application's `deployed_app_config`), replaces or drops only this deployment's application,
and puts the whole list back. Applications deployed imperatively (no `deployed_app_config`) cannot
be carried over; the dashboard refuses to mix the two, which surfaces as a temporary error.

Ray clusters with token authentication (`RAY_AUTH_MODE=token`) want the token as a bearer token:
it is given (`token`, as read from KubeRay's Secret of a RayService's cluster), else read from
`token_file` (a mounted Secret; read on every call, so a rotated Secret takes effect without a
restart), else from `RAY_AUTH_TOKEN`. A refused token is not a blip to retry
soon: it raises `RayAuthenticationError`, whose message names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import kopf

APPLICATIONS_PATH = "/api/serve/applications/"
TIMEOUT_S = 30.0
RETRY_DELAY_S = 15.0
# A token the cluster refuses stays refused until someone changes a Secret: retry slowly.
AUTH_RETRY_DELAY_S = 60.0
TOKEN_ENV = "RAY_AUTH_TOKEN"
REFUSED = (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN)


class RayAuthenticationError(kopf.TemporaryError):
    """The Ray dashboard refused the operator's token, or wants one and got none."""


class RayDashboard:
    """A Ray dashboard's Serve REST API."""

    def __init__(
        self,
        url: str,
        transport: httpx.AsyncBaseTransport | None = None,
        token_file: str | None = None,
        *,
        token: str | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self._transport = transport
        self.token_file = token_file
        self.token = token
        self.timeout_s = timeout_s

    def _token(self) -> str | None:
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return os.environ.get(TOKEN_ENV) or None
        try:
            return Path(self.token_file).read_text().strip() or None
        except OSError as error:
            raise RayAuthenticationError(
                f"the Ray token file {self.token_file} cannot be read ({error}): mount the "
                "Secret holding the cluster's token there "
                "(chart: operator.externalRayAuthTokenSecret)",
                delay=AUTH_RETRY_DELAY_S,
            ) from error

    def _client(self) -> httpx.AsyncClient:
        token = self._token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout_s, headers=headers, transport=self._transport
        )

    def _refused(self, response: httpx.Response) -> RayAuthenticationError:
        given = (
            "the Ray cluster's token"
            if self.token is not None
            else f"the token from {self.token_file}"
            if self.token_file
            else f"${TOKEN_ENV}"
            if os.environ.get(TOKEN_ENV)
            else "no token"
        )
        return RayAuthenticationError(
            f"Ray dashboard {self.url} refused {given} ({response.status_code}: "
            f"{response.text.strip()[:160]}): the cluster has token authentication on; give "
            "the operator its token (--ray-auth-token-file; chart: "
            "operator.externalRayAuthTokenSecret)",
            delay=AUTH_RETRY_DELAY_S,
        )

    async def _details(self, http: httpx.AsyncClient) -> dict[str, Any]:
        response = await http.get(APPLICATIONS_PATH)
        if response.status_code in REFUSED:
            raise self._refused(response)
        response.raise_for_status()
        body = response.json()
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _declared(details: dict[str, Any], without: str) -> list[dict[str, Any]]:
        apps = details.get("applications") or {}
        return [
            app["deployed_app_config"]
            for name, app in apps.items()
            if name != without and isinstance(app, dict) and app.get("deployed_app_config")
        ]

    async def deploy(self, application: dict[str, Any]) -> None:
        """Create or update one application, keeping the others. Nothing is sent when the
        application is already declared as wanted: every PUT restarts a build in progress."""
        await self._put_with(application["name"], application)

    async def remove(self, name: str) -> None:
        """Remove one application, keeping the others."""
        await self._put_with(name, None)

    async def _put_with(self, name: str, application: dict[str, Any] | None) -> None:
        try:
            async with self._client() as http:
                details = await self._details(http)
                current = ((details.get("applications") or {}).get(name) or {}).get(
                    "deployed_app_config"
                )
                if current == application:
                    return  # already declared as wanted (or already absent)
                apps = self._declared(details, without=name)
                if application is not None:
                    apps.append(application)
                response = await http.put(APPLICATIONS_PATH, json={"applications": apps})
                if response.status_code in REFUSED:
                    raise self._refused(response)
                response.raise_for_status()
        except httpx.HTTPError as error:
            raise kopf.TemporaryError(
                f"Ray dashboard {self.url}: {error}", delay=RETRY_DELAY_S
            ) from error

    async def application(self, name: str) -> dict[str, Any]:
        """One application's details (status, message, deployments and their replicas). When
        the dashboard is unreachable or lists no such application, a stand-in whose `status`
        says so (UNREACHABLE, NOT_FOUND) and whose `message` says why."""
        try:
            async with self._client() as http:
                details = await self._details(http)
        except httpx.HTTPError as error:
            return {"status": "UNREACHABLE", "message": f"Ray dashboard {self.url}: {error}"}
        except RayAuthenticationError as error:
            return {"status": "UNAUTHENTICATED", "message": str(error)}
        app = (details.get("applications") or {}).get(name)
        if not isinstance(app, dict):
            return {"status": "NOT_FOUND", "message": f"no application {name} on {self.url}"}
        return app

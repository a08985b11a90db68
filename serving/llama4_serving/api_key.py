"""The API key of `ServingConfig.api_key_file` (a mounted Secret), checked alike by both engines'
ingresses. The file is read on each request, so a rotated Secret takes effect without a
restart."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi.responses import JSONResponse

from llama4_serving.openai_protocol import error_body


def api_key_refusal(key_file: str, authorization: str) -> JSONResponse | None:
    """The answer to a caller whose `Authorization` header does not carry the key (401), or
    when the key cannot be read (503); None when the caller may go on."""
    try:
        expected = Path(key_file).read_text().strip()
    except OSError as error:
        return JSONResponse(
            error_body(f"the API key file cannot be read: {error}", "server_error", code=503),
            status_code=503,
        )
    if not hmac.compare_digest(authorization.encode(), f"Bearer {expected}".encode()):
        return JSONResponse(
            error_body(
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                code=401,
            ),
            status_code=401,
        )
    return None

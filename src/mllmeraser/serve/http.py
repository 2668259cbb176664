"""What the server's endpoints share: OpenAI's error body, a request's bearer token, its JSON body read under
the size limit, and the admin token's check.

Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad input
(the batcher never sees it) and 5xx for a failure of the server's own; the server stays up either way.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from .policy import PolicyError
from .settings import Limits, ServeSettings


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() or None if header[:7].lower() == "bearer " else None


async def json_body(request: Request, limits: Limits) -> dict:
    """The request's body as a JSON object, read no further than `limits.max_body_bytes` (413 beyond, 400 where it
    is not a JSON object)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise PolicyError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
    raw = bytearray()
    async for chunk in request.stream():  # a chunked body has no declared length: count as it comes
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise PolicyError(413, f"request body over {limits.max_body_bytes} bytes", "request_too_large")
    try:
        body = json.loads(bytes(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(400, f"the request body is not valid JSON ({exc})", "invalid_json") from None
    if not isinstance(body, dict):
        raise PolicyError(400, "the request body must be a JSON object", "invalid_json")
    return body


def require_admin(request: Request, settings: ServeSettings) -> None:
    """403 where the server has no admin token, 401 where the request does not bear it."""
    if not settings.admin_token:
        raise PolicyError(403, "the admin endpoints are off: start the server with --admin-token or "
                          "MLLMERASER_ADMIN_TOKEN", "admin_disabled", kind="permission_error")
    token = bearer(request) or ""
    if not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        raise PolicyError(401, "admin token missing or wrong: send 'Authorization: Bearer TOKEN'",
                          "invalid_admin_token", kind="authentication_error")

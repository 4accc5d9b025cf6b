"""How errors become answers: every error body is ``{"detail": "<what is wrong>"}``.

400 malformed JSON (:class:`~qsurgeon.server.api.jobs.submit.MalformedRequest` or FastAPI's
``json_invalid``), 409 a conflict (purging a running job, an Idempotency-Key reused with
another body), 422 a wrong value (:class:`UsageError`, or pydantic's errors with one
``location: message`` part per field, e.g. ``options.block_size: Input should be ...``),
405 with an ``Allow`` header naming every method of the path, 503 while Redis is
unreachable (never naming its address). Anything else is a bug: :class:`CatchAllMiddleware`
logs it and answers a JSON 500 without a traceback, keeping the connection alive.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Iterable

import redis
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qsurgeon.client.errors import UsageError
from qsurgeon.server.api.jobs.manager import JobStillRunning
from qsurgeon.server.api.jobs.submit import Conflict, MalformedRequest

log = logging.getLogger(__name__)

#: what a client is told while Redis is away (no host, port or library message)
UNAVAILABLE = "the job store is unreachable; retry in a few seconds"


def validation_message(errors: Iterable[dict[str, Any]]) -> str:
    """One part per problem, named by where it is: ``options.density: Input should be ...``.

    ``body`` (FastAPI's name for the request body) is left out of the location: a client
    knows its fields by their names in the JSON it sent.
    """
    parts = []
    for item in errors:
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def _detail(message: str, code: int) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=code)


async def _malformed(_: Request, error: MalformedRequest) -> JSONResponse:
    return _detail(str(error), status.HTTP_400_BAD_REQUEST)


async def _usage(_: Request, error: UsageError) -> JSONResponse:
    return _detail(str(error), status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _invalid(_: Request, error: ValidationError) -> JSONResponse:
    return _detail(validation_message(error.errors()), status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _request_invalid(_: Request, error: RequestValidationError) -> JSONResponse:
    errors = error.errors()
    broken = [str(item.get("ctx", {}).get("error", "")) for item in errors if item.get("type") == "json_invalid"]
    if broken:
        return _detail("malformed JSON: " + "; ".join(broken), status.HTTP_400_BAD_REQUEST)
    return _detail(validation_message(errors), status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _conflict(_: Request, error: UsageError) -> JSONResponse:
    return _detail(str(error), status.HTTP_409_CONFLICT)


async def _redis_down(_: Request, error: redis.RedisError) -> JSONResponse:
    log.warning("Redis error answered 503: %s", error)
    return JSONResponse({"detail": UNAVAILABLE}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                        headers={"Retry-After": "5"})


async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's HTTP errors as ``{"detail": ...}``; a 405 lists every method of the path
    (Starlette would name only those of the first route that matched it)."""
    headers = dict(getattr(error, "headers", None) or {})
    if error.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        methods = allowed_methods(request.app, request.url.path)
        if methods:
            headers["Allow"] = ", ".join(methods)
    detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
    return JSONResponse({"detail": detail}, status_code=error.status_code, headers=headers or None)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the OpenAPI document lists for the template ``path`` matches."""
    found: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            found |= {method.upper() for method in operations if method.isalpha()}
    return sorted(found)


class CatchAllMiddleware:
    """The last line: an exception no handler answered becomes a logged JSON 500 (no
    traceback to the client) instead of a dropped connection; a Redis error becomes 503."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            if started:  # a stream that broke half-way: nothing more can be said
                log.warning("response stream ended by %s: %s", type(error).__name__, error)
                return
            if isinstance(error, redis.RedisError):
                code, detail = 503, UNAVAILABLE
            else:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                code, detail = 500, "internal error; the server log has the details"
            body = json.dumps({"detail": detail}).encode()
            await send({"type": "http.response.start", "status": code,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    """Answer the project's own errors and pydantic's with ``{"detail": ...}``; Starlette picks
    the handler of the nearest class, so a MalformedRequest (a UsageError) is answered 400."""
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(redis.RedisError, _redis_down)
    app.add_exception_handler(JobStillRunning, _conflict)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(MalformedRequest, _malformed)
    app.add_exception_handler(UsageError, _usage)
    app.add_exception_handler(ValidationError, _invalid)
    app.add_exception_handler(RequestValidationError, _request_invalid)

"""How errors become answers: every error body is ``{"detail": "<what is wrong>"}``.

400 malformed JSON (:class:`~qsurgeon.server.api.jobs.submit.MalformedRequest` or FastAPI's
``json_invalid``), 422 a wrong value (:class:`UsageError`, or pydantic's errors with one
``location: message`` part per field, e.g. ``options.block_size: Input should be ...``).
"""

from __future__ import annotations

from typing import Any, Iterable

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from qsurgeon.client.errors import UsageError
from qsurgeon.server.api.jobs.submit import MalformedRequest


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


def install_error_handlers(app: FastAPI) -> None:
    """Answer the project's own errors and pydantic's with ``{"detail": ...}``; Starlette picks
    the handler of the nearest class, so a MalformedRequest (a UsageError) is answered 400."""
    app.add_exception_handler(MalformedRequest, _malformed)
    app.add_exception_handler(UsageError, _usage)
    app.add_exception_handler(ValidationError, _invalid)
    app.add_exception_handler(RequestValidationError, _request_invalid)

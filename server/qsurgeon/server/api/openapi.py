"""The service's version and its OpenAPI document's one addition: the job request body.

``POST /v1/jobs`` reads its body by hand (JSON, or multipart with file parts), so FastAPI
never sees :class:`~qsurgeon.client.schemas.JobCreate`; its schema is added to the
components here, with the models it refers to (``JobOptions``: every option with its bounds)
hoisted next to it, since ``#/components/schemas/...`` references must resolve there.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from qsurgeon.client.schemas import ErrorBody, JobCreate

#: what each error status means on this API (the description in /openapi.json)
ERROR_MEANINGS = {
    400: "Malformed request (bad JSON, nested too deep, or not an object)",
    401: "Missing API key",
    403: "Invalid API key",
    404: "No such job or artifact (or it belongs to another key)",
    405: "Method not allowed on this path",
    409: "Conflict: the job is still running, or the Idempotency-Key was used with another request",
    413: "Request body larger than the limit",
    415: "Unsupported content type",
    422: "Invalid fields, options, archive, model or solver",
    503: "Redis unreachable, or no worker for a synchronous solve",
    504: "A synchronous solve timed out",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error codes, each a JSON ``ErrorBody``; every ``/v1``
    route also gets 401, 403 and 503 (the key check and Redis come before the route)."""
    every = sorted(set(codes) | {401, 403, 503})
    return {code: {"model": ErrorBody, "description": ERROR_MEANINGS[code]} for code in every}


def service_version() -> str:
    try:
        return version("qsurgeon")
    except PackageNotFoundError:  # pragma: no cover
        return "0"


def component_schemas(model: type[JobCreate]) -> dict[str, Any]:
    """``model``'s JSON schema and those of the models it nests, keyed by name for ``components``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = schema.pop("$defs", {})
    return {**nested, model.__name__: schema}


def document_job_body(app: FastAPI) -> None:
    """Make ``app.openapi()`` include JobCreate (and JobOptions) among its component schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas(JobCreate))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

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

from qsurgeon.client.schemas import JobCreate


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

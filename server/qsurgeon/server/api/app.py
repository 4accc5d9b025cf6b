"""The FastAPI application: ``create_app(config)``; ``qsurgeon serve`` runs it with uvicorn."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import AsyncIterator

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from qsurgeon.client.errors import UsageError
from qsurgeon.client.schemas import Health, Readiness
from qsurgeon.server.api.config import ServiceConfig
from qsurgeon.server.api.limits import BodyLimitMiddleware
from qsurgeon.server.api.manager import JobManager
from qsurgeon.server.api.routes import router
from qsurgeon.server.api.store import JobStore
from qsurgeon.server.api.submit import MalformedRequest, validation_message
from qsurgeon.worker.queue.control import QueueControl
from qsurgeon.worker.queue.settings import connect

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return version("qsurgeon")
    except PackageNotFoundError:  # pragma: no cover
        return "0"


def _document_job_body(app: FastAPI) -> None:
    """POST /v1/jobs reads its body by hand (JSON or multipart), so FastAPI does not know
    JobCreate; add its schema to the OpenAPI components the route's requestBody refers to."""
    from fastapi.openapi.utils import get_openapi

    from qsurgeon.client.schemas import JobCreate

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["JobCreate"] = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(config: ServiceConfig, *, resume: bool = True) -> FastAPI:
    """Build the app; on start-up it resumes unfinished jobs (``resume``), on shutdown it
    stops its job threads without finishing their rounds (they resume next time)."""
    client = connect(config.redis_url)
    store = JobStore(client, config.queue.prefix)
    manager = JobManager(config, client, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not config.api_keys:
            log.warning("no API keys configured: every route is open (set QSURGEON_API_KEYS)")
        if resume:
            manager.start()
        yield
        manager.shutdown()

    app = FastAPI(
        title="qsurgeon",
        version=_version(),
        description="Prune neural networks with iCBS; solve block QUBOs with any solver.",
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.redis = client
    app.state.store = store
    app.state.manager = manager
    app.add_middleware(BodyLimitMiddleware, max_upload_bytes=config.max_upload_bytes,
                       max_json_bytes=config.max_json_bytes)
    app.include_router(router)
    _document_job_body(app)

    @app.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
    def healthz() -> Health:
        return Health(version=_version())

    @app.get("/readyz", response_model=Readiness, tags=["health"], summary="Redis reachable and workers seen")
    def readyz() -> JSONResponse:
        try:
            client.ping()
            workers = len(QueueControl(client, config.queue).live_workers())
            ready = Readiness(ready=workers > 0, redis=True, workers=workers,
                              detail="" if workers else "no worker heartbeat in the last 30 s")
        except Exception as error:  # any Redis failure means not ready
            ready = Readiness(ready=False, redis=False, workers=0, detail=f"Redis unreachable: {error}")
        code = status.HTTP_200_OK if ready.ready else status.HTTP_503_SERVICE_UNAVAILABLE
        return JSONResponse(ready.model_dump(), status_code=code)

    @app.exception_handler(MalformedRequest)
    async def malformed(_: Request, error: MalformedRequest) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status.HTTP_400_BAD_REQUEST)

    @app.exception_handler(UsageError)
    async def usage(_: Request, error: UsageError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(ValidationError)
    async def invalid(_: Request, error: ValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(error)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if any(item.get("type") == "json_invalid" for item in errors):
            return JSONResponse({"detail": "malformed JSON: " + "; ".join(str(item.get("ctx", {}).get("error", ""))
                                                                         for item in errors)},
                                status_code=status.HTTP_400_BAD_REQUEST)
        parts = []
        for item in errors:
            location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            parts.append(f"{location}: {item.get('msg', 'invalid')}".removeprefix(": "))
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    return app

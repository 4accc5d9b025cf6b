"""The FastAPI application: ``create_app(config)``; ``qsurgeon serve`` runs it with uvicorn.

Wiring only: the services (``dependencies.Services``), the middleware, the error handlers,
the routers (``routers/``) and the OpenAPI addition. What a route does is in its router; how
jobs are stored, run and resumed is in ``jobs/``.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI

from qsurgeon.server.api.config import ServiceConfig
from qsurgeon.server.api.dependencies import Services, require_api_key
from qsurgeon.server.api.errors import CatchAllMiddleware, install_error_handlers
from qsurgeon.server.api.jobs.manager import JobManager
from qsurgeon.server.api.jobs.store import JobStore
from qsurgeon.server.api.limits import BodyLimitMiddleware
from qsurgeon.server.api.metrics import add_service_collector, metrics_registry
from qsurgeon.server.api.openapi import document_job_body, service_version
from qsurgeon.server.api.routers import PROBES, V1_ROUTERS
from qsurgeon.worker.queue.control import QueueControl
from qsurgeon.worker.queue.settings import RETRY_SECONDS_API, connect

log = logging.getLogger(__name__)


def use_threadsafe_numba() -> None:
    """Job threads run the engine side by side, and numba's default threading layer
    (workqueue) aborts the whole process when two threads launch parallel kernels at once;
    ask for a thread-safe layer (OpenMP or TBB) unless the operator chose one."""
    import os

    if os.environ.get("NUMBA_THREADING_LAYER"):
        return
    try:
        import numba
    except ImportError:  # pragma: no cover - the [server] extra installs it
        return
    numba.config.THREADING_LAYER = "threadsafe"


def create_app(config: ServiceConfig, *, resume: bool = True) -> FastAPI:
    """Build the app; on start-up it resumes unfinished jobs (``resume``), on shutdown it
    stops its job threads without finishing their rounds (they resume next time).

    Two Redis clients: the job threads' retries ride out a Redis restart; the API's give up
    after about a second, and the request is answered 503 (the client retries)."""
    use_threadsafe_numba()
    client = connect(config.redis_url, retry_seconds=RETRY_SECONDS_API)
    store = JobStore(client, config.queue.prefix, retention=config.retention_seconds)
    registry, instruments = metrics_registry()
    job_client = connect(config.redis_url)
    manager = JobManager(config, job_client, JobStore(job_client, config.queue.prefix,
                                                      retention=config.retention_seconds), instruments)
    control = QueueControl(client, config.queue)
    services = Services(config=config, redis=client, store=store, manager=manager, control=control,
                        metrics=add_service_collector(registry, store, control, manager))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not config.all_keys:
            log.warning("no API keys configured: every route is open (set QSURGEON_API_KEYS)")
        if resume:
            manager.start()
        yield
        manager.shutdown()

    app = FastAPI(
        title="qsurgeon",
        version=service_version(),
        description="Prune neural networks with iCBS; solve block QUBOs with any solver.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_upload_bytes=config.max_upload_bytes,
                       max_json_bytes=config.max_json_bytes)
    for router in V1_ROUTERS:
        app.include_router(router, prefix="/v1", dependencies=[Depends(require_api_key)])
    app.include_router(PROBES)
    install_error_handlers(app)
    document_job_body(app)
    return app

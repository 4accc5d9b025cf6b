"""``/healthz`` and ``/readyz``: probes for a load balancer or an orchestrator, open without an API key."""

from __future__ import annotations

import logging

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse

from qsurgeon.client.schemas import Health, Readiness
from qsurgeon.server.api.dependencies import Control, Redis
from qsurgeon.server.api.openapi import service_version

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(version=service_version())


@router.get("/readyz", response_model=Readiness, summary="Redis reachable and workers seen",
            responses={503: {"model": Readiness, "description": "Not ready: Redis unreachable or no worker"}})
def readyz(client: Redis, control: Control) -> JSONResponse:
    try:
        client.ping()
        workers = len(control.live_workers())
        ready = Readiness(ready=workers > 0, redis=True, workers=workers,
                          detail="" if workers else "no worker heartbeat in the last 30 s")
    except Exception:  # any Redis failure means not ready; where Redis is stays in the server's log
        log.warning("readiness probe: Redis unreachable", exc_info=True)
        ready = Readiness(ready=False, redis=False, workers=0, detail="Redis unreachable")
    code = status.HTTP_200_OK if ready.ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(ready.model_dump(), status_code=code)

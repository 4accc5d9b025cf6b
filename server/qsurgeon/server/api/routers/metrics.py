"""``/v1/metrics``: Prometheus text exposition (format 0.0.4) of the app's registry."""

from __future__ import annotations

from fastapi import APIRouter

from qsurgeon.server.api.openapi import errors
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest

from qsurgeon.server.api.dependencies import MetricsRegistry

#: what ``generate_latest`` writes (named here: newer prometheus_client versions default to 1.0.0)
TEXT_FORMAT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse, responses=errors(), summary="Prometheus metrics")
def metrics(registry: MetricsRegistry) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(registry), media_type=TEXT_FORMAT_0_0_4)

"""What routes receive through FastAPI's ``Depends``: the app's services and the API-key check.

:func:`~qsurgeon.server.api.app.create_app` builds one :class:`Services` per app and keeps it on
``app.state``; this module is the only reader of ``app.state``, so a route names what it needs
(``config: Config, store: Store``) and two apps in one process (tests) never share anything.

API keys: ``Authorization: Bearer <key>`` on every ``/v1`` route, compared in constant time.
With no keys configured the service is open (the server warns at start-up); that is for a
laptop, never for a shared network.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request, status
from prometheus_client import CollectorRegistry

from qsurgeon.client.schemas import Job
from qsurgeon.server.api.config import ServiceConfig
from qsurgeon.server.api.jobs.manager import JobManager
from qsurgeon.server.api.jobs.store import JobStore
from qsurgeon.worker.queue.control import QueueControl


@dataclass(frozen=True)
class Services:
    """Everything one app's routes share; built once by ``create_app``."""

    config: ServiceConfig
    redis: redis.Redis
    store: JobStore
    manager: JobManager
    control: QueueControl
    metrics: CollectorRegistry


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_config(request: Request) -> ServiceConfig:
    return get_services(request).config


def get_redis(request: Request) -> redis.Redis:
    return get_services(request).redis


def get_store(request: Request) -> JobStore:
    return get_services(request).store


def get_manager(request: Request) -> JobManager:
    return get_services(request).manager


def get_queue_control(request: Request) -> QueueControl:
    return get_services(request).control


def get_metrics_registry(request: Request) -> CollectorRegistry:
    return get_services(request).metrics


Config = Annotated[ServiceConfig, Depends(get_config)]
Redis = Annotated[redis.Redis, Depends(get_redis)]
Store = Annotated[JobStore, Depends(get_store)]
Manager = Annotated[JobManager, Depends(get_manager)]
Control = Annotated[QueueControl, Depends(get_queue_control)]
MetricsRegistry = Annotated[CollectorRegistry, Depends(get_metrics_registry)]


@dataclass(frozen=True)
class Caller:
    """Who sent the request: ``owner`` names the key (a digest, never the key itself);
    ``admin`` sees and cancels every key's jobs. An open server (no keys) treats everyone as
    one admin."""

    owner: str
    admin: bool

    def may_see(self, owner: str) -> bool:
        return self.admin or hmac.compare_digest(self.owner, owner)


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def require_api_key(request: Request, config: Config) -> Caller:
    """401 without a key, 403 with a wrong one; an open server lets everyone in as admin."""
    if not config.all_keys:
        return Caller(owner="", admin=True)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
    presented = token.strip().encode()
    admin = any(hmac.compare_digest(presented, key.encode()) for key in config.admin_keys)
    if not admin and not any(hmac.compare_digest(presented, key.encode()) for key in config.api_keys):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid API key")
    return Caller(owner=owner_of(token.strip()), admin=admin)


CurrentCaller = Annotated[Caller, Depends(require_api_key)]


def existing_job(job_id: str, store: Store, caller: CurrentCaller) -> Job:
    """The job named by the path's ``job_id``; 404 when there is none, the id is malformed, or
    it belongs to another key (a key cannot even learn that another key's job exists)."""
    job = store.get(job_id)
    if job is None or not caller.may_see(store.owner(job_id)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id!r}")
    return job


ExistingJob = Annotated[Job, Depends(existing_job)]

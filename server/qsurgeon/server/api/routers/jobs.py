"""``/v1/jobs``: submit, list, read and cancel jobs; follow their events; download their artifacts."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

import logging

import redis
from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException

from qsurgeon.client.errors import UsageError
from qsurgeon.client.schemas import Job, JobList, JobState
from qsurgeon.server.api.dependencies import Config, Control, CurrentCaller, ExistingJob, Manager, Store
from qsurgeon.server.api.jobs.runner import artifact_path
from qsurgeon.server.api.jobs.submit import (
    claim_idempotency_key, create_job, parse_spec, request_digest, settle_idempotency_key,
)
from qsurgeon.server.api.openapi import errors

log = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"])

#: POST /v1/jobs reads its body by hand (JSON, or multipart with file parts), so FastAPI
#: cannot derive the request body; ``qsurgeon.server.api.openapi`` adds the JobCreate schema.
_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec"],
                    "additionalProperties": False,
                    "description": "at most 4 parts, 2 of them files; 'spec' at most 1 MiB",
                    "properties": {
                        "spec": {"$ref": "#/components/schemas/JobCreate"},
                        "model_archive": {"type": "string", "format": "binary",
                                          "description": "tar/zip of a safetensors Hugging Face folder "
                                                         "(model 'upload')"},
                        "calibration": {"type": "string", "format": "binary",
                                        "description": "UTF-8 text, one sample per line (calibration 'upload')"},
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            },
        },
    }
}


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=Job, openapi_extra=_JOB_BODY,
             summary="Submit a prune job (JSON, or multipart with uploads)",
             responses={200: {"model": Job, "description": "The job an earlier request with this Idempotency-Key made"},
                        **errors(400, 409, 413, 415, 422)})
async def submit_job(request: Request, config: Config, store: Store, manager: Manager, caller: CurrentCaller,
                     idempotency_key: str | None = Header(
                         None, min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
                         description="Send the same key with the same body again (a retry) and get the same job")):
    content_type = request.headers.get("content-type", "")
    archive_path: Path | None = None
    calibration: bytes | None = None
    digest = ""
    job: Job | None = None
    claimed = False
    try:
        if content_type.startswith("multipart/form-data"):
            try:
                async with request.form(max_files=2, max_fields=4, max_part_size=1 << 20) as form:
                    raw_spec = form.get("spec")
                    if raw_spec is None or not isinstance(raw_spec, str):
                        raise UsageError("the multipart request needs a 'spec' field with the job as JSON")
                    spec = parse_spec(raw_spec)
                    archive = form.get("model_archive")
                    if archive is not None and not isinstance(archive, str):
                        handle = tempfile.NamedTemporaryFile(dir=config.data_dir, suffix=".upload", delete=False)
                        with handle:
                            while chunk := await archive.read(1 << 20):
                                handle.write(chunk)
                        archive_path = Path(handle.name)
                    upload = form.get("calibration")
                    if upload is not None and not isinstance(upload, str):
                        calibration = await upload.read()
            except MultiPartException as error:
                raise UsageError(f"malformed multipart body: {error.message}") from None
        elif content_type.startswith("application/json") or not content_type:
            spec = parse_spec(await request.body())
        else:
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                                "send application/json or multipart/form-data")
        if idempotency_key is not None:
            digest = await run_in_threadpool(request_digest, spec, archive_path, calibration)
            earlier = claim_idempotency_key(store, caller.owner, idempotency_key, digest, config.retention_seconds)
            if earlier is not None:
                previous = store.get(earlier)
                if previous is not None:
                    return JSONResponse(previous.model_dump(mode="json"), status_code=status.HTTP_200_OK)
                # the job it named was purged: this request makes a new one
                settle_idempotency_key(store, caller.owner, idempotency_key, digest, None, 0)
                claim_idempotency_key(store, caller.owner, idempotency_key, digest, config.retention_seconds)
            claimed = True
        job = await run_in_threadpool(create_job, config, store, spec, archive=archive_path,
                                      calibration_text=calibration, owner=caller.owner)
        manager.launch(job.id)
        return job
    finally:
        if archive_path is not None:
            archive_path.unlink(missing_ok=True)
        if claimed and idempotency_key is not None:
            try:
                settle_idempotency_key(store, caller.owner, idempotency_key, digest, job.id if job else None,
                                       config.retention_seconds)
            except redis.RedisError:
                log.warning("could not settle an Idempotency-Key (it expires in 2 minutes)")


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first (a key sees its own; admin: all)",
            responses=errors(422))
def list_jobs(store: Store, caller: CurrentCaller, state: JobState | None = None,
              limit: int = Query(100, ge=1, le=1000)) -> JobList:
    return JobList(jobs=store.list(limit=limit, state=state, owner=None if caller.admin else caller.owner))



@router.get("/jobs/{job_id}", response_model=Job, summary="A job's state, progress and metrics",
            responses=errors(404))
def get_job(job: ExistingJob) -> Job:
    return job


@router.delete("/jobs/{job_id}", response_model=Job, responses=errors(404, 409, 422),
               summary="Cancel a job (answers 'cancelling', then it becomes 'cancelled'); with purge=true, "
                       "delete a finished job's records, events and files")
def cancel_job(job: ExistingJob, manager: Manager, store: Store, control: Control,
               purge: bool = Query(False, description="delete the finished job and everything it left")) -> Job:
    if purge:
        manager.purge(job.id, store=store, control=control)
        return job
    return manager.cancel(job.id, store=store, control=control)


#: the largest part of a Redis stream id (an unsigned 64-bit number)
_STREAM_ID_PART_MAX = (1 << 64) - 1


@router.get("/jobs/{job_id}/events", summary="Server-sent events: state, round, progress",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events: `id`, `event` (state, start, block, round, block_done, done, "
                                            "log, unavailable, end) and `data` (a JSON object)"},
                       **errors(404, 422)})
def job_events(request: Request, job: ExistingJob, store: Store,
               last_event_id: str | None = Query(None, max_length=41, pattern=r"^[0-9]{1,20}(-[0-9]{1,20})?$",
                                                 description="resume after this event id")) -> StreamingResponse:
    start = request.headers.get("last-event-id") or last_event_id or "0-0"
    if not _valid_stream_id(start):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid Last-Event-ID {start[:64]!r}")
    job_id = job.id

    def stream() -> Iterator[str]:
        position = start
        idle_since = time.monotonic()
        while True:
            try:
                events = store.read_events(job_id, position, block_ms=1000)
                current = None if events else store.get(job_id)
            except redis.RedisError:  # say so and end; the client resumes from its Last-Event-ID
                yield "event: unavailable\ndata: {\"detail\": \"the job store is unreachable; resume later\"}\n\n"
                return
            for entry_id, kind, data in events:
                position = entry_id
                yield f"id: {entry_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            if events:
                idle_since = time.monotonic()
                continue
            if current is None or current.state.finished:
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - idle_since > 15:
                idle_since = time.monotonic()
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _valid_stream_id(value: str) -> bool:
    """A Redis stream id (``123`` or ``123-4``, each part below 2⁶⁴): anything else would make XREAD fail."""
    left, _, right = value.partition("-")
    parts = [left] if right == "" and "-" not in value else [left, right]
    return all(part.isascii() and part.isdigit() and int(part) <= _STREAM_ID_PART_MAX for part in parts)


@router.get("/jobs/{job_id}/artifacts/{name}", summary="Download one artifact of a finished job",
            response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}},
                       **errors(404)})
def download_artifact(job: ExistingJob, name: str, config: Config) -> FileResponse:
    path = artifact_path(config.jobs_dir / job.id, name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no artifact {name!r}")
    return FileResponse(path, filename=name, media_type="application/octet-stream")

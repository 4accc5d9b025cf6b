"""``/v1/jobs``: submit, list, read and cancel jobs; follow their events; download their artifacts."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Iterator

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from qsurgeon.client.errors import UsageError
from qsurgeon.client.schemas import Job, JobList, JobState
from qsurgeon.server.api.dependencies import Config, ExistingJob, Manager, Store
from qsurgeon.server.api.jobs.runner import artifact_path
from qsurgeon.server.api.jobs.submit import create_job, parse_spec

router = APIRouter(tags=["jobs"])

#: POST /v1/jobs reads its body by hand (JSON, or multipart with file parts), so FastAPI
#: cannot derive the request body; ``qsurgeon.server.api.openapi`` adds the JobCreate schema.
_JOB_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            "multipart/form-data": {"schema": {
                "type": "object",
                "required": ["spec"],
                "properties": {
                    "spec": {"type": "string", "description": "JobCreate as JSON"},
                    "model_archive": {"type": "string", "format": "binary",
                                      "description": "tar/zip of a safetensors Hugging Face folder (model 'upload')"},
                    "calibration": {"type": "string", "format": "binary",
                                    "description": "UTF-8 text, one sample per line (calibration 'upload')"},
                },
            }},
        },
    }
}


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=Job, openapi_extra=_JOB_BODY,
             summary="Submit a prune job (JSON, or multipart with uploads)")
async def submit_job(request: Request, config: Config, store: Store, manager: Manager) -> Job:
    content_type = request.headers.get("content-type", "")
    archive_path: Path | None = None
    calibration: bytes | None = None
    try:
        if content_type.startswith("multipart/form-data"):
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
        elif content_type.startswith("application/json") or not content_type:
            spec = parse_spec(await request.body())
        else:
            raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                                "send application/json or multipart/form-data")
        job = await run_in_threadpool(create_job, config, store, spec, archive=archive_path,
                                      calibration_text=calibration)
        manager.launch(job.id)
        return job
    finally:
        if archive_path is not None:
            archive_path.unlink(missing_ok=True)


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first")
def list_jobs(store: Store, state: JobState | None = None, limit: int = Query(100, ge=1, le=1000)) -> JobList:
    return JobList(jobs=store.list(limit=limit, state=state))


@router.get("/jobs/{job_id}", response_model=Job, summary="A job's state, progress and metrics")
def get_job(job: ExistingJob) -> Job:
    return job


@router.delete("/jobs/{job_id}", response_model=Job, summary="Cancel a job; workers drop its queued blocks")
def cancel_job(job: ExistingJob, manager: Manager) -> Job:
    return manager.cancel(job.id)


@router.get("/jobs/{job_id}/events", summary="Server-sent events: state, round, progress",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events(request: Request, job: ExistingJob, store: Store,
               last_event_id: str | None = Query(None)) -> StreamingResponse:
    start = request.headers.get("last-event-id") or last_event_id or "0-0"
    if not _valid_stream_id(start):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid Last-Event-ID {start!r}")
    job_id = job.id

    def stream() -> Iterator[str]:
        position = start
        idle_since = time.monotonic()
        while True:
            events = store.read_events(job_id, position, block_ms=1000)
            for entry_id, kind, data in events:
                position = entry_id
                yield f"id: {entry_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            if events:
                idle_since = time.monotonic()
                continue
            current = store.get(job_id)
            if current is None or current.state.finished:
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - idle_since > 15:
                idle_since = time.monotonic()
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _valid_stream_id(value: str) -> bool:
    """A Redis stream id (``123`` or ``123-4``): anything else would make XREAD fail."""
    left, _, right = value.partition("-")
    return left.isdigit() and (right == "" or right.isdigit())


@router.get("/jobs/{job_id}/artifacts/{name}", summary="Download one artifact of a finished job",
            response_class=FileResponse)
def download_artifact(job: ExistingJob, name: str, config: Config) -> FileResponse:
    path = artifact_path(config.jobs_dir / job.id, name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no artifact {name!r}")
    return FileResponse(path, filename=name, media_type="application/octet-stream")

"""The /v1 routes: jobs, events, artifacts, raw block solving, solvers, metrics."""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from qsurgeon.client.errors import UsageError
from qsurgeon.client.schemas import (
    Job, JobKind, JobList, JobState, SolveAccepted, SolveRequest, SolveResult, SolverInfo,
)
from qsurgeon.server.api import engine
from qsurgeon.server.api.metrics import render_metrics
from qsurgeon.server.api.security import require_api_key
from qsurgeon.server.api.submit import create_job, parse_spec, validation_message
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.queue.base import RoundRequest
from qsurgeon.worker.queue.control import QueueControl
from qsurgeon.worker.queue.producer import RedisQueue
from qsurgeon.worker.queue.settings import QueueSettings
from qsurgeon.worker.solvers.registry import all_capabilities, solver_names

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

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


def _job_or_404(request: Request, job_id: str) -> Job:
    job = request.app.state.store.get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id!r}")
    return job


@router.post("/jobs", status_code=status.HTTP_201_CREATED, response_model=Job, openapi_extra=_JOB_BODY,
             summary="Submit a prune job (JSON, or multipart with uploads)")
async def submit_job(request: Request) -> Job:
    config, store = request.app.state.config, request.app.state.store
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
        job = await _in_thread(create_job, config, store, spec, archive=archive_path, calibration_text=calibration)
        request.app.state.manager.launch(job.id)
        return job
    except ValidationError as error:
        raise HTTPException(422, validation_message(error)) from None
    finally:
        if archive_path is not None:
            archive_path.unlink(missing_ok=True)


async def _in_thread(function, *args, **kwargs):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args, **kwargs)


@router.get("/jobs", response_model=JobList, summary="List jobs, newest first")
def list_jobs(request: Request, state: JobState | None = None, limit: int = Query(100, ge=1, le=1000)) -> JobList:
    return JobList(jobs=request.app.state.store.list(limit=limit, state=state))


@router.get("/jobs/{job_id}", response_model=Job, summary="A job's state, progress and metrics")
def get_job(request: Request, job_id: str) -> Job:
    return _job_or_404(request, job_id)


@router.delete("/jobs/{job_id}", response_model=Job, summary="Cancel a job; workers drop its queued blocks")
def cancel_job(request: Request, job_id: str) -> Job:
    _job_or_404(request, job_id)
    return request.app.state.manager.cancel(job_id)


@router.get("/jobs/{job_id}/events", summary="Server-sent events: state, round, progress",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events(request: Request, job_id: str, last_event_id: str | None = Query(None)) -> StreamingResponse:
    _job_or_404(request, job_id)
    store = request.app.state.store
    start = request.headers.get("last-event-id") or last_event_id or "0-0"
    if not _valid_stream_id(start):
        raise HTTPException(422, f"invalid Last-Event-ID {start!r}")

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
            job = store.get(job_id)
            if job is None or job.state.finished:
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - idle_since > 15:
                idle_since = time.monotonic()
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _valid_stream_id(value: str) -> bool:
    left, _, right = value.partition("-")
    return left.isdigit() and (right == "" or right.isdigit())


@router.get("/jobs/{job_id}/artifacts/{name}", summary="Download one artifact of a finished job",
            response_class=FileResponse)
def download_artifact(request: Request, job_id: str, name: str) -> FileResponse:
    _job_or_404(request, job_id)
    path = engine.artifact_path(request.app.state.config.jobs_dir / job_id, name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no artifact {name!r}")
    return FileResponse(path, filename=name, media_type="application/octet-stream")


@router.get("/options", summary="Prune options a job may set, with their defaults")
def prune_options() -> dict[str, object]:
    from qsurgeon.client.options import JobOptions

    return {name: info.get_default(call_default_factory=True) for name, info in JobOptions.model_fields.items()}


# ---------------------------------------------------------------------- raw block problems
def build_problem(body: SolveRequest) -> BlockProblem:
    common = dict(offset=body.offset, x0=body.x0, id=body.id or "block")
    if body.k is not None:
        common["k"] = body.k
    else:
        common["groups"] = np.asarray(body.groups, dtype=np.int64)
        common["counts"] = np.asarray(body.counts, dtype=np.int64)
    if body.Q is not None:
        return BlockProblem.dense(np.asarray(body.Q, dtype=np.float64), **common)
    return BlockProblem.factored(np.asarray(body.F, dtype=np.float64),
                                 None if body.c is None else np.asarray(body.c, dtype=np.float64), **common)


@router.post("/solve", response_model=SolveResult | SolveAccepted, summary="Solve one raw block problem",
             responses={202: {"model": SolveAccepted}})
def solve_block(request: Request, body: SolveRequest):
    config, store, manager = request.app.state.config, request.app.state.store, request.app.state.manager
    if body.solver not in solver_names():
        raise UsageError(f"unknown solver {body.solver!r}; choose one of: {', '.join(solver_names())}")
    try:
        ragged = body.Q is not None and any(len(row) != len(body.Q) for row in body.Q)
        if ragged:
            raise UsageError("Q must be a square matrix (every row as long as there are rows)")
        problem = build_problem(body)
    except ValueError as error:
        raise UsageError(str(error)) from None
    queue = QueueControl(request.app.state.redis, config.queue)
    if problem.num_variables > config.sync_solve_max_variables:
        job_id = uuid.uuid4().hex
        job_dir = config.jobs_dir / job_id
        job_dir.mkdir(parents=True)
        problem.save_npz(job_dir / "problem.npz")
        job = store.create(JobKind.solve, {"job_id": job_id, "solver": body.solver, "params": body.params},
                           model=None, options={"solver": body.solver, "variables": problem.num_variables},
                           job_id=job_id)
        manager.launch(job_id)
        return JSONResponse(SolveAccepted(job=job).model_dump(mode="json"), status_code=status.HTTP_202_ACCEPTED)
    if not queue.live_workers():
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "no worker is running; start `qsurgeon worker`")
    settings = QueueSettings(**{**config.queue.__dict__, "round_timeout": config.sync_solve_timeout})
    sync_queue = RedisQueue(settings=settings, client=request.app.state.redis)
    result = sync_queue.run_round(RoundRequest(job_id=f"solve-{uuid.uuid4().hex}", round_id="0", problems=[problem],
                                               solver=body.solver, params=body.params))
    solution = result.solutions[0]
    if solution is None:
        reason = result.failures.get(problem.id, "no answer")
        code = status.HTTP_504_GATEWAY_TIMEOUT if "timed out" in reason else 422
        raise HTTPException(code, f"the problem was not solved: {reason}")
    return SolveResult(**solution.to_dict())


@router.get("/solvers", response_model=list[SolverInfo], summary="Solvers and their capabilities")
def solvers() -> list[SolverInfo]:
    return [SolverInfo(**capability.to_dict()) for capability in all_capabilities()]


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(render_metrics(request.app), media_type="text/plain; version=0.0.4")

"""Turning a job request (JSON or multipart) into a stored job: resolve the model and the
calibration on the server's side, validate the options, and only then create the job.
Nothing is stored when anything is wrong, and an upload's files are removed again."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from qsurgeon.client.errors import UsageError
from qsurgeon.client.schemas import Job, JobCreate, JobKind
from qsurgeon.server.api.config import ServiceConfig
from qsurgeon.server.api.jobs.archives import extract_model_archive
from qsurgeon.server.api.jobs.runner import OUTPUT_FOLDER, build_options
from qsurgeon.server.api.jobs.store import JobStore

MAX_CALIBRATION_BYTES = 64 << 20


def parse_spec(raw: bytes | str) -> JobCreate:
    """The job request body; malformed JSON -> MalformedRequest (400), bad fields ->
    pydantic's ValidationError (422, each field named, e.g. ``options.block_size``)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedRequest(f"malformed JSON: {error}") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the request body must be a JSON object")
    return JobCreate.model_validate(data)


class MalformedRequest(UsageError):
    """Answered with 400."""


def model_path_for_request(config: ServiceConfig, name: str) -> str:
    """The path (or builtin name) the engine loads for a request's model name: a builtin as
    it is, any other name only as a folder directly inside the server's models folder."""
    if name.startswith("builtin:"):
        return name
    if config.models_dir is None:
        raise UsageError("this server has no models folder; use model 'builtin:minilm' or upload one")
    candidate = (config.models_dir / name).resolve()
    if candidate.parent != config.models_dir or not candidate.is_dir():
        raise UsageError(f"no model named {name!r} in the server's models folder")
    return str(candidate)


def create_job(config: ServiceConfig, store: JobStore, spec: JobCreate, *, archive: Path | None = None,
               calibration_text: bytes | None = None) -> Job:
    if (spec.model == "upload") != (archive is not None):
        raise UsageError("model 'upload' goes with a model_archive file part, and only with it")
    if (spec.calibration == "upload") != (calibration_text is not None):
        raise UsageError("calibration 'upload' goes with a calibration file part, and only with it")
    job_id = uuid.uuid4().hex
    job_dir = config.jobs_dir / job_id
    try:
        job_dir.mkdir(parents=True)
        if archive is not None:
            model_path = str(extract_model_archive(archive, job_dir / "model", max_bytes=config.max_extracted_bytes))
        else:
            model_path = model_path_for_request(config, spec.model)
        calibration = "builtin"
        if calibration_text is not None:
            calibration = str(_save_calibration(job_dir, calibration_text))
        # validate every option now, so a bad request is a 4xx and never a failed job
        options = spec.options.model_dump(mode="json", exclude_unset=True)  # explicit ones: a preset fills the rest
        build_options(options, model_path=model_path, calibration=calibration, out_dir=job_dir / OUTPUT_FOLDER)
        internal: dict[str, Any] = {"model_path": model_path, "calibration": calibration, "options": options}
        return store.create(JobKind.prune, internal, model=spec.model, options=options, job_id=job_id)
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise


def _save_calibration(job_dir: Path, data: bytes) -> Path:
    if len(data) > MAX_CALIBRATION_BYTES:
        raise UsageError(f"the calibration file is larger than {MAX_CALIBRATION_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("the calibration file must be UTF-8 text, one sample per line") from None
    if not text.strip():
        raise UsageError("the calibration file is empty")
    path = job_dir / "calibration.txt"
    path.write_text(text, encoding="utf-8")
    return path


"""Turning a job request (JSON or multipart) into a stored job: resolve the model and the
calibration on the server's side, validate the options, and only then create the job.
Nothing is stored when anything is wrong, and an upload's files are removed again."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
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
    check_depth(raw)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise MalformedRequest(f"malformed JSON: {error}") from None
    if not isinstance(data, dict):
        raise MalformedRequest("the request body must be a JSON object")
    return JobCreate.model_validate(data)


class MalformedRequest(UsageError):
    """Answered with 400."""


class Conflict(UsageError):
    """Answered with 409: the request collides with what exists (an Idempotency-Key reused
    with another body, or still being served)."""


#: JSON nested deeper than this is refused before parsing (Python's parser would recurse)
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def check_depth(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` before parsing it: strings are cut out, then
    the brackets alone are counted, so a 100 000-deep body costs a linear scan, not a
    RecursionError."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > limit:
                raise MalformedRequest(f"the JSON body is nested deeper than {limit} levels")
        else:
            depth -= 1


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
               calibration_text: bytes | None = None, owner: str = "") -> Job:
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
        return store.create(JobKind.prune, internal, model=spec.model, options=options, job_id=job_id, owner=owner,
                            deadline=time.time() + config.job_deadline_seconds)
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



def request_digest(spec: JobCreate, archive: Path | None, calibration: bytes | None) -> str:
    """What makes two submissions the same: the spec (canonical JSON) and the uploads' bytes."""
    hasher = hashlib.sha256(spec.model_dump_json().encode())
    if archive is not None:
        with open(archive, "rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
    hasher.update(b"|calibration|" + (calibration or b""))
    return hasher.hexdigest()


def claim_idempotency_key(store: JobStore, owner: str, key: str, digest: str, ttl: float) -> str | None:
    """The job an earlier request with this Idempotency-Key made, or None (this request makes it).

    The key's slot is taken with SET NX first, so two requests racing with one key make one
    job; the slot holds ``pending|digest`` until :func:`settle_idempotency_key` names the job.
    Conflict: the same key came with another body, or its first request is still being served.
    """
    slot = store.idempotency_key(owner, hashlib.sha256(key.encode()).hexdigest()[:32])
    if store.redis.set(slot, f"pending|{digest}", nx=True, ex=120):
        return None
    value = (store.redis.get(slot) or b"").decode()
    held, _, held_digest = value.partition("|")
    if held_digest != digest:
        raise Conflict("this Idempotency-Key was used with a different request; use a new key")
    if held == "pending":
        raise Conflict("a request with this Idempotency-Key is still being served; retry shortly")
    return held


def settle_idempotency_key(store: JobStore, owner: str, key: str, digest: str, job_id: str | None,
                           ttl: float) -> None:
    """Name the job a key made (kept for the retention time), or free the key when none was made."""
    slot = store.idempotency_key(owner, hashlib.sha256(key.encode()).hexdigest()[:32])
    if job_id is None:
        store.redis.delete(slot)
    else:
        store.redis.set(slot, f"{job_id}|{digest}", ex=int(ttl))

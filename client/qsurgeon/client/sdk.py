"""Python SDK for the qsurgeon service: :class:`Client` (blocking) and :class:`AsyncClient`.

Base install only (httpx + pydantic): no numpy or torch is imported here, so anyone can
submit jobs from a laptop. Arrays given to :meth:`Client.solve` may be numpy arrays (they
are converted with ``.tolist()``) or nested lists.

    from qsurgeon.client.sdk import Client
    with Client("http://localhost:8000", api_key="...") as client:
        job = client.submit_prune("builtin:minilm", density=0.5, epochs=1)
        for event in client.events(job):
            print(event.type, event.data)
        client.download(client.wait(job), "pruned/")
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping

import httpx
from pydantic import ValidationError

from qsurgeon.client.errors import QsurgeonError, UsageError
from qsurgeon.client.options import DEFAULT_SOLVER, JobOptions, describe_error
from qsurgeon.client.schemas import (
    API_PREFIX, Job, JobEvent, JobList, JobState, SolveAccepted, SolveResult, SolverInfo,
)

JobRef = Job | str


# ---------------------------------------------------------------------- typed errors
class ApiError(QsurgeonError):
    """The server answered with an error; ``status`` is the HTTP code, ``detail`` its reason."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}" if status else str(detail))


class BadRequestError(ApiError, UsageError):
    """400/413/415/422: the request was wrong; the message says what."""


class AuthenticationError(ApiError, UsageError):
    """401/403: missing or wrong API key."""


class NotFoundError(ApiError, UsageError):
    """404: no such job or artifact."""


class ServiceUnavailableError(ApiError):
    """503/504: no workers, Redis down, or a synchronous solve timed out."""


class ServerError(ApiError):
    """5xx: a bug or outage on the server."""


class JobFailedError(QsurgeonError):
    """``wait`` saw the job end as failed or cancelled."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(f"job {job.id} {job.state.value}" + (f": {job.error}" if job.error else ""))


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except (json.JSONDecodeError, AttributeError, ValueError):
        detail = response.text or response.reason_phrase
    status = response.status_code
    if status in (401, 403):
        raise AuthenticationError(status, detail)
    if status == 404:
        raise NotFoundError(status, detail)
    if status in (400, 409, 413, 415, 422):
        raise BadRequestError(status, detail)
    if status in (503, 504):
        raise ServiceUnavailableError(status, detail)
    raise ServerError(status, detail)


#: submit retries: a request that may not have arrived (no answer, 503) is sent again with the
#: same Idempotency-Key, so the server makes the job once however often it is sent
SUBMIT_ATTEMPTS = 4
SUBMIT_BACKOFF = 0.5


def _submit_retryable(error: Exception) -> bool:
    return isinstance(error, ServiceUnavailableError) and error.status in (0, 503)


def _job_id(job: JobRef) -> str:
    job_id = job.id if isinstance(job, Job) else str(job)
    if not job_id or "/" in job_id:
        raise UsageError(f"invalid job id {job_id!r}")
    return job_id


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _listify(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _solve_body(Q: Any, k: int | None, *, F: Any, c: Any, groups: Any, counts: Any, x0: Any, offset: float,
                solver: str, params: Mapping[str, Any] | None, problem_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"solver": solver, "offset": float(offset), "params": dict(params or {}), "id": problem_id}
    for name, value in (("Q", Q), ("F", F), ("c", c), ("groups", groups), ("counts", counts), ("x0", x0)):
        if value is not None:
            body[name] = _listify(value)
    if k is not None:
        body["k"] = int(k)
    return body


def _parse_solve(response: httpx.Response) -> SolveResult | Job:
    _raise_for(response)
    if response.status_code == 202:
        return SolveAccepted.model_validate(response.json()).job
    return SolveResult.model_validate(response.json())


def pack_model_folder(folder: str | Path) -> bytes:
    """A tar.gz of a model folder's files (no links, no sub-folders' pickles: the server checks)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UsageError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if any(part.startswith(".") for part in relative.parts):
                continue  # .gitattributes, .cache: not part of the model
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buffer.getvalue()


def _job_request(model: str | os.PathLike, calibration: str | os.PathLike, options: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, tuple[str, bytes, str]]]:
    """JSON spec plus the multipart files: a local folder or archive is uploaded, a name is not.

    The options are checked here with the server's own declaration, so a bad one fails
    before anything is uploaded."""
    try:
        JobOptions.model_validate(options)
    except ValidationError as error:
        raise UsageError(describe_error(error)) from None
    files: dict[str, tuple[str, bytes, str]] = {}
    model_text = os.fspath(model)
    local = Path(model_text)
    spec: dict[str, Any] = {"options": options}
    if not model_text.startswith("builtin:") and (local.is_dir() or local.is_file()):
        data = pack_model_folder(local) if local.is_dir() else local.read_bytes()
        files["model_archive"] = (local.name + (".tar.gz" if local.is_dir() else ""), data, "application/octet-stream")
        spec["model"] = "upload"
    else:
        spec["model"] = model_text
    calibration_text = os.fspath(calibration)
    if calibration_text != "builtin":
        path = Path(calibration_text)
        if not path.is_file():
            raise UsageError(f"calibration file {calibration_text!r} does not exist")
        files["calibration"] = (path.name, path.read_bytes(), "text/plain")
        spec["calibration"] = "upload"
    else:
        spec["calibration"] = "builtin"
    return spec, files


class _SSEParser:
    """Feed lines of a text/event-stream; returns a JobEvent at each blank line."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.event_id, self.kind, self.data = "", "message", []

    def feed(self, line: str) -> JobEvent | None:
        if line == "":
            event = None
            if self.data or self.kind != "message":
                payload = json.loads("\n".join(self.data)) if self.data else {}
                event = JobEvent(id=self.event_id, type=self.kind, data=payload)
            self._reset()
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            self.event_id = value
        elif field == "event":
            self.kind = value
        elif field == "data":
            self.data.append(value)
        return None


def _parse_sse(lines: Iterator[str]) -> Iterator[JobEvent]:
    parser = _SSEParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event


# ---------------------------------------------------------------------- blocking client

def _settled(current: Job, deadline: float | None, timeout: float | None, raise_on_failure: bool) -> Job | None:
    """The job once it has finished (JobFailedError if it did not succeed and that should raise);
    None while it runs; TimeoutError past the deadline."""
    if current.state.finished:
        if raise_on_failure and current.state != JobState.succeeded:
            raise JobFailedError(current)
        return current
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"job {current.id} still {current.state.value} after {timeout} s")
    return None

def _artifact_targets(dest: str | os.PathLike, names: list[str]) -> list[tuple[str, Path]]:
    """(name, path in ``dest``) per artifact; refuses names that could leave the folder."""
    folder = Path(dest)
    for name in names:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UsageError(f"invalid artifact name {name!r}")
    folder.mkdir(parents=True, exist_ok=True)
    return [(name, folder / name) for name in names]

class Client:
    """Blocking client. ``url`` is the server's base URL; ``api_key`` its bearer token
    (default: ``$QSURGEON_API_KEY``)."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=_headers(api_key or os.environ.get("QSURGEON_API_KEY")),
                                  timeout=timeout, transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ServiceUnavailableError(0, f"cannot reach {self.url}: {error}") from None
        _raise_for(response)
        return response

    # jobs
    def submit_prune(self, model: str | os.PathLike = "builtin:minilm", *, calibration: str | os.PathLike = "builtin",
                     **options: Any) -> Job:
        """Submit a prune job; ``options`` are ``qsurgeon prune`` options (density=0.5, epochs=1, ...)."""
        spec, files = _job_request(model, calibration, options)
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                if files:
                    response = self._request("POST", f"{API_PREFIX}/jobs", data={"spec": json.dumps(spec)},
                                             files=files, headers=headers)
                else:
                    response = self._request("POST", f"{API_PREFIX}/jobs", json=spec, headers=headers)
                return Job.model_validate(response.json())
            except ServiceUnavailableError as error:
                if not _submit_retryable(error) or attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                time.sleep(SUBMIT_BACKOFF * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def purge(self, job: JobRef) -> Job:
        """Delete a finished job's records, events and files on the server; returns its last record."""
        return Job.model_validate(self._request("DELETE", f"{API_PREFIX}/jobs/{_job_id(job)}",
                                                params={"purge": "true"}).json())

    def get(self, job: JobRef) -> Job:
        return Job.model_validate(self._request("GET", f"{API_PREFIX}/jobs/{_job_id(job)}").json())

    def list(self, state: JobState | str | None = None, limit: int = 100) -> list[Job]:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = JobState(state).value
        return JobList.model_validate(self._request("GET", f"{API_PREFIX}/jobs", params=params).json()).jobs

    def cancel(self, job: JobRef) -> Job:
        return Job.model_validate(self._request("DELETE", f"{API_PREFIX}/jobs/{_job_id(job)}").json())

    def events(self, job: JobRef, last_event_id: str | None = None) -> Iterator[JobEvent]:
        """Server-sent events until the job finishes (the stream's last event has type ``end``)."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        try:
            with self._http.stream("GET", f"{API_PREFIX}/jobs/{_job_id(job)}/events", headers=headers,
                                   timeout=httpx.Timeout(None, connect=10.0)) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                yield from _parse_sse(response.iter_lines())
        except httpx.TransportError as error:
            raise ServiceUnavailableError(0, f"event stream from {self.url} broke: {error}") from None

    def wait(self, job: JobRef, *, timeout: float | None = None, poll: float = 1.0, raise_on_failure: bool = True) -> Job:
        """Poll until the job is finished; raises JobFailedError if it failed or was cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (current := _settled(self.get(job), deadline, timeout, raise_on_failure)) is None:
            time.sleep(poll)
        return current

    def download(self, job: JobRef, dest: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
        """Save the job's artifacts (all, or ``names``) into folder ``dest``; returns the paths."""
        current = self.get(job)
        saved = []
        for name, target in _artifact_targets(dest, names if names is not None else current.artifacts):
            partial = target.with_name(target.name + ".partial")
            with self._http.stream("GET", f"{API_PREFIX}/jobs/{current.id}/artifacts/{name}") as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                with open(partial, "wb") as handle:
                    for chunk in response.iter_bytes(1 << 20):
                        handle.write(chunk)
            partial.replace(target)
            saved.append(target)
        return saved

    # raw blocks and the service
    def solve(self, Q: Any = None, k: int | None = None, *, F: Any = None, c: Any = None, groups: Any = None,
              counts: Any = None, x0: Any = None, offset: float = 0.0, solver: str = DEFAULT_SOLVER,
              params: Mapping[str, Any] | None = None, problem_id: str = "") -> SolveResult | Job:
        """Solve one block problem; a large one comes back as a Job (its answer: artifact solution.json)."""
        body = _solve_body(Q, k, F=F, c=c, groups=groups, counts=counts, x0=x0, offset=offset, solver=solver,
                           params=params, problem_id=problem_id)
        try:
            response = self._http.post(f"{API_PREFIX}/solve", json=body)
        except httpx.TransportError as error:
            raise ServiceUnavailableError(0, f"cannot reach {self.url}: {error}") from None
        return _parse_solve(response)

    def solvers(self) -> list[SolverInfo]:
        return [SolverInfo.model_validate(item) for item in self._request("GET", f"{API_PREFIX}/solvers").json()]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz").json()

    def ready(self) -> bool:
        try:
            return bool(self._request("GET", "/readyz").json().get("ready"))
        except ServiceUnavailableError:
            return False


# ---------------------------------------------------------------------- async client
class AsyncClient:
    """The same calls as :class:`Client`, for asyncio code."""

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url,
                                       headers=_headers(api_key or os.environ.get("QSURGEON_API_KEY")),
                                       timeout=timeout, transport=transport)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ServiceUnavailableError(0, f"cannot reach {self.url}: {error}") from None
        _raise_for(response)
        return response

    async def submit_prune(self, model: str | os.PathLike = "builtin:minilm", *,
                           calibration: str | os.PathLike = "builtin", **options: Any) -> Job:
        import asyncio

        spec, files = _job_request(model, calibration, options)
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                if files:
                    response = await self._request("POST", f"{API_PREFIX}/jobs", data={"spec": json.dumps(spec)},
                                                   files=files, headers=headers)
                else:
                    response = await self._request("POST", f"{API_PREFIX}/jobs", json=spec, headers=headers)
                return Job.model_validate(response.json())
            except ServiceUnavailableError as error:
                if not _submit_retryable(error) or attempt == SUBMIT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(SUBMIT_BACKOFF * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def purge(self, job: JobRef) -> Job:
        response = await self._request("DELETE", f"{API_PREFIX}/jobs/{_job_id(job)}", params={"purge": "true"})
        return Job.model_validate(response.json())

    async def get(self, job: JobRef) -> Job:
        return Job.model_validate((await self._request("GET", f"{API_PREFIX}/jobs/{_job_id(job)}")).json())

    async def list(self, state: JobState | str | None = None, limit: int = 100) -> list[Job]:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = JobState(state).value
        response = await self._request("GET", f"{API_PREFIX}/jobs", params=params)
        return JobList.model_validate(response.json()).jobs

    async def cancel(self, job: JobRef) -> Job:
        return Job.model_validate((await self._request("DELETE", f"{API_PREFIX}/jobs/{_job_id(job)}")).json())

    async def events(self, job: JobRef, last_event_id: str | None = None) -> AsyncIterator[JobEvent]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        async with self._http.stream("GET", f"{API_PREFIX}/jobs/{_job_id(job)}/events", headers=headers,
                                     timeout=httpx.Timeout(None, connect=10.0)) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            parser = _SSEParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event

    async def wait(self, job: JobRef, *, timeout: float | None = None, poll: float = 1.0,
                   raise_on_failure: bool = True) -> Job:
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        while (current := _settled(await self.get(job), deadline, timeout, raise_on_failure)) is None:
            await asyncio.sleep(poll)
        return current

    async def download(self, job: JobRef, dest: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
        current = await self.get(job)
        saved = []
        for name, target in _artifact_targets(dest, names if names is not None else current.artifacts):
            response = await self._request("GET", f"{API_PREFIX}/jobs/{current.id}/artifacts/{name}")
            target.write_bytes(response.content)
            saved.append(target)
        return saved

    async def solve(self, Q: Any = None, k: int | None = None, *, F: Any = None, c: Any = None, groups: Any = None,
                    counts: Any = None, x0: Any = None, offset: float = 0.0, solver: str = DEFAULT_SOLVER,
                    params: Mapping[str, Any] | None = None, problem_id: str = "") -> SolveResult | Job:
        body = _solve_body(Q, k, F=F, c=c, groups=groups, counts=counts, x0=x0, offset=offset, solver=solver,
                           params=params, problem_id=problem_id)
        try:
            response = await self._http.post(f"{API_PREFIX}/solve", json=body)
        except httpx.TransportError as error:
            raise ServiceUnavailableError(0, f"cannot reach {self.url}: {error}") from None
        return _parse_solve(response)

    async def solvers(self) -> list[SolverInfo]:
        response = await self._request("GET", f"{API_PREFIX}/solvers")
        return [SolverInfo.model_validate(item) for item in response.json()]


__all__ = [
    "ApiError", "AsyncClient", "AuthenticationError", "BadRequestError", "Client", "JobFailedError",
    "NotFoundError", "ServerError", "ServiceUnavailableError", "pack_model_folder",
]

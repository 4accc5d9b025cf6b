"""What an orchestrator is configured with: where Redis, data and models are, and its limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.queue.settings import DEFAULT_REDIS_URL, QueueSettings


def load_api_keys(keys_file: str | Path | None = None, env: str | None = None) -> frozenset[str]:
    """Keys from ``QSURGEON_API_KEYS`` (comma-separated) and/or a file (one key a line, # comments)."""
    keys: set[str] = set()
    raw = os.environ.get("QSURGEON_API_KEYS", "") if env is None else env
    keys.update(part.strip() for part in raw.split(",") if part.strip())
    if keys_file:
        path = Path(keys_file)
        if not path.is_file():
            raise UsageError(f"API keys file {str(path)!r} does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    short = [key for key in keys if len(key) < 16]
    if short:
        raise UsageError(f"{len(short)} API key(s) shorter than 16 characters; use long random keys")
    return frozenset(keys)


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``qsurgeon serve`` needs; tests build one directly."""

    data_dir: Path
    redis_url: str = DEFAULT_REDIS_URL
    models_dir: Path | None = None
    api_keys: frozenset[str] = frozenset()
    queue: QueueSettings = field(default_factory=QueueSettings)
    max_upload_bytes: int = 512 << 20  # a whole multipart request
    max_json_bytes: int = 64 << 20  # a JSON body (raw /solve problems are JSON)
    max_extracted_bytes: int = 2 << 30  # an unpacked model archive
    sync_solve_max_variables: int = 1024  # larger /solve problems become jobs
    sync_solve_timeout: float = 60.0
    max_running_jobs: int = 2  # 0: an API-only orchestrator (another one runs the jobs)
    lock_ttl: float = 6.0  # seconds an orchestrator's claim on a running job lasts unrenewed
    admin_keys: frozenset[str] = frozenset()  # keys that see and cancel every key's jobs
    retention_seconds: float = 7 * 24 * 3600.0  # finished jobs (records, events, files) are deleted after
    job_deadline_seconds: float = 48 * 3600.0  # a job still unfinished this long after submission fails
    no_worker_timeout: float = 600.0  # a round with no live worker for its solver this long fails its job
    supervise_interval: float = 5.0  # how often orphaned jobs, deadlines and retention are checked

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.models_dir is not None:
            object.__setattr__(self, "models_dir", Path(self.models_dir).resolve())
            if not self.models_dir.is_dir():
                raise UsageError(f"models folder {str(self.models_dir)!r} does not exist")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if min(self.retention_seconds, self.job_deadline_seconds, self.no_worker_timeout,
               self.supervise_interval) <= 0:
            raise UsageError("retention, job deadline, no-worker timeout and supervise interval must be positive")

    @property
    def all_keys(self) -> frozenset[str]:
        return self.api_keys | self.admin_keys

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

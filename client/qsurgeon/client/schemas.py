"""The REST API's request and response bodies, shared by the server and the SDK.

Pydantic only (the base install): the server validates requests with these classes and
FastAPI publishes them in the OpenAPI document; the SDK parses responses with them, so
both sides always agree on field names and types.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qsurgeon.client.options import DEFAULT_SOLVER, SOLVER_NAME, JobOptions

API_PREFIX = "/v1"
BUILTIN_MODELS = ("builtin:minilm",)
#: a model name in the operator's models folder: one path component, no dots first
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobState(str, Enum):
    """``cancelling``: cancel was asked and the job's thread has not stopped yet."""

    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class JobKind(str, Enum):
    prune = "prune"
    solve = "solve"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobCreate(_Strict):
    """A prune job. ``options`` are the fields of ``qsurgeon prune`` (:class:`JobOptions`, with bounds);
    ``model`` is ``builtin:minilm``, a name in the server's models folder, or ``upload``
    (multipart: the archive travels in the ``model_archive`` part). ``calibration`` is
    ``builtin`` or ``upload`` (a UTF-8 text file in the ``calibration`` part)."""

    model: str = Field("builtin:minilm", examples=["builtin:minilm"])
    calibration: str = Field("builtin", examples=["builtin"])
    options: JobOptions = Field(default_factory=JobOptions, examples=[{"density": 0.5, "seed": 0}])

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if value in BUILTIN_MODELS or value == "upload" or MODEL_NAME.fullmatch(value):
            return value
        raise ValueError(
            "model must be 'builtin:minilm', 'upload', or the name of a folder in the server's models folder "
            "(letters, digits, '.', '_', '-'; no paths)"
        )

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, value: str) -> str:
        if value not in ("builtin", "upload"):
            raise ValueError("calibration must be 'builtin' or 'upload'")
        return value


class Progress(BaseModel):
    """Where a job is; fields the engine does not report stay None."""

    fraction: float = 0.0
    round: int = 0
    rounds_total: int | None = None
    epoch: int | None = None
    stage: str | None = None
    blocks_solved: int = 0
    blocks_accepted: int = 0
    blocks_failed: int = 0  # blocks with no usable answer (they keep their current assignment)
    blocks_retried: int = 0  # blocks answered on a second or later delivery
    blocks_dead: int = 0  # blocks dead-lettered after too many deliveries (counted in blocks_failed too)
    blocks_resent: int = 0  # blocks sent again because Redis lost a round
    energy: float | None = None
    message: str | None = None
    model_config = ConfigDict(extra="allow")


class Job(BaseModel):
    id: str
    kind: JobKind = JobKind.prune
    state: JobState
    created: float
    started: float | None = None
    finished: float | None = None
    model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    artifacts: list[str] = Field(default_factory=list)
    resumed: int = 0  # how many times an orchestrator restart resumed this job
    deadline: float | None = None  # unix time by which the job must finish, or it fails


class JobList(BaseModel):
    jobs: list[Job]


class JobEvent(BaseModel):
    """One server-sent event of ``GET /v1/jobs/{id}/events``."""

    id: str  # the event's position; send it back as Last-Event-ID to resume
    type: str  # state, round, progress, log
    data: dict[str, Any] = Field(default_factory=dict)


#: the largest block a raw request may describe, and the bounds of its integers and numbers
MAX_SOLVE_VARIABLES = 1 << 16
_Count = Annotated[int, Field(ge=0, le=MAX_SOLVE_VARIABLES)]
_Label = Annotated[int, Field(ge=0, le=MAX_SOLVE_VARIABLES)]
_Bit = Annotated[int, Field(ge=0, le=1)]
_Real = Annotated[float, Field(allow_inf_nan=False)]
_Row = Annotated[list[_Real], Field(min_length=1, max_length=MAX_SOLVE_VARIABLES)]
_PARAM_VALUE = {"anyOf": [{"type": "number"}, {"type": "string", "maxLength": 200}, {"type": "boolean"}]}


def _no_explicit_null(value: Any) -> Any:
    if value is None:
        raise ValueError("leave the field out instead of sending null")
    return value


class SolveRequest(_Strict):
    """One raw block problem: ``Q`` (B×B) or ``F`` (r×B) with optional ``c``; ``k`` or
    ``groups`` (a label per variable) with ``counts`` (how many ones per label)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,  # a JSON false is not an offset, "3" is not a count: the schema's types, exactly
        json_schema_extra={
            "allOf": [
                {"oneOf": [{"required": ["Q"]}, {"required": ["F"]}]},
                {"oneOf": [{"required": ["k"]}, {"required": ["groups", "counts"]}]},
            ],
            "dependentRequired": {"c": ["F"], "groups": ["counts"], "counts": ["groups"]},
        },
    )

    Q: list[_Row] = Field(None, min_length=1, max_length=MAX_SOLVE_VARIABLES, description="B×B matrix")
    F: list[_Row] = Field(None, min_length=1, max_length=MAX_SOLVE_VARIABLES,
                          description="r×B factor (Q = FᵀF + diag c)")
    c: list[_Real] = Field(None, min_length=1, max_length=MAX_SOLVE_VARIABLES)
    k: _Count = Field(None, description="ones in the answer (or give groups and counts)")
    groups: list[_Label] = Field(None, min_length=1, max_length=MAX_SOLVE_VARIABLES,
                                 description="a group label per variable")
    counts: list[_Count] = Field(None, min_length=1, max_length=MAX_SOLVE_VARIABLES,
                                 description="ones per group label")
    x0: list[_Bit] = Field(None, min_length=1, max_length=MAX_SOLVE_VARIABLES, description="a start assignment")
    offset: _Real = 0.0
    solver: str = Field(DEFAULT_SOLVER, pattern=SOLVER_NAME)
    params: dict[str, Any] = Field(default_factory=dict, max_length=64,
                                   json_schema_extra={"additionalProperties": _PARAM_VALUE})
    id: str = Field("", max_length=200)

    _not_null = field_validator("Q", "F", "c", "k", "groups", "counts", "x0", mode="before")(
        classmethod(lambda cls, value: _no_explicit_null(value)))

    @model_validator(mode="after")
    def _one_matrix(self) -> "SolveRequest":
        if (self.Q is None) == (self.F is None):
            raise ValueError("give exactly one of Q or F")
        if self.c is not None and self.F is None:
            raise ValueError("c goes with F only")
        if (self.k is None) == (self.groups is None and self.counts is None):
            raise ValueError("give k, or groups with counts (not both)")
        if self.k is None and (self.groups is None or self.counts is None):
            raise ValueError("groups and counts go together")
        for name, value in self.params.items():
            if isinstance(value, str) and len(value) > 200:
                raise ValueError(f"params.{name} is longer than 200 characters")
            if not isinstance(value, (int, float, str, bool)) or value is None:
                raise ValueError(f"params.{name} must be a number, string or boolean")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"params.{name} must be finite")
        return self

    @property
    def num_variables(self) -> int:
        return len(self.Q) if self.Q is not None else (len(self.F[0]) if self.F else 0)


class SolveResult(BaseModel):
    x: list[int]
    energy: float
    solver: str
    seconds: float = 0.0
    sweeps: int = 0
    restarts: int = 0
    problem_id: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class SolveAccepted(BaseModel):
    """A large problem runs as a job; its answer becomes the artifact ``solution.json``."""

    job: Job


class SolverInfo(BaseModel):
    name: str
    description: str
    max_variables: int
    constraints: str
    device: str
    needs_gpu: bool = False
    deterministic: bool = True
    exact: bool = False
    extra: str = ""
    installed: bool = True
    missing: str = ""


class Health(BaseModel):
    status: str = "ok"
    version: str = ""


class Readiness(BaseModel):
    ready: bool
    redis: bool
    workers: int
    detail: str = ""


class ErrorBody(BaseModel):
    """Every error answer: what is wrong, in one sentence."""

    detail: str


__all__ = [
    "API_PREFIX", "BUILTIN_MODELS", "ErrorBody", "Health", "Job", "JobCreate", "JobEvent", "JobKind", "JobList",
    "JobState", "Progress", "Readiness", "SolveAccepted", "SolveRequest", "SolveResult", "SolverInfo",
]

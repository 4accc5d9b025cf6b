"""The solver interface, in the spirit of dimod's Sampler: one ``sample`` method.

A solver turns a :class:`BlockProblem` into a :class:`BlockSolution`. ``sample_batch``
exists because vectorised solvers (the annealer) answer many problems in one call; its
default simply loops. Solvers do not need to check their own answers or recompute
energies: :func:`qsurgeon.worker.solve` does both for every solver, so a buggy backend
can never push an infeasible or mis-scored answer into a pruning job.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, shown by ``qsurgeon solvers`` and ``GET /v1/solvers``."""

    name: str
    description: str
    max_variables: int
    constraints: str  # "native" (keeps counts by construction) or "penalty" (+ repair)
    device: str  # "cpu", "cpu/cuda", "simulator", "remote"
    needs_gpu: bool = False
    deterministic: bool = True  # same seed, same answer
    exact: bool = False  # proves optimality
    extra: str = "worker"  # the pip extra that installs its dependencies
    installed: bool = True
    missing: str = ""  # why it is not installed, when it is not
    remote: bool = False  # answers on a cloud service: submits tasks, waits, may cost money
    cost_model: str = ""  # what a block costs, in words ("" for local solvers: only time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Kinds of parameter values a declaration can name, and how a string spells one.
PARAM_KINDS = ("int", "float", "str", "pair", "alpha", "any")


@dataclass(frozen=True)
class Param:
    """One parameter a solver takes, declared once (like dimod's ``Sampler.parameters``).

    From this declaration come the parsing of ``--param name=value`` strings, the checks
    of every value (type, bounds, choices), the listing of ``qsurgeon solvers --json``,
    and the message that names a refused parameter. ``None`` always means "the default".

    kind: "int"; "float"; "str" (one of ``choices``); "pair" (two positive finite
    numbers, a β range); "alpha" (a positive penalty factor or "hard"); "any" (passed to
    a wrapped sampler unchecked, since only the sampler knows its own types).
    ``minimum``/``maximum`` are inclusive; ``above`` is an exclusive lower bound.
    """

    name: str
    kind: str
    help: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"parameter {self.name!r}: kind must be one of {PARAM_KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form shown by ``qsurgeon solvers --json``."""
        default = list(self.default) if isinstance(self.default, tuple) else self.default
        if not isinstance(default, (int, float, str, bool, list, type(None))):
            default = repr(default)
        return {"name": self.name, "type": self.kind, "default": default, "minimum": self.minimum,
                "maximum": self.maximum, "above": self.above, "choices": list(self.choices), "help": self.help}

    def parse(self, text: str, solver: str) -> Any:
        """A value from its command-line spelling, then checked (``none`` is the default)."""
        if text.strip().lower() in ("", "none"):
            return None
        try:
            if self.kind == "int":
                value: Any = int(text)
            elif self.kind == "float":
                value = float(text)
            elif self.kind == "pair":
                value = tuple(float(part) for part in text.split(","))
            else:
                value = text
        except ValueError:
            raise UsageError(f"{solver}: {self.name} must be {self._expected()}, got {text!r}") from None
        return self.check(value, solver)

    def check(self, value: Any, solver: str) -> Any:
        """The value, typed, or UsageError naming this parameter and what it accepts."""
        if value is None or self.kind == "any":
            return value
        if self.kind == "int":
            ok = not isinstance(value, bool) and isinstance(value, (int, np.integer)) and self._in_bounds(int(value))
            typed: Any = int(value) if ok else None
        elif self.kind == "float":
            ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
                  and math.isfinite(float(value)) and self._in_bounds(float(value)))
            typed = float(value) if ok else None
        elif self.kind == "str":
            ok = isinstance(value, str) and (not self.choices or value in self.choices)
            typed = value
        elif self.kind == "pair":
            try:
                low, high = (float(item) for item in value)
                ok = all(math.isfinite(v) and v > 0 for v in (low, high)) and not isinstance(value, (str, bytes))
                typed = (low, high)
            except (TypeError, ValueError):
                ok = False
        else:
            return parse_alpha(value)
        if not ok:
            raise UsageError(f"{solver}: {self.name} must be {self._expected()}, got {value!r}")
        return typed

    def _in_bounds(self, number: float) -> bool:
        return ((self.minimum is None or number >= self.minimum) and (self.maximum is None or number <= self.maximum)
                and (self.above is None or number > self.above))

    def _expected(self) -> str:
        if self.kind == "str":
            return f"one of {', '.join(self.choices)}" if self.choices else "a string"
        if self.kind == "pair":
            return "two positive finite numbers (start, end)"
        if self.kind == "alpha":
            return "a positive number or 'hard'"
        what = "an integer" if self.kind == "int" else "a finite number"
        bounds = []
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.minimum is not None:
            bounds.append(f"≥ {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"≤ {self.maximum:g}")
        return what + (" " + " and ".join(bounds) if bounds else "")


def parse_alpha(alpha: Any) -> float | str:
    """A penalty factor α: a positive number (or its spelling) or the word "hard"."""
    if isinstance(alpha, str):
        if alpha.strip().lower() == "hard":
            return "hard"
        try:
            alpha = float(alpha)
        except ValueError:
            raise UsageError(f"penalty alpha must be a positive number or 'hard', got {alpha!r}") from None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise UsageError(f"penalty alpha must be a positive number or 'hard', got {alpha!r}")
    return float(alpha)


#: What a solver without a declaration accepts: only the seed the engine hands every solver
#: (a solver may ignore it). Anything else is refused, so a typo never passes silently.
SEED = Param("seed", "int", "random seed (none: a fresh one)")


def declared_value(declared: Sequence[Param], checked: Mapping[str, Any], name: str) -> Any:
    """The value a call uses for ``name``: the checked one when given (not None), else the declared default."""
    value = checked.get(name)
    if value is None:
        return next(param.default for param in declared if param.name == name)
    return value


def check_params(declared: Sequence[Param], params: Mapping[str, Any], solver: str) -> dict[str, Any]:
    """The given params, checked and typed against ``declared``; no defaults are filled in.

    An unknown name raises UsageError listing every accepted one.
    """
    by_name = {param.name: param for param in declared}
    unknown = sorted(set(params) - set(by_name))
    if unknown:
        raise UsageError(f"{solver}: unknown parameter(s) {', '.join(unknown)}; it takes: "
                         f"{', '.join(sorted(by_name)) or 'none'}")
    return {name: by_name[name].check(value, solver) for name, value in params.items()}


class Solver(ABC):
    """A block solver. Subclasses set ``capabilities`` and implement :meth:`sample`.

    ``parameters`` declares what :meth:`sample` accepts (see :class:`Param`); a solver that
    leaves it as None accepts only ``seed``.
    """

    capabilities: Capabilities
    parameters: tuple[Param, ...] | None = None

    def declared_parameters(self) -> tuple[Param, ...]:
        """This solver's declaration, or ``(SEED,)`` when it declares none."""
        return self.parameters if self.parameters is not None else (SEED,)

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` checked against this solver's declaration (see :func:`check_params`)."""
        return check_params(self.declared_parameters(), params, self.name)

    @property
    def name(self) -> str:
        return self.capabilities.name

    @abstractmethod
    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        """Answer one problem. ``params`` are solver-specific (seed, restarts, ...)."""

    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        """Answer many problems; each answer must equal what :meth:`sample` gives alone."""
        return [self.sample(problem, **params) for problem in problems]


class BatchSolver(Solver):
    """A solver whose native form is a batch (one kernel call over many problems):
    subclasses implement :meth:`sample_batch`, and one problem is a batch of one."""

    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        return self.sample_batch([problem], **params)[0]

    @abstractmethod
    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        """Answer many problems; each answer equals what the problem gets alone."""


def starts_from_x0(problem: BlockProblem, start: str, solver: str) -> bool:
    """Whether a chain of ``solver`` starts from the problem's ``x0`` under its ``start`` parameter.

    ``"random"`` never does, ``"x0"`` always does (a problem without ``x0`` is an error),
    ``"auto"`` does when the problem has one.
    """
    if start == "random":
        return False
    if start == "x0" and problem.x0 is None:
        label = f"problem {problem.id!r}" if problem.id else "a problem"
        raise UsageError(f"{solver}: start='x0' but {label} has no x0")
    return problem.x0 is not None


def time_share(time_limit: float | None, started: float, work: Sequence[float], position: int) -> float | None:
    """Seconds for part ``position`` of a call run in parts (``work`` per part, in order): what is left
    of ``time_limit`` since ``started``, in proportion to that part's work among the parts not yet run.
    None without a limit."""
    if time_limit is None:
        return None
    left = max(time_limit - (time.perf_counter() - started), 0.0)
    return left * work[position] / max(sum(work[position:]), 1)

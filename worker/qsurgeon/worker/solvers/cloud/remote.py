"""What every cloud backend shares: budget, submit → record → poll → collect, retries, fallback.

A remote block costs money and minutes, and the worker that sent it may die while it
waits. So a :class:`RemoteSolver` answers a batch of blocks in four steps:

1. **admit** each block against the job's budget (:data:`BUDGET_PARAMS`: a number of
   remote blocks, QPU seconds, dollars). The ledger lives in Redis under the job's key
   when the worker's lease is there (all workers of a job share it, across rounds), else
   in this solver object (one ``qsurgeon solve``/``prune`` process). A block the budget
   refuses is answered by the classical ``fallback`` solver (``sa``), and its metadata
   says so and why.
2. **submit** the admitted blocks together (one IBM ``Batch``, say) and **record** each
   remote task id through the lease (``task:<block id>``). A retry of the message (this
   worker crashed, another reclaimed it) finds the id and **resumes** the remote task
   instead of paying for it twice.
3. **poll** until every task is done, renewing the lease at each poll so no other worker
   reclaims blocks that are merely slow; a task past ``timeout`` is cancelled.
4. **collect**: the service's samples are checked (shape, 0/1 values) and repaired to
   exact counts by the backend, and :func:`qsurgeon.worker.solve` checks the answer once
   more and recomputes its energy, so nothing a remote service returns is merged
   unchecked. A failed or timed-out task is resubmitted after a backoff that doubles
   (``retries`` times), then the block falls back.

Charges (QPU seconds, cost) are booked when a result is collected; the number of remote
blocks is reserved atomically before submission. A budget in seconds or dollars is
checked before each block against what was spent plus the average charge of the blocks
already paid, so the first batch of a job may overrun it by up to one batch (the service
only reports charges afterwards); ``max_remote_blocks`` is a hard cap.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import abstractmethod
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from qsurgeon.client.errors import QsurgeonError, UsageError
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.solvers.base import BatchSolver, Param, check_params

log = logging.getLogger(__name__)

#: The per-job budget and the remote-job policy, declared by every remote backend.
BUDGET_PARAMS: tuple[Param, ...] = (
    Param("max_remote_blocks", "int", "blocks of the job sent to the service at most (none: no cap); the rest "
          "go to the fallback", minimum=0),
    Param("qpu_seconds", "float", "QPU seconds the job may spend (none: no cap); past it, the fallback", minimum=0.0),
    Param("max_cost", "float", "US dollars the job may spend by the backend's estimate (none: no cap); past it, "
          "the fallback", minimum=0.0),
    Param("fallback", "str", "local solver for blocks past the budget or whose remote tasks failed", "sa"),
    Param("retries", "int", "resubmissions of a failed or timed-out remote task before the fallback", 2,
          minimum=0, maximum=10),
    Param("backoff", "float", "seconds before the first resubmission; doubles at each", 2.0, minimum=0.0,
          maximum=600.0),
    Param("timeout", "float", "seconds one remote task may take before it is cancelled and retried", 900.0,
          above=0.0, maximum=86400.0),
    Param("poll_interval", "float", "seconds between polls of a remote task (the lease is renewed at each)", 1.0,
          above=0.0, maximum=60.0),
)

#: Ledger fields.
BLOCKS, QPU_SECONDS, COST = "remote_blocks", "qpu_seconds", "cost_usd"


class RemoteTaskError(Exception):
    """A remote task failed, timed out or returned an answer that does not fit the block."""


# ---------------------------------------------------------------------------------- ledgers
class LocalLedger:
    """What one solver object has spent (used outside a worker: one CLI process, one job)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spent: dict[str, float] = {}

    def spend(self, field_name: str, amount: float = 0.0) -> float:
        with self._lock:
            self._spent[field_name] = self._spent.get(field_name, 0.0) + amount
            return self._spent[field_name]

    def reset(self) -> None:
        with self._lock:
            self._spent.clear()


def check_samples(samples: Any, num_variables: int) -> np.ndarray:
    """A service's reads as an (n, B) uint8 array of 0/1, or RemoteTaskError: never trusted as given."""
    array = np.asarray(samples)
    if array.ndim != 2 or array.shape[1] != num_variables or array.shape[0] == 0:
        raise RemoteTaskError(f"the service returned samples of shape {array.shape}, expected (n, {num_variables})")
    if not np.isin(array, (0, 1)).all():
        raise RemoteTaskError("the service returned values other than 0 and 1")
    return array.astype(np.uint8)


# ---------------------------------------------------------------------------------- tasks
@dataclass
class Collected:
    """A remote task's answer, repaired to exact counts by the backend, and its charges."""

    x: np.ndarray
    energy: float
    metadata: dict[str, Any]
    qpu_seconds: float = 0.0
    cost: float | None = None  # US dollars, None when the backend cannot tell


@dataclass
class _Task:
    index: int
    task_id: str
    handle: Any
    submitted: float
    attempts: int
    resumed: bool = False


@dataclass
class _BlockState:
    problem: BlockProblem
    prepared: Any
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    answer: BlockSolution | None = None


#: Handles of tasks submitted by this process, by (solver, task id): a retry in the same
#: process (another worker thread reclaimed the message) resumes from here; local simulators
#: have no other way back to a task.
_HANDLES: "OrderedDict[tuple[str, str], Any]" = OrderedDict()
_HANDLES_LIMIT = 4096
_handles_lock = threading.Lock()


def _remember(solver: str, task_id: str, handle: Any) -> None:
    with _handles_lock:
        _HANDLES[(solver, task_id)] = handle
        while len(_HANDLES) > _HANDLES_LIMIT:
            _HANDLES.popitem(last=False)


def _remembered(solver: str, task_id: str) -> Any:
    with _handles_lock:
        return _HANDLES.get((solver, task_id))


class RemoteSolver(BatchSolver):
    """Base of the cloud backends: subclasses say how to prepare, submit, poll and collect.

    ``backend_parameters`` (the subclass's own, declared once) are followed by
    :data:`BUDGET_PARAMS` and ``seed``. Subclasses implement :meth:`prepare` (classical
    pre-work that may refuse a block), :meth:`submit`, :meth:`is_done`, :meth:`collect`, and
    may override :meth:`session` (a context shared by a batch's submissions),
    :meth:`resume_remote` (re-attach to a task by id through the SDK) and :meth:`cancel`.
    """

    backend_parameters: tuple[Param, ...] = ()

    def __init__(self) -> None:
        seed = Param("seed", "int", "seed of the classical parts (angles, embedding, fallback)", minimum=0)
        self.parameters = tuple(self.backend_parameters) + BUDGET_PARAMS + (seed,)
        self.ledger = LocalLedger()
        self.sleep = time.sleep  # the backoff's and the poll's clock

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def prepare(self, problem: BlockProblem, settings: Mapping[str, Any]) -> Any:
        """Everything computed locally before submission (may raise ProblemTooLargeError)."""

    @abstractmethod
    def submit(self, prepared: Any, settings: Mapping[str, Any], session: Any) -> tuple[str, Any]:
        """Send one block; returns (remote task id, handle)."""

    @abstractmethod
    def is_done(self, handle: Any) -> bool:
        """Whether the task has finished (successfully or not)."""

    @abstractmethod
    def collect(self, handle: Any, prepared: Any, settings: Mapping[str, Any]) -> Collected:
        """The finished task's answer, checked and repaired; raises on a failed task."""

    def session(self, settings: Mapping[str, Any], size: int) -> Any:
        """A context manager around a batch's submissions; its value is passed to :meth:`submit`."""
        return nullcontext(None)

    def resume_remote(self, task_id: str, prepared: Any, settings: Mapping[str, Any], session: Any) -> Any:
        """A handle on an earlier task found through the service, or None (then it is resubmitted)."""
        return None

    def cancel(self, handle: Any) -> None:
        """Best effort: stop paying for a task that is no longer wanted."""

    def tag(self) -> dict[str, Any]:
        """Metadata every answer of this backend carries (the device, say)."""
        return {}

    # ------------------------------------------------------------------ settings
    def settings(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The call's checked parameters with the declared defaults filled in."""
        checked = check_params(self.parameters, params, self.name)
        values = {param.name: param.default for param in self.parameters}
        values.update({name: value for name, value in checked.items() if value is not None})
        from qsurgeon.worker.solvers.registry import get_solver, solver_names

        fallback = values["fallback"]
        if fallback not in solver_names():
            raise UsageError(f"{self.name}: fallback {fallback!r} is not a solver; choose one of: "
                             f"{', '.join(solver_names())}")
        if get_solver(fallback).capabilities.remote:
            raise UsageError(f"{self.name}: fallback {fallback!r} is itself remote; name a local solver")
        return values

    # ------------------------------------------------------------------ budget
    def _ledger(self, lease: Any) -> Any:
        return lease if lease is not None and getattr(lease, "jobs", None) else self.ledger

    def _refusal(self, ledger: Any, settings: Mapping[str, Any], admitted: int) -> str:
        """Why the next block may not go out ("" when it may); reserves one remote block."""
        blocks = ledger.spend(BLOCKS, 0.0)
        paid = max(blocks - admitted, 0.0)  # blocks of earlier batches, whose charges are booked
        for name, key in (("qpu_seconds", QPU_SECONDS), ("max_cost", COST)):
            limit = settings[name]
            if limit is None:
                continue
            spent = ledger.spend(key, 0.0)
            expected = spent + (admitted * spent / paid if paid else 0.0)
            if expected >= limit:
                return f"budget: {name}={limit:g} reached ({spent:.6g} spent)"
        cap = settings["max_remote_blocks"]
        total = ledger.spend(BLOCKS, 1.0)
        if cap is not None and total > cap:
            ledger.spend(BLOCKS, -1.0)
            return f"budget: max_remote_blocks={cap} reached"
        return ""

    # ------------------------------------------------------------------ the cycle
    def sample_batch(self, problems: Sequence[BlockProblem], **params: Any) -> list[BlockSolution]:
        from qsurgeon.worker.queue.consumer import current_lease

        settings = self.settings(params)
        lease = current_lease()
        ledger = self._ledger(lease)
        recorded = lease.recorded if lease is not None else {}
        states = [_BlockState(problem, self.prepare(problem, settings)) for problem in problems]
        fallbacks: dict[int, str] = {}
        with self.session(settings, len(problems)) as session:
            tasks: list[_Task] = []
            admitted = 0
            for index, state in enumerate(states):
                key = self._record_key(state.problem, index)
                task = self._resume(index, recorded.get(key), state, settings, session)
                if task is None:
                    reason = self._refusal(ledger, settings, admitted)
                    if reason:
                        fallbacks[index] = reason
                        continue
                    admitted += 1
                    task = self._submit(index, state, settings, session, lease)
                if task is not None:
                    tasks.append(task)
                else:
                    fallbacks[index] = "remote failed: " + "; ".join(state.errors)
            wave = 0
            while tasks:
                failed = self._wait(tasks, states, settings, lease, ledger)
                retry = [task for task in failed if states[task.index].attempts <= settings["retries"]]
                for task in failed:
                    if task not in retry:
                        fallbacks[task.index] = "remote failed: " + "; ".join(states[task.index].errors)
                tasks = []
                if retry:
                    wave += 1
                    self._pause(settings["backoff"] * 2 ** (wave - 1), lease)
                    for task in retry:
                        fresh = self._submit(task.index, states[task.index], settings, session, lease)
                        if fresh is not None:
                            tasks.append(fresh)
                        elif states[task.index].attempts > settings["retries"]:
                            fallbacks[task.index] = "remote failed: " + "; ".join(states[task.index].errors)
        for index, reason in fallbacks.items():
            states[index].answer = self._fall_back(states[index], settings, reason, ledger)
        return [state.answer for state in states]  # type: ignore[misc]

    @staticmethod
    def _record_key(problem: BlockProblem, index: int) -> str:
        return f"task:{problem.id or index}"

    def _resume(self, index: int, task_id: str | None, state: _BlockState, settings: Mapping[str, Any],
                session: Any) -> _Task | None:
        if not task_id:
            return None
        handle = _remembered(self.name, task_id)
        if handle is None:
            try:
                handle = self.resume_remote(task_id, state.prepared, settings, session)
            except Exception as error:  # the service forgot it: submit again
                log.warning("%s: cannot resume task %s (%s); submitting again", self.name, task_id, error)
                handle = None
        if handle is None:
            return None
        state.attempts += 1
        log.info("%s: resuming remote task %s instead of submitting again", self.name, task_id)
        return _Task(index, task_id, handle, time.monotonic(), state.attempts, resumed=True)

    def _submit(self, index: int, state: _BlockState, settings: Mapping[str, Any], session: Any,
                lease: Any) -> _Task | None:
        """Submit, retrying submission errors with backoff; None when every attempt failed."""
        while state.attempts <= settings["retries"]:
            state.attempts += 1
            try:
                task_id, handle = self.submit(state.prepared, settings, session)
            except QsurgeonError:
                raise
            except Exception as error:  # the service refused or could not be reached
                state.errors.append(f"attempt {state.attempts}: submit: {type(error).__name__}: {error}")
                log.warning("%s: %s", self.name, state.errors[-1])
                if state.attempts <= settings["retries"]:
                    self._pause(settings["backoff"] * 2 ** (state.attempts - 1), lease)
                continue
            task_id = str(task_id or uuid.uuid4())
            _remember(self.name, task_id, handle)
            if lease is not None:
                lease.record(self._record_key(state.problem, index), task_id)
            return _Task(index, task_id, handle, time.monotonic(), state.attempts)
        return None

    def _wait(self, tasks: list[_Task], states: list[_BlockState], settings: Mapping[str, Any], lease: Any,
              ledger: Any) -> list[_Task]:
        """Poll until each task is done or timed out; collect answers; return the failed tasks."""
        waiting = list(tasks)
        failed: list[_Task] = []
        delay = min(0.05, settings["poll_interval"])  # quick first looks, then every poll_interval
        while waiting:
            still = []
            for task in waiting:
                state = states[task.index]
                try:
                    done = self.is_done(task.handle)
                except Exception as error:
                    done, state_error = True, error
                else:
                    state_error = None
                if not done:
                    if time.monotonic() - task.submitted > settings["timeout"]:
                        self.cancel(task.handle)
                        state.errors.append(f"attempt {task.attempts}: timed out after {settings['timeout']:g} s")
                        failed.append(task)
                    else:
                        still.append(task)
                    continue
                try:
                    if state_error is not None:
                        raise state_error
                    collected = self.collect(task.handle, state.prepared, settings)
                except QsurgeonError:
                    raise
                except Exception as error:
                    state.errors.append(f"attempt {task.attempts}: {type(error).__name__}: {error}")
                    log.warning("%s: task %s failed: %s", self.name, task.task_id, state.errors[-1])
                    failed.append(task)
                    continue
                state.answer = self._answer(task, state, collected, ledger)
            waiting = still
            if waiting:
                self._pause(delay, lease)
                delay = min(2.0 * delay, settings["poll_interval"])
        return failed

    def _pause(self, seconds: float, lease: Any) -> None:
        """Sleep, renewing the lease at least every second so the messages stay ours."""
        left = seconds
        while True:
            if lease is not None:
                lease.renew()
            if left <= 0:
                return
            step = min(left, 1.0)
            self.sleep(step)
            left -= step

    def _answer(self, task: _Task, state: _BlockState, collected: Collected, ledger: Any) -> BlockSolution:
        ledger.spend(QPU_SECONDS, float(collected.qpu_seconds))
        if collected.cost is not None:
            ledger.spend(COST, float(collected.cost))
        metadata = {
            **self.tag(), **collected.metadata, "remote": True, "remote_task_id": task.task_id,
            "resumed": task.resumed, "attempts": task.attempts, "errors": list(state.errors),
            "wall_seconds": time.monotonic() - task.submitted, "qpu_seconds": float(collected.qpu_seconds),
            "cost_estimate_usd": collected.cost, "budget_spent": self._spent(ledger),
        }
        return BlockSolution(
            x=collected.x, energy=collected.energy, solver=self.name, seconds=metadata["wall_seconds"],
            restarts=int(collected.metadata.get("reads", 0) or 0), problem_id=state.problem.id, metadata=metadata,
        )

    def _fall_back(self, state: _BlockState, settings: Mapping[str, Any], reason: str, ledger: Any) -> BlockSolution:
        from qsurgeon.worker.solve import solve

        log.info("%s: block %s answered by %s (%s)", self.name, state.problem.id, settings["fallback"], reason)
        params = {"seed": settings["seed"]} if settings.get("seed") is not None else {}
        solution = solve(state.problem, settings["fallback"], **params)
        metadata = {**solution.metadata, **self.tag(), "remote": False, "requested_solver": self.name,
                    "fallback": settings["fallback"], "fallback_reason": reason, "attempts": state.attempts,
                    "errors": list(state.errors), "budget_spent": self._spent(ledger)}
        return BlockSolution(x=solution.x, energy=solution.energy, solver=solution.solver, seconds=solution.seconds,
                             sweeps=solution.sweeps, restarts=solution.restarts, problem_id=state.problem.id,
                             metadata=metadata)

    @staticmethod
    def _spent(ledger: Any) -> dict[str, float]:
        return {key: ledger.spend(key, 0.0) for key in (BLOCKS, QPU_SECONDS, COST)}


__all__ = [
    "BLOCKS", "BUDGET_PARAMS", "COST", "Collected", "LocalLedger", "QPU_SECONDS", "RemoteSolver", "RemoteTaskError",
    "check_samples",
]

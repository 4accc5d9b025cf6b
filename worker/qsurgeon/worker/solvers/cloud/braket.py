"""Amazon Braket: QAOA on a gate-model device named by its ARN, costed by Braket's Tracker.

Each block's QAOA circuit (angles optimised locally, :mod:`.qaoa_plan`) is written in
Braket's gates (ZZ, RZ, RX: the same rotations as the IBM module, so both devices see
the same state) and run as one quantum task of ``shots`` shots. The task's ARN is
recorded through the lease as soon as the task exists, and a restarted worker re-attaches
with ``AwsQuantumTask(arn)``.

Every task runs under its own ``braket.tracking.Tracker``, so each answer carries the
cost Braket itself estimates for that task (per-task and per-shot prices on QPUs, billed
duration on the managed simulators; Braket's local simulator costs nothing), the
task's duration and its shots.

``device_arn`` picks the device: an AWS ARN (``arn:aws:braket:...``; credentials and
region from boto3's usual places, ``AWS_PROFILE``, ``~/.aws/credentials`` or the
environment, never from qsurgeon), or ``local:braket_sv`` (the default) for the local
simulator. A device object passed to the constructor overrides both.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from braket.circuits import Circuit
from braket.devices import LocalSimulator
from braket.tracking import Tracker

from qsurgeon.client.errors import UsageError
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solvers.base import Capabilities, Param
from qsurgeon.worker.solvers.cloud.qaoa_plan import MAX_PLAN_QUBITS, QAOAPlan, plan, qaoa_parameters
from qsurgeon.worker.solvers.cloud.remote import Collected, RemoteSolver, RemoteTaskError, check_samples

LOCAL_PREFIX = "local:"
DEFAULT_DEVICE = "local:braket_sv"
COST_MODEL = ("Braket's Tracker: QPUs bill a per-task fee plus a per-shot fee; managed simulators bill "
              "duration; the local simulator is free")
_FINAL = ("COMPLETED", "FAILED", "CANCELLED")


def qaoa_circuit(block: QAOAPlan) -> Circuit:
    """The block's QAOA circuit in Braket gates (conventions of :mod:`.qaoa_plan`)."""
    circuit = Circuit()
    size = block.num_qubits
    for qubit in range(size):
        circuit.h(qubit)
    for gamma, beta in zip(block.gammas, block.betas):
        for i, j, coupling in block.couplings:
            circuit.zz(i, j, 2.0 * float(gamma) * coupling)
        for qubit, field in enumerate(block.linear):
            if field != 0.0:
                circuit.rz(qubit, 2.0 * float(gamma) * float(field))
        for qubit in range(size):
            circuit.rx(qubit, 2.0 * float(beta))
    return circuit


@dataclass
class _BraketTask:
    task: Any
    tracker: Tracker


class BraketQAOASolver(RemoteSolver):
    """QAOA on an Amazon Braket gate-model device (or its local simulator), penalty + repair."""

    def __init__(self, device: Any = None, *, name: str = "braket-qaoa", reps: int = 1, maxiter: int = 60,
                 shots: int = 1000, alpha: float | str = 1.0) -> None:
        self._device = device
        self._devices: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.backend_parameters = qaoa_parameters(reps, maxiter, shots, alpha) + (
            Param("device_arn", "str", "device ARN (arn:aws:braket:...) or local:<simulator>", DEFAULT_DEVICE),
        )
        super().__init__()
        self.capabilities = Capabilities(
            name=name, description="QAOA on an Amazon Braket gate-model device by ARN (default: local simulator)",
            max_variables=MAX_PLAN_QUBITS, constraints="penalty", device="remote", deterministic=False,
            extra="braket", remote=True, cost_model=COST_MODEL,
        )

    def device(self, settings: Mapping[str, Any]) -> Any:
        if self._device is not None:
            return self._device
        arn = settings["device_arn"]
        with self._lock:
            if arn not in self._devices:
                if arn.startswith(LOCAL_PREFIX):
                    self._devices[arn] = LocalSimulator(arn[len(LOCAL_PREFIX):])
                elif arn.startswith("arn:aws:braket:"):
                    from braket.aws import AwsDevice

                    self._devices[arn] = AwsDevice(arn)
                else:
                    raise UsageError(f"{self.name}: device_arn must be arn:aws:braket:... or local:<simulator>, "
                                     f"got {arn!r}")
            return self._devices[arn]

    def prepare(self, problem: BlockProblem, settings: Mapping[str, Any]) -> QAOAPlan:
        self.device(settings)  # a bad ARN is a usage error before anything is sent
        return plan(problem, settings["alpha"], settings["reps"], settings["maxiter"], settings["seed"])

    def _shots(self, settings: Mapping[str, Any]) -> int:
        return int(settings["restarts"] or settings["shots"])

    def submit(self, prepared: QAOAPlan, settings: Mapping[str, Any], session: Any) -> tuple[str, Any]:
        tracker = Tracker()
        with tracker:
            task = self.device(settings).run(qaoa_circuit(prepared), shots=self._shots(settings))
        return task.id, _BraketTask(task, tracker)

    def resume_remote(self, task_id: str, prepared: Any, settings: Mapping[str, Any], session: Any) -> Any:
        if not task_id.startswith("arn:aws:braket:"):
            return None  # a local task lives only in the process that ran it
        from braket.aws import AwsQuantumTask

        return _BraketTask(AwsQuantumTask(task_id), Tracker())

    def is_done(self, handle: _BraketTask) -> bool:
        with handle.tracker:
            return str(handle.task.state()) in _FINAL

    def cancel(self, handle: _BraketTask) -> None:
        try:
            handle.task.cancel()
        except Exception:  # finished already, or a local task
            pass

    def collect(self, handle: _BraketTask, prepared: QAOAPlan, settings: Mapping[str, Any]) -> Collected:
        with handle.tracker:
            state = str(handle.task.state())
            if state != "COMPLETED":
                raise RemoteTaskError(f"task {handle.task.id} ended {state}")
            result = handle.task.result()
        size = prepared.num_qubits
        qubits = [int(q) for q in result.measured_qubits]
        if sorted(qubits) != list(range(size)):
            raise RemoteTaskError(f"the task measured qubits {qubits}, expected 0..{size - 1}")
        counts = result.measurement_counts
        samples = np.zeros((len(counts), size), dtype=np.int64)
        weights = np.zeros(len(counts))
        for row, (bits, count) in enumerate(counts.items()):
            if len(bits) != size or set(bits) - {"0", "1"}:
                raise RemoteTaskError(f"the task returned the bitstring {bits!r}")
            samples[row, qubits] = [int(bit) for bit in bits]
            weights[row] = count
        outcome = prepared.model.repair_and_pick(check_samples(samples, size), weights)
        cost, cost_error = None, None
        try:
            cost = float(handle.tracker.qpu_tasks_cost() + handle.tracker.simulator_tasks_cost())
        except Exception as error:  # the price list is fetched from AWS and may be unreachable
            cost_error = f"{type(error).__name__}: {error}"
        meta = result.task_metadata
        metadata = {
            **prepared.metadata(), **outcome.metadata(), "feasible_before_repair": not outcome.best_was_repaired,
            "shots": int(meta.shots), "device_id": meta.deviceId, "task_arn": meta.id,
            "task_duration_seconds": _duration(meta.createdAt, meta.endedAt),
            "tracker": _json(handle.tracker.quantum_tasks_statistics()), "cost_error": cost_error,
            "circuit_depth": int(qaoa_circuit(prepared).depth),
        }
        return Collected(outcome.x, outcome.energy, metadata, 0.0, cost)

    def tag(self) -> dict[str, Any]:
        return {"backend": "braket"}


def _duration(created: Any, ended: Any) -> float | None:
    """Seconds between Braket's ISO timestamps (None where the device does not report them)."""
    try:
        start = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
        end = datetime.datetime.fromisoformat(str(ended).replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json(item) for key, item in value.items()}
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (list, tuple)):
        return [_json(item) for item in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


__all__ = ["BraketQAOASolver", "qaoa_circuit"]

"""IBM Quantum through qiskit-ibm-runtime: QAOA circuits transpiled for the device, SamplerV2 in a Batch.

Each block's QAOA circuit (angles optimised locally, :mod:`.qaoa_plan`) is built from the
block's Ising terms, transpiled to the target backend's ISA (its qubits, coupling map
and basis gates) by a preset pass manager, and sampled by the runtime's ``SamplerV2``.
A batch's blocks go out together in one runtime ``Batch`` (the execution mode for
independent jobs; a ``Session`` would only pay off if the optimiser iterated on the
device, which it does not here). Each block is one job, so its job id is recorded
through the lease as soon as it exists and a restarted worker re-attaches to it with
``QiskitRuntimeService().job(id)``.

The backend is an object (a fake backend such as ``FakeManilaV2`` runs in the runtime's
local testing mode on Aer, with the device's noise model) or, by default, the IBM
backend named by ``backend`` (least busy when none is named) of
``QiskitRuntimeService()``, which reads the account saved by
``QiskitRuntimeService.save_account`` or the ``QISKIT_IBM_TOKEN`` / ``QISKIT_IBM_INSTANCE``
variables, never anything from qsurgeon.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from qiskit import QuantumCircuit
from qiskit.transpiler import generate_preset_pass_manager
from qiskit_ibm_runtime import Batch, SamplerV2

from qsurgeon.client.errors import ProblemTooLargeError
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solvers.base import Capabilities, Param
from qsurgeon.worker.solvers.cloud.qaoa_plan import MAX_PLAN_QUBITS, QAOAPlan, plan, qaoa_parameters
from qsurgeon.worker.solvers.cloud.remote import Collected, RemoteSolver, check_samples
from qsurgeon.worker.solvers.qaoa import bits_of

COST_MODEL = ("IBM Quantum bills quantum seconds (job.usage()); a block is one job of `shots` shots, a few "
              "seconds on a device; price_per_second converts (your plan)")


def qaoa_circuit(block: QAOAPlan) -> QuantumCircuit:
    """The block's QAOA circuit with measurements (conventions of :mod:`.qaoa_plan`)."""
    size = block.num_qubits
    circuit = QuantumCircuit(size, name=f"qaoa-{block.model.problem.id or 'block'}")
    circuit.h(range(size))
    for gamma, beta in zip(block.gammas, block.betas):
        for i, j, coupling in block.couplings:
            circuit.rzz(2.0 * gamma * coupling, i, j)
        for i, field in enumerate(block.linear):
            if field != 0.0:
                circuit.rz(2.0 * gamma * float(field), i)
        circuit.rx(2.0 * beta, range(size))
    circuit.measure_all()
    return circuit


@dataclass
class _IBMBlock:
    plan: QAOAPlan
    circuit: Any  # ISA circuit


class IBMQAOASolver(RemoteSolver):
    """QAOA on an IBM Quantum backend (or a fake backend locally), penalty + repair."""

    def __init__(self, backend: Any = None, *, name: str = "ibm-qaoa", service: Any = None, reps: int = 1,
                 maxiter: int = 60, shots: int = 1024, alpha: float | str = 1.0) -> None:
        self._backend = backend
        self._service = service
        self._lock = threading.Lock()
        self._pass_managers: dict[tuple[str, int], Any] = {}
        self.backend_parameters = qaoa_parameters(reps, maxiter, shots, alpha) + (
            Param("backend", "str", "IBM backend name (none: the least busy operational device)"),
            Param("optimization_level", "int", "transpiler optimisation level", 2, minimum=0, maximum=3),
            Param("price_per_second", "float", "US dollars per quantum second (your plan; none: cost not estimated)",
                  minimum=0.0),
        )
        super().__init__()
        qubits = getattr(backend, "num_qubits", None)
        self.capabilities = Capabilities(
            name=name,
            description=f"QAOA on IBM Quantum ({getattr(backend, 'name', 'runtime service')}), SamplerV2 in a Batch",
            max_variables=min(qubits or MAX_PLAN_QUBITS, MAX_PLAN_QUBITS), constraints="penalty", device="remote",
            deterministic=False, extra="ibm", remote=True, cost_model=COST_MODEL,
        )

    # ------------------------------------------------------------------ the device
    def service(self) -> Any:
        with self._lock:
            if self._service is None:
                from qiskit_ibm_runtime import QiskitRuntimeService

                self._service = QiskitRuntimeService()
            return self._service

    def backend(self, settings: Mapping[str, Any]) -> Any:
        if self._backend is not None:
            return self._backend
        name = settings["backend"]
        service = self.service()
        return service.backend(name) if name else service.least_busy(operational=True, simulator=False)

    def _pass_manager(self, backend: Any, level: int) -> Any:
        key = (str(getattr(backend, "name", id(backend))), level)
        with self._lock:
            if key not in self._pass_managers:
                self._pass_managers[key] = generate_preset_pass_manager(optimization_level=level, backend=backend)
            return self._pass_managers[key]

    def prepare(self, problem: BlockProblem, settings: Mapping[str, Any]) -> _IBMBlock:
        backend = self.backend(settings)
        if problem.num_variables > backend.num_qubits:
            raise ProblemTooLargeError(f"{self.name}: {problem.num_variables} variables need as many qubits; "
                                       f"{backend.name} has {backend.num_qubits}")
        block = plan(problem, settings["alpha"], settings["reps"], settings["maxiter"], settings["seed"])
        circuit = self._pass_manager(backend, settings["optimization_level"]).run(qaoa_circuit(block))
        return _IBMBlock(block, circuit)

    def session(self, settings: Mapping[str, Any], size: int) -> Any:
        return Batch(backend=self.backend(settings))

    def _shots(self, settings: Mapping[str, Any]) -> int:
        return int(settings["restarts"] or settings["shots"])

    def submit(self, prepared: _IBMBlock, settings: Mapping[str, Any], session: Any) -> tuple[str, Any]:
        sampler = SamplerV2(mode=session)
        job = sampler.run([prepared.circuit], shots=self._shots(settings))
        return job.job_id(), job

    def resume_remote(self, task_id: str, prepared: Any, settings: Mapping[str, Any], session: Any) -> Any:
        if self._backend is not None and self._service is None:
            return None  # a local (fake) backend: its jobs live only in the process that ran them
        return self.service().job(task_id)

    def is_done(self, handle: Any) -> bool:
        return bool(handle.done())

    def cancel(self, handle: Any) -> None:
        try:
            handle.cancel()
        except Exception:  # already finished, or a local job that cannot be cancelled
            pass

    def collect(self, handle: Any, prepared: _IBMBlock, settings: Mapping[str, Any]) -> Collected:
        result = handle.result()
        size = prepared.plan.num_qubits
        counts = result[0].data.meas.get_int_counts()
        states = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        weights = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        samples = check_samples(bits_of(states, size), size)
        outcome = prepared.plan.model.repair_and_pick(samples, weights)
        usage = _call(handle, "usage")
        metrics = _call(handle, "metrics")
        seconds = float(usage) if isinstance(usage, (int, float)) else 0.0
        metadata = {
            **prepared.plan.metadata(), **outcome.metadata(), "feasible_before_repair": not outcome.best_was_repaired,
            "shots": self._shots(settings), "usage_seconds": usage,
            "timestamps": (metrics or {}).get("timestamps") if isinstance(metrics, dict) else None,
            "job_id": handle.job_id(), "session_id": getattr(handle, "session_id", None),
            "backend_name": getattr(self.backend(settings), "name", None),
            "transpiled_depth": int(prepared.circuit.depth()),
            "two_qubit_gates": int(sum(count for gate, count in prepared.circuit.count_ops().items()
                                       if gate in ("cx", "ecr", "cz", "rzz"))),
        }
        price = settings["price_per_second"]
        return Collected(outcome.x, outcome.energy, metadata, seconds, None if price is None else seconds * price)

    def tag(self) -> dict[str, Any]:
        return {"backend": "ibm"}


def _call(handle: Any, method: str) -> Any:
    """A job's optional report (usage, metrics), or None where this kind of job has none."""
    try:
        return getattr(handle, method)()
    except Exception:
        return None


__all__ = ["IBMQAOASolver", "qaoa_circuit"]

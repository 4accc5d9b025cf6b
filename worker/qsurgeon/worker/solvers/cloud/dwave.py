"""D-Wave through Leap: the QPU on a clique embedding, and the hybrid CQM solver.

``dwave-qpu`` (:class:`DWaveQPUSolver`): a block's Q is dense, so every variable couples
to every other and the block needs a *clique* embedding (each variable a chain of
qubits). The largest clique the QPU's working graph holds bounds the block size (about
177 variables on an Advantage, 16 on the 4×4 Chimera of ``MockDWaveSampler``). The block
goes out as the penalised, scaled QUBO the dimod backends use (penalty.py: soft penalty,
then every read repaired to exact counts); the chain strength is set from that model's
own scale (uniform torque compensation, the SDK's rule, unless ``chain_strength`` is
given) and broken chains are resolved by majority vote.

``dwave-hybrid`` (:class:`DWaveHybridSolver`): Leap's hybrid CQM solver takes the
cardinality (or each N:M group's count) as a native equality constraint, so there is no
penalty to tune; its feasible samples are scored in float64 and the best returned (when
none is feasible, the reads are repaired and the metadata says so).

Both take their sampler as an argument, so tests run them on what the SDK ships for
local testing (``MockDWaveSampler``, dimod's ``ExactCQMSolver``); by default they build
Leap's ``DWaveSampler`` / ``LeapHybridCQMSampler`` on first use, which read the Leap token
where the SDK does (``DWAVE_API_TOKEN`` or ``dwave config create``), never from qsurgeon.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

import dimod
import numpy as np
from dwave.embedding import embed_bqm, majority_vote, unembed_sampleset
from dwave.embedding.chain_strength import uniform_torque_compensation
from dwave.system import DWaveSampler, LeapHybridCQMSampler  # noqa: F401  (the extra's presence is checked here)
from minorminer import busclique

from qsurgeon.client.errors import ProblemTooLargeError
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.solvers.base import Capabilities, Param
from qsurgeon.worker.solvers.cloud.remote import Collected, RemoteSolver, RemoteTaskError, check_samples
from qsurgeon.worker.solvers.dimod_backends import penalised_bqm, samples_as_array
from qsurgeon.worker.solvers.penalty import MAX_DENSE_VARIABLES, PenaltyModel, greedy_repair, hard_strength

#: Advantage (Pegasus P16) holds a clique of about 177 logical variables; the real bound is
#: read from the QPU's working graph on first use.
ADVANTAGE_CLIQUE = 177
MAX_QPU_READS = 10_000
QPU_COST = ("QPU access time (info['timing']['qpu_access_time']): per-second price of your Leap plan "
            "(price_per_second); a block of 100 reads takes about 20-60 ms")
HYBRID_COST = ("Leap hybrid charge time (info['charge_time'], at least the solver's minimum time limit, "
               "5 s for small CQMs) at your plan's price (price_per_second)")


def _timing_seconds(value: Any) -> float:
    return float(value) / 1e6 if isinstance(value, (int, float)) else 0.0


def _cost(seconds: float, price: float | None) -> float | None:
    return None if price is None else seconds * price


@dataclass
class _QPUBlock:
    model: PenaltyModel
    bqm: dimod.BinaryQuadraticModel
    embedding: dict[int, tuple[int, ...]]
    target: dimod.BinaryQuadraticModel
    chain_strength: float


class _CloudHandle:
    """A dwave-cloud-client Future (real QPU: the problem id exists before the answer)."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def done(self) -> bool:
        return bool(self.future.done())

    def sampleset(self) -> dimod.SampleSet:
        return self.future.sampleset


class _ReadyHandle:
    """A sampleset from a sampler without a cloud future (the mock, a local sampler)."""

    def __init__(self, sampleset: dimod.SampleSet) -> None:
        self._sampleset = sampleset

    def done(self) -> bool:
        return bool(self._sampleset.done())

    def sampleset(self) -> dimod.SampleSet:
        return self._sampleset


def _cloud_solver(sampler: Any) -> Any:
    """The dwave-cloud-client solver behind a Leap sampler, or None (mocks and local samplers)."""
    solver = getattr(sampler, "solver", None)
    if solver is not None and (hasattr(solver, "sample_bqm") or hasattr(solver, "upload_problem")):
        return solver
    return None


class DWaveQPUSolver(RemoteSolver):
    """A D-Wave QPU on a clique embedding, penalty + repair (``child``: a structured sampler)."""

    def __init__(self, child: Any = None, *, name: str = "dwave-qpu", num_reads: int = 100, alpha: float | str = 1.0,
                 max_variables: int | None = None) -> None:
        self._child = child
        self._lock = threading.Lock()
        self._graph: Any = None
        self._clique: int | None = None
        self.backend_parameters = (
            Param("num_reads", "int", "QPU reads (anneals) per block", num_reads, minimum=1, maximum=MAX_QPU_READS),
            Param("restarts", "int", "alias of num_reads", minimum=1, maximum=MAX_QPU_READS),
            Param("alpha", "alpha", "penalty factor, relative to the block's scale, or 'hard'", alpha),
            Param("chain_strength", "float", "chain coupling in the scaled model's units (none: uniform torque "
                  "compensation of the penalised block)", above=0.0),
            Param("chain_prefactor", "float", "prefactor of the uniform torque compensation", 1.414, above=0.0),
            Param("annealing_time", "float", "microseconds per anneal (none: the QPU's default)", above=0.0),
            Param("price_per_second", "float", "US dollars per second of QPU access time (your plan; none: cost "
                  "not estimated)", minimum=0.0),
        )
        super().__init__()
        self.capabilities = Capabilities(
            name=name, description="D-Wave QPU (Leap) on a clique embedding, penalty + repair",
            max_variables=max_variables or ADVANTAGE_CLIQUE, constraints="penalty", device="remote",
            deterministic=False, extra="dwave", remote=True, cost_model=QPU_COST,
        )

    # ------------------------------------------------------------------ the QPU
    @property
    def child(self) -> Any:
        """The structured sampler; Leap's ``DWaveSampler`` is only built (and contacted) when first needed."""
        with self._lock:
            if self._child is None:
                self._child = DWaveSampler()
            return self._child

    def largest_clique(self) -> int:
        """How many fully coupled variables the QPU's working graph embeds (cached)."""
        with self._lock:
            child = self._child
        child = child if child is not None else self.child
        if self._clique is None:
            self._graph = child.to_networkx_graph()
            self._clique = len(busclique.busgraph_cache(self._graph).largest_clique())
        return self._clique

    def prepare(self, problem: BlockProblem, settings: Mapping[str, Any]) -> _QPUBlock:
        size = problem.num_variables
        clique = self.largest_clique()
        if size > clique:
            raise ProblemTooLargeError(f"{self.name}: a dense block of {size} variables needs a clique embedding; "
                                       f"this QPU's largest clique holds {clique}")
        model = PenaltyModel.build(problem, settings["alpha"], MAX_DENSE_VARIABLES)
        bqm = penalised_bqm(model)
        embedding = busclique.find_clique_embedding(list(range(size)), self._graph, use_cache=True)
        if len(embedding) != size:
            raise ProblemTooLargeError(f"{self.name}: no clique embedding of {size} variables found")
        strength = settings["chain_strength"]
        if strength is None:
            strength = float(uniform_torque_compensation(bqm, prefactor=settings["chain_prefactor"]))
        target = embed_bqm(bqm, embedding, self._graph, chain_strength=strength)
        return _QPUBlock(model, bqm, {v: tuple(chain) for v, chain in embedding.items()}, target, strength)

    def _sampler_kwargs(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_reads": settings["restarts"] or settings["num_reads"]}
        if settings["annealing_time"] is not None:
            kwargs["annealing_time"] = settings["annealing_time"]
        return kwargs

    def submit(self, prepared: _QPUBlock, settings: Mapping[str, Any], session: Any) -> tuple[str, Any]:
        cloud = _cloud_solver(self.child)
        kwargs = self._sampler_kwargs(settings)
        if cloud is not None:
            future = cloud.sample_bqm(prepared.target, **kwargs)
            return future.wait_id(), _CloudHandle(future)
        sampleset = self.child.sample(prepared.target, **kwargs)
        return sampleset.info.get("problem_id", ""), _ReadyHandle(sampleset)

    def resume_remote(self, task_id: str, prepared: Any, settings: Mapping[str, Any], session: Any) -> Any:
        client = getattr(self.child, "client", None)
        return _CloudHandle(client.retrieve_answer(task_id)) if client is not None else None

    def is_done(self, handle: Any) -> bool:
        return handle.done()

    def cancel(self, handle: Any) -> None:
        future = getattr(handle, "future", None)
        if future is not None and hasattr(future, "cancel"):
            future.cancel()

    def collect(self, handle: Any, prepared: _QPUBlock, settings: Mapping[str, Any]) -> Collected:
        target = handle.sampleset()
        source = unembed_sampleset(target, prepared.embedding, prepared.bqm, chain_break_method=majority_vote,
                                   chain_break_fraction=True)
        samples, occurrences = samples_as_array(source, prepared.model.problem.num_variables)
        outcome = prepared.model.repair_and_pick(check_samples(samples, samples.shape[1]), occurrences)
        timing = dict(target.info.get("timing", {}))
        breaks = np.asarray(source.record.chain_break_fraction, dtype=np.float64)
        qpu_seconds = _timing_seconds(timing.get("qpu_access_time"))
        chains = [len(chain) for chain in prepared.embedding.values()]
        metadata = {
            **prepared.model.metadata(), **outcome.metadata(),
            "feasible_before_repair": not outcome.best_was_repaired,
            "timing_us": timing, "qpu_access_time_us": timing.get("qpu_access_time"),
            "qpu_programming_time_us": timing.get("qpu_programming_time"),
            "qpu_sampling_time_us": timing.get("qpu_sampling_time"),
            "chain_break_fraction": float(np.average(breaks, weights=occurrences)) if breaks.size else 0.0,
            "chain_strength": prepared.chain_strength, "qubits": int(sum(chains)), "max_chain_length": max(chains),
            "problem_id": target.info.get("problem_id"), "sampler_params": self._sampler_kwargs(settings),
            "sampler": type(self.child).__name__,
        }
        return Collected(outcome.x, outcome.energy, metadata, qpu_seconds,
                         _cost(qpu_seconds, settings["price_per_second"]))

    def tag(self) -> dict[str, Any]:
        return {"backend": "dwave-qpu"}


@dataclass
class _CQMBlock:
    problem: BlockProblem
    Q: np.ndarray
    scale: float
    cqm: dimod.ConstrainedQuadraticModel


class DWaveHybridSolver(RemoteSolver):
    """Leap's hybrid CQM solver with the counts as native equality constraints (no penalty)."""

    def __init__(self, sampler: Any = None, *, name: str = "dwave-hybrid") -> None:
        self._sampler = sampler
        self._lock = threading.Lock()
        self.backend_parameters = (
            Param("time_limit", "float", "seconds the hybrid solver runs (none: its minimum for the model)",
                  above=0.0, maximum=86400.0),
            Param("price_per_second", "float", "US dollars per second of charge time (your plan; none: cost not "
                  "estimated)", minimum=0.0),
        )
        super().__init__()
        self.capabilities = Capabilities(
            name=name, description="D-Wave Leap hybrid CQM solver, counts as native equality constraints",
            max_variables=MAX_DENSE_VARIABLES, constraints="native", device="remote", deterministic=False,
            extra="dwave", remote=True, cost_model=HYBRID_COST,
        )

    @property
    def sampler(self) -> Any:
        """A CQM sampler; Leap's is only built (and contacted) when first needed."""
        with self._lock:
            if self._sampler is None:
                self._sampler = LeapHybridCQMSampler()
            return self._sampler

    def prepare(self, problem: BlockProblem, settings: Mapping[str, Any]) -> _CQMBlock:
        Q = problem.dense_Q() if problem.num_variables <= MAX_DENSE_VARIABLES else None
        if Q is None:
            raise ProblemTooLargeError(f"{self.name}: at most {MAX_DENSE_VARIABLES} variables")
        scale = hard_strength(Q)  # so one flip changes the objective by at most 1, as for the QPU
        objective = dimod.BinaryQuadraticModel(Q / scale, dimod.BINARY)
        cqm = dimod.ConstrainedQuadraticModel()
        cqm.set_objective(objective)
        for group, members in enumerate(problem.group_members()):
            cqm.add_constraint_from_iterable([(int(i), 1) for i in members], "==", rhs=int(problem.counts[group]),
                                             label=f"group{group}")
        return _CQMBlock(problem, Q, scale, cqm)

    def submit(self, prepared: _CQMBlock, settings: Mapping[str, Any], session: Any) -> tuple[str, Any]:
        sampler = self.sampler
        cloud = _cloud_solver(sampler)
        if cloud is not None and hasattr(sampler, "min_time_limit"):
            time_limit = max(settings["time_limit"] or 0.0, sampler.min_time_limit(prepared.cqm))
            upload = cloud.upload_problem(prepared.cqm.to_file()).result()
            future = cloud.sample_cqm(upload, time_limit=time_limit)
            return future.wait_id(), _CloudHandle(future)
        kwargs = {}
        if settings["time_limit"] is not None and "time_limit" in getattr(sampler, "parameters", {}):
            kwargs["time_limit"] = settings["time_limit"]
        sampleset = sampler.sample_cqm(prepared.cqm, **kwargs)
        return sampleset.info.get("problem_id", ""), _ReadyHandle(sampleset)

    def resume_remote(self, task_id: str, prepared: Any, settings: Mapping[str, Any], session: Any) -> Any:
        client = getattr(self.sampler, "client", None)
        return _CloudHandle(client.retrieve_answer(task_id)) if client is not None else None

    def is_done(self, handle: Any) -> bool:
        return handle.done()

    def collect(self, handle: Any, prepared: _CQMBlock, settings: Mapping[str, Any]) -> Collected:
        sampleset = handle.sampleset()
        problem = prepared.problem
        samples, occurrences = samples_as_array(sampleset, problem.num_variables)
        samples = check_samples(samples, problem.num_variables)
        membership = np.eye(problem.num_groups)[problem.group_of]  # (B, groups)
        ours = (samples.astype(np.float64) @ membership == problem.counts).all(axis=1)
        flips = 0
        if ours.any():
            candidates = samples[ours]
        else:  # no feasible read: repair them all (greedy cheapest flips, as for penalty backends)
            repaired = [greedy_repair(problem, prepared.Q, row) for row in np.unique(samples, axis=0)]
            candidates = np.array([row for row, _ in repaired], dtype=np.uint8)
            flips = sum(moved for _, moved in repaired)
        if not len(candidates):
            raise RemoteTaskError("the hybrid solver returned no samples")
        energies = problem.energies(candidates)
        best = int(np.argmin(energies))
        info = dict(sampleset.info)
        qpu_seconds = _timing_seconds(info.get("qpu_access_time"))
        charge = _timing_seconds(info.get("charge_time"))
        reported = np.asarray(sampleset.record.is_feasible) if "is_feasible" in sampleset.record.dtype.names else None
        metadata = {
            "constraints": "native", "reads": int(occurrences.sum()), "distinct_samples": int(len(samples)),
            "feasible_before_repair": bool(ours.any()), "repair_flips": flips,
            "raw_feasible_rate": float(occurrences[ours].sum() / occurrences.sum()),
            "solver_feasible_rate": float(occurrences[reported].sum() / occurrences.sum()) if reported is not None
            else None,
            "qpu_access_time_us": info.get("qpu_access_time"), "run_time_us": info.get("run_time"),
            "charge_time_us": info.get("charge_time"), "problem_id": info.get("problem_id"),
            "objective_scale": prepared.scale, "sampler": type(self.sampler).__name__,
        }
        return Collected(candidates[best], float(energies[best]), metadata, qpu_seconds,
                         _cost(charge, settings["price_per_second"]))

    def tag(self) -> dict[str, Any]:
        return {"backend": "dwave-hybrid"}


__all__ = ["ADVANTAGE_CLIQUE", "DWaveHybridSolver", "DWaveQPUSolver"]

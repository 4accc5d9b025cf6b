"""The iCBS loop: monotone surrogate, exact densities, resume = uninterrupted, schedule, failures."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.engine.icbs import (
    FisherTerms, ICBSConfig, ICBSState, TensorTask, initial_state, mask_row_errors, relative_layer_error, run_icbs,
)
from qsurgeon.server.engine.icbs.schedule import plan_epoch
from qsurgeon.server.engine.icbs.state import prepare_tensor
from qsurgeon.server.pruning.masks import check_mask, initial_mask, score_weights
from qsurgeon.server.pruning.sparsity import Sparsity
from qsurgeon.worker.block.problem import BlockProblem, BlockSolution
from qsurgeon.worker.queue.base import RoundRequest, RoundResult
from qsurgeon.worker.queue.inprocess import InProcessQueue
from qsurgeon.worker.solvers.base import Capabilities, Solver
from qsurgeon.worker.solvers.registry import register, unregister


def _tasks(sparsity: Sparsity, shapes=((8, 24), (6, 32)), seed: int = 0, samples: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    tasks, activations = [], {}
    for index, (out, width) in enumerate(shapes):
        weight = torch.randn(out, width, generator=generator)
        inputs = torch.randn(width, 60, generator=generator, dtype=torch.float64)
        inputs[: width // 4] *= 3.0  # a few strong features, as in real layers
        scores = score_weights(weight, "wanda", input_norms=inputs.norm(dim=1))
        fisher = None
        if samples is not None:
            grads = torch.randn(samples, out, width, generator=generator) * 0.1
            fisher = FisherTerms(per_sample_grads=grads, grad=grads.mean(dim=0))
        name = f"layer{index}"
        tasks.append(TensorTask(name, weight, initial_mask(scores, sparsity), scores, sparsity,
                                gram=inputs @ inputs.T, fisher=fisher))
        activations[name] = inputs
    return tasks, activations


def _direct_surrogate(tasks, activations, masks) -> float:
    """Σ‖(W − Ŵ)A‖² computed from weights and activations, not from the Gram matrix."""
    total = 0.0
    for task in tasks:
        pruned = task.weight.to(torch.float64) * masks[task.name].to(torch.float64)
        total += float(((pruned @ activations[task.name]) ** 2).sum())
    return total


def _fisher_direct(task: TensorTask, mask: torch.Tensor, gamma: float) -> float:
    G = task.fisher.per_sample_grads.reshape(task.fisher.per_sample_grads.shape[0], -1).to(torch.float64)
    w0 = task.weight.to(torch.float64).reshape(-1)
    change = w0 * (task.mask.reshape(-1).to(torch.float64) - mask.reshape(-1).to(torch.float64))
    H = G.T @ G / G.shape[0]
    return float(gamma * task.fisher.grad.reshape(-1).to(torch.float64) @ change + 0.5 * change @ H @ change)


@pytest.mark.parametrize("sparsity", [Sparsity(0.5), Sparsity(0.4, "tensor"), Sparsity(0.5, "column"),
                                      Sparsity.parse(None, "2:4")], ids=["row", "tensor", "column", "2:4"])
def test_layerwise_surrogate_never_increases_and_density_stays_exact(sparsity):
    tasks, activations = _tasks(sparsity)
    surrogates = [_direct_surrogate(tasks, activations, {t.name: t.mask for t in tasks})]
    reports = []

    def on_round(state: ICBSState, report) -> None:
        reports.append(report)
        direct = _direct_surrogate(tasks, activations, state.masks)
        assert direct <= surrogates[-1] * (1 + 1e-9)
        # tracked from block energies (float32 matrices): equal to the direct value to float32 rounding
        assert state.surrogate == pytest.approx(direct, rel=1e-6)
        surrogates.append(direct)
        for task in tasks:
            check_mask(state.masks[task.name], sparsity, task.name)

    block = 16 if sparsity.pattern else 12
    state = run_icbs(tasks, ICBSConfig(block_size=block, epochs=3, solver="exhaustive", tabu_size=1),
                     InProcessQueue(), on_round=on_round)
    assert state.done and reports
    assert surrogates[-1] < surrogates[0]  # it found something on these random layers
    assert sum(r.accepted for r in reports) == sum(c["accepted"] for c in state.counters.values())
    assert len(state.history_epoch) == 3 and state.history_epoch[-1] == pytest.approx(surrogates[-1], rel=1e-6)


def test_a_whole_row_block_reaches_the_brute_force_optimum():
    sparsity = Sparsity(0.5)
    tasks, activations = _tasks(sparsity, shapes=((3, 12),))
    task = tasks[0]
    state = run_icbs(tasks, ICBSConfig(block_size=12, epochs=1, solver="exhaustive"), InProcessQueue())
    H = task.gram
    for row in range(3):
        best = math.inf
        for chosen in itertools.combinations(range(12), 6):
            row_mask = torch.zeros(1, 12, dtype=torch.bool)
            row_mask[0, list(chosen)] = True
            best = min(best, float(mask_row_errors(task.weight[row:row + 1], H, row_mask)))
        assert float(mask_row_errors(task.weight[row:row + 1], H, state.masks[task.name][row:row + 1])) \
            == pytest.approx(best, rel=1e-9)


def test_resumed_run_equals_uninterrupted_run():
    sparsity = Sparsity(0.5)
    config = ICBSConfig(block_size=10, epochs=2, steps_per_epoch=9, selection="random", solver="exhaustive",
                        round_blocks=4, seed=5)
    tasks, _ = _tasks(sparsity)
    whole = run_icbs(tasks, config, InProcessQueue())
    rounds = {"n": 0}

    def count(state, report):
        rounds["n"] += 1

    stopped = run_icbs(tasks, config, InProcessQueue(), on_round=count, should_stop=lambda: rounds["n"] >= 3)
    assert not stopped.done and stopped.round_index == 3
    tensors, meta = stopped.to_dict()
    # the pipeline's checkpoint format: safetensors for the tensors, JSON for the rest
    restored = ICBSState.from_dict(safetensors.torch.load(safetensors.torch.save(tensors)),
                                   json.loads(json.dumps(meta)))
    resumed = run_icbs(tasks, config, InProcessQueue(), state=restored)
    assert resumed.done and resumed.round_index == whole.round_index
    for task in tasks:
        assert torch.equal(resumed.masks[task.name], whole.masks[task.name])
    assert resumed.history_round == pytest.approx(whole.history_round, rel=1e-6)
    assert resumed.counters == whole.counters


def test_steps_spread_over_tensors_by_log_size_with_a_minimum():
    sparsity = Sparsity(0.5)
    tasks, _ = _tasks(sparsity, shapes=((4, 8), (40, 400)))
    config = ICBSConfig(steps_per_epoch=30, objective="layerwise", seed=1)
    contexts = [prepare_tensor(task, config) for task in tasks]
    plan = plan_epoch(contexts, config, epoch=0)
    per_tensor = [sum(1 for t, _ in plan if t == index) for index in range(2)]
    sizes = [math.log10(32), math.log10(16000)]
    assert per_tensor == [round(30 * s / sum(sizes)) for s in sizes]
    assert plan != sorted(plan)  # shuffled
    assert plan == plan_epoch(contexts, config, epoch=0) and plan != plan_epoch(contexts, config, epoch=1)
    tiny = ICBSConfig(steps_per_epoch=1)
    assert [sum(1 for t, _ in plan_epoch(contexts, tiny, 0) if t == i) for i in range(2)] == [1, 1]


def test_fixed_fractions_are_never_touched():
    sparsity = Sparsity(0.5)
    tasks, _ = _tasks(sparsity)
    config = ICBSConfig(block_size=8, epochs=2, fixed_pruned=0.5, fixed_kept=0.5, solver="exhaustive")
    state = run_icbs(tasks, config, InProcessQueue())
    for task in tasks:
        frozen = state.frozen[task.name]
        per_row = frozen.sum(dim=1)
        width = task.weight.shape[1]
        assert per_row.tolist() == [2 * (width // 4)] * task.weight.shape[0]
        assert torch.equal(state.masks[task.name][frozen], task.mask[frozen])
        # the frozen pruned weights are the lowest-scoring pruned ones of their row
        for row in range(task.weight.shape[0]):
            pruned_scores = task.scores[row][task.mask[row]]
            frozen_pruned = task.scores[row][frozen[row] & task.mask[row]]
            assert frozen_pruned.max() <= pruned_scores.sort().values[len(frozen_pruned) - 1]


def test_tabu_makes_consecutive_blocks_of_a_row_differ():
    sparsity = Sparsity(0.5)
    tasks, _ = _tasks(sparsity, shapes=((2, 32),))
    seen: list[torch.Tensor] = []

    def on_round(state, report):
        seen.append(state.last_visit[tasks[0].name][0].clone())

    run_icbs(tasks, ICBSConfig(block_size=8, epochs=3, tabu_size=2, solver="exhaustive"), InProcessQueue(),
             on_round=on_round)
    blocks = [set(torch.nonzero(visit == number).reshape(-1).tolist()) for number, visit in enumerate(seen)]
    assert all(len(b) == 8 for b in blocks)
    assert not blocks[0] & blocks[1] and not blocks[1] & blocks[2] and not blocks[0] & blocks[2]


class _RandomAnswer(Solver):
    """A deliberately poor solver: a random feasible answer, often worse than the current one."""

    capabilities = Capabilities(name="test-random-answer", description="random feasible answers",
                                max_variables=1 << 12, constraints="native", device="cpu")

    def sample(self, problem: BlockProblem, **params: Any) -> BlockSolution:
        generator = np.random.default_rng(abs(hash(problem.id)) % (1 << 32))
        x = np.zeros(problem.num_variables, np.uint8)
        for members, count in zip(problem.group_members(), problem.counts):
            x[generator.choice(members, size=int(count), replace=False)] = 1
        return BlockSolution(x=x, energy=problem.energy(x), solver=self.name, problem_id=problem.id)


class _DroppingQueue(InProcessQueue):
    """Loses every third answer, as a crashed worker would."""

    def run_round(self, request: RoundRequest) -> RoundResult:
        result = super().run_round(request)
        for index in range(0, len(result.solutions), 3):
            result.solutions[index] = None
            result.failures[request.problems[index].id] = "lost"
        return result


def test_worse_and_missing_answers_are_rejected_and_counted():
    sparsity = Sparsity(0.5)
    tasks, activations = _tasks(sparsity)
    register(_RandomAnswer())
    try:
        values = []
        state = run_icbs(tasks, ICBSConfig(block_size=12, epochs=3, solver="test-random-answer"), _DroppingQueue(),
                         on_round=lambda s, r: values.append(_direct_surrogate(tasks, activations, s.masks)))
    finally:
        unregister("test-random-answer")
    totals = {key: sum(c[key] for c in state.counters.values()) for key in ("accepted", "rejected", "failed")}
    assert totals["failed"] > 0 and totals["rejected"] > 0
    assert all(b <= a * (1 + 1e-9) for a, b in zip(values, values[1:]))
    assert values[0] <= _direct_surrogate(tasks, activations, {t.name: t.mask for t in tasks})


@pytest.mark.parametrize("objective", ["fisher", "layerwise+fisher"])
def test_fisher_objectives_never_increase(objective):
    sparsity = Sparsity(0.5)
    tasks, activations = _tasks(sparsity, shapes=((4, 16), (3, 12)), samples=6)
    config = ICBSConfig(block_size=10, epochs=1, objective=objective, fisher_weight=2.0, solver="exhaustive")
    weight = 2.0 if objective == "layerwise+fisher" else 1.0

    def direct(masks) -> float:
        value = sum(weight * _fisher_direct(task, masks[task.name], config.gamma) for task in tasks)
        if objective == "layerwise+fisher":
            value += _direct_surrogate(tasks, activations, masks)
        return value

    values = [direct({t.name: t.mask for t in tasks})]

    def on_round(state, report):
        assert report.blocks <= len(tasks)  # one block per tensor per round
        value = direct(state.masks)
        assert state.surrogate == pytest.approx(value, rel=1e-6, abs=1e-9)
        assert value <= values[-1] + 1e-6 * abs(values[-1]) + 1e-9
        values.append(value)

    state = run_icbs(tasks, config, InProcessQueue(), on_round=on_round)
    assert values[-1] < values[0]
    assert sum(c["accepted"] for c in state.counters.values()) > 0


def test_relative_layer_error_matches_its_definition():
    tasks, activations = _tasks(Sparsity(0.5), shapes=((5, 20),))
    task = tasks[0]
    dense = float(((task.weight.to(torch.float64) @ activations[task.name]) ** 2).sum())
    expected = _direct_surrogate(tasks, activations, {task.name: task.mask}) / dense
    assert relative_layer_error(task.weight, task.gram, task.mask) == pytest.approx(expected, rel=1e-9)


def test_bad_configs_and_tasks_are_usage_errors():
    tasks, _ = _tasks(Sparsity(0.5))
    with pytest.raises(UsageError, match="objective"):
        run_icbs(tasks, ICBSConfig(objective="hessian"), InProcessQueue())
    with pytest.raises(UsageError, match="per-sample gradients"):
        run_icbs(tasks, ICBSConfig(objective="fisher"), InProcessQueue())
    broken = TensorTask("x", tasks[0].weight, ~tasks[0].mask | tasks[0].mask, tasks[0].scores, Sparsity(0.5),
                        gram=tasks[0].gram)
    with pytest.raises(UsageError, match="mask of x"):
        initial_state([broken], ICBSConfig())


def test_stop_between_rounds_is_prompt():
    """Asked to stop, the run returns before its next round (counted in rounds, not seconds:
    a fast machine finishes all 50 epochs inside any fixed time)."""
    tasks, _ = _tasks(Sparsity(0.5))
    rounds: list[int] = []
    state = run_icbs(tasks, ICBSConfig(block_size=12, epochs=50, solver="exhaustive"), InProcessQueue(),
                     on_round=lambda s, r: rounds.append(s.round_index), should_stop=lambda: len(rounds) >= 3)
    assert not state.done and state.epoch < 50
    assert rounds == [1, 2, 3] and state.round_index == 3


@pytest.mark.parametrize("solver", ["sa", "swap-tabu"])
@pytest.mark.parametrize("objective", ["layerwise", "fisher"])
def test_real_solvers_beyond_enumeration_improve_monotonically(objective, solver):
    """The real solvers on B = 32 blocks (too big to enumerate): still only downhill, and they help."""
    sparsity = Sparsity(0.5)
    tasks, activations = _tasks(sparsity, shapes=((16, 64), (8, 96)), samples=8 if objective == "fisher" else None)
    values: list[float] = []
    state = run_icbs(tasks, ICBSConfig(block_size=32, epochs=2, objective=objective, solver=solver, seed=3),
                     InProcessQueue(), on_round=lambda s, r: values.append(s.surrogate))
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(values, values[1:]))
    assert state.surrogate < state.initial_surrogate
    if objective == "layerwise":
        direct = _direct_surrogate(tasks, activations, state.masks)
        assert direct == pytest.approx(state.surrogate, rel=1e-6)
        assert direct < 0.9 * _direct_surrogate(tasks, activations, {t.name: t.mask for t in tasks})
    for task in tasks:
        check_mask(state.masks[task.name], sparsity, task.name)


def test_full_sweep_gives_wide_rows_more_blocks():
    tasks, _ = _tasks(Sparsity(0.5), shapes=((4, 24), (3, 96)))
    config = ICBSConfig(block_size=8, coverage=1 / 3)
    contexts = [prepare_tensor(task, config) for task in tasks]
    plan = plan_epoch(contexts, config, epoch=0)
    assert [sum(1 for t, _ in plan if t == index) for index in range(2)] == [4 * 1, 3 * 4]
    assert plan[:7] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]  # every row once first
    single = ICBSConfig(block_size=8, coverage=0.0)
    assert len(plan_epoch(contexts, single, epoch=0)) == 7


class _InspectingQueue(InProcessQueue):
    """Records whether each round's block matrices lie back to back in one buffer."""

    def __init__(self):
        super().__init__()
        self.in_place: list[bool] = []

    def run_round(self, request: RoundRequest) -> RoundResult:
        from qsurgeon.worker.block.stack import flat_matrices

        first = request.problems[0].Q
        self.in_place.append(np.shares_memory(flat_matrices(list(request.problems)), first))
        return super().run_round(request)


def test_a_rounds_layerwise_blocks_of_every_tensor_share_one_buffer():
    sparsity = Sparsity(0.5)
    tasks, _ = _tasks(sparsity, shapes=((8, 24), (6, 32), (5, 40)))
    queue = _InspectingQueue()
    config = ICBSConfig(block_size=8, epochs=2, solver="sa", seed=1)
    state = run_icbs(tasks, config, queue)
    assert queue.in_place and all(queue.in_place)
    reference = run_icbs(_tasks(sparsity, shapes=((8, 24), (6, 32), (5, 40)))[0], config, InProcessQueue())
    for name in state.masks:  # reproducible with the shared buffer (sa tests: in place == copied)
        assert torch.equal(state.masks[name], reference.masks[name])

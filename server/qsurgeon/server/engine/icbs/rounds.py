"""One iCBS round: build the QUBOs of its blocks, have the queue solve them, judge the answers, merge.

A round's blocks are independent of each other (the schedule sees to that), so every
accepted answer can be merged without re-judging the others. An answer is accepted only
if its energy, recomputed from the problem itself, is below the current assignment's
(docs/icbs.md §3.4): the surrogate never increases, whatever the solver returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from qsurgeon.server.engine.icbs.objective import surrogate
from qsurgeon.server.engine.icbs.schedule import round_seed
from qsurgeon.server.engine.icbs.selection import BlockPlaces, record_visits, select_blocks
from qsurgeon.server.engine.icbs.state import (
    ACCEPTED, COUNTERS, FAILED, REJECTED, UNCHANGED, ICBSState, RoundReport, TensorContext,
)
from qsurgeon.server.engine.options import ICBSConfig
from qsurgeon.server.pruning.qubo import (
    block_energies, fisher_block, layerwise_arrays, layerwise_blocks, problems_from_arrays, row_errors, weighted_sum,
)
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.block.stack import MatrixStack
from qsurgeon.worker.queue.base import Queue, RoundRequest


@dataclass
class _Pending:
    """Blocks of one tensor in a round: where they are and their problems."""

    tensor: int
    places: BlockPlaces
    problems: list[BlockProblem]
    stacked: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # layer-wise (Q, x0, offsets)
    groups: np.ndarray | None = None  # (B,) N:M group labels of every block, if any


def run_round(contexts: list[TensorContext], state: ICBSState, steps: list[tuple[int, int]], config: ICBSConfig,
              queue: Queue, job_id: str) -> RoundReport:
    """Solve the blocks of ``steps`` (tensor index, line) as one queue request and merge the accepted answers."""
    build_start = time.perf_counter()
    round_index = state.round_index
    by_tensor: dict[int, list[int]] = {}
    for t, line in steps:
        by_tensor.setdefault(t, []).append(line)
    pending: list[_Pending] = []
    buffer = None
    if config.objective == "layerwise":  # blocks never exceed B × B, one per line; sa reads them in place
        buffer = MatrixStack(sum(len(lines) * contexts[t].block ** 2 for t, lines in by_tensor.items()))
    for t, lines in by_tensor.items():
        built = _build_tensor_blocks(t, contexts[t], state, torch.tensor(lines, dtype=torch.int64), config,
                                     round_index, buffer)
        if built is not None and built.problems:
            pending.append(built)
    problems = [problem for item in pending for problem in item.problems]
    solve_start = time.perf_counter()
    if problems:
        solver, params = config.solver_request(round_seed(config.seed, round_index))
        result = queue.run_round(RoundRequest(job_id, f"r{round_index}", problems, solver, params))
        solutions = list(result.solutions)
        if len(solutions) != len(problems):
            raise RuntimeError(f"queue returned {len(solutions)} answers for {len(problems)} blocks")
    else:
        solutions = []
    merge_start = time.perf_counter()
    totals = dict.fromkeys(COUNTERS, 0)
    offset = 0
    for item in pending:
        answers = solutions[offset:offset + len(item.problems)]
        offset += len(item.problems)
        outcomes, proposals, energies = _judge_all(item, answers)
        name = contexts[item.tensor].task.name
        for code, outcome in enumerate(COUNTERS):
            count = int((outcomes == code).sum())
            state.counters[name][outcome] += count
            totals[outcome] += count
        record_visits(contexts[item.tensor], state, item.places)
        _merge(contexts[item.tensor], state, item, outcomes, proposals, energies, config)
    done = time.perf_counter()
    return RoundReport(
        round_index=round_index, epoch=state.epoch, blocks=len(problems), surrogate=state.surrogate,
        build_seconds=solve_start - build_start, solve_seconds=merge_start - solve_start,
        merge_seconds=done - merge_start, **totals,
    )


def _build_tensor_blocks(tensor: int, context: TensorContext, state: ICBSState, lines: Tensor, config: ICBSConfig,
                         round_index: int, buffer: MatrixStack | None = None) -> _Pending | None:
    places = select_blocks(context, state, lines, config, round_index)
    if places is None:
        return None
    name = context.task.name
    mask = state.masks[name]
    ids = [f"{name}:{int(line)}:{round_index}" for line in places.lines]
    labels = None if places.groups is None else places.groups.numpy()
    if config.objective == "layerwise":
        if context.row_error is None:  # resumed run: the cache starts from the saved mask
            context.row_error = row_errors(context.weight, context.gram, mask, context.task.linear,
                                           context.task.constant)
        out = None if buffer is None else buffer.take(places.cols.shape[0], places.cols.shape[1])
        stacked = layerwise_arrays(context.weight, context.gram, mask, places.rows, places.cols,
                                   gram_is_symmetric=True, row_error=context.row_error, out=out,
                                   linear=context.task.linear)
        problems = problems_from_arrays(*stacked, ids, labels)
        return _Pending(tensor=tensor, places=places, problems=problems, stacked=stacked, groups=labels)
    problems = _fisher_problems(context, mask, places, ids, config)
    return _Pending(tensor=tensor, places=places, problems=problems, groups=labels)


def _fisher_problems(context: TensorContext, mask: Tensor, places: BlockPlaces, ids: list[str],
                     config: ICBSConfig) -> list[BlockProblem]:
    """Fisher (or layerwise+fisher) blocks; the gradient is the model's at the current weights."""
    rows, cols, groups = places.rows, places.cols, places.groups
    width = context.task.weight.shape[1]
    current = (context.weight * (~mask).to(torch.float64)).reshape(-1)
    projected = context.fisher_g @ (current - context.reference)
    samples = context.fisher_g.shape[0]
    if config.objective == "layerwise+fisher":
        layer = layerwise_blocks(context.weight, context.gram, mask, rows, cols, groups=groups, ids=ids,
                                 gram_is_symmetric=True)
    problems = []
    for index in range(cols.shape[0]):
        block_rows = rows[index] if rows.ndim == 2 else rows[index].expand(cols.shape[1])
        flat = block_rows * width + cols[index]
        w0 = context.weight.reshape(-1)[flat]
        x0 = mask.reshape(-1)[flat].to(torch.float64)
        g_block = context.fisher_g[:, flat]
        gradient = config.gamma * context.fisher_grad[flat] + g_block.T @ projected / samples
        fisher = fisher_block(w0, -w0 * x0, g_block, gradient, 1.0, config.ridge, x0=x0, groups=groups,
                              id=ids[index])
        if config.objective == "layerwise+fisher":
            problems.append(weighted_sum(layer[index], fisher, config.fisher_weight))
        else:
            problems.append(fisher)
    return problems


def _judge_all(item: _Pending, answers: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§3.4 for every block of a tensor: accept only a feasible answer whose energy, recomputed
    from the problem itself, is below the current assignment's. Returns (outcome codes, the
    assignments to apply, their energies).

    Layer-wise blocks are judged together from their stacked matrices (the same float64
    value as ``problem.energy``); other blocks one by one with ``problem.energies``.
    """
    n_blocks = len(item.problems)
    x0 = np.stack([problem.x0 for problem in item.problems]) if item.stacked is None else item.stacked[1]
    outcomes = np.full(n_blocks, FAILED, np.int64)
    shaped = [answer is not None and np.shape(answer.x) == x0.shape[1:] for answer in answers]
    stacked = np.stack([np.asarray(answer.x) if ok else row for answer, ok, row in zip(answers, shaped, x0)])
    present = np.asarray(shaped, bool) & ((stacked == 0) | (stacked == 1)).all(axis=1)
    proposals = np.where(present[:, None], stacked, x0).astype(np.uint8)
    counts_now = _group_counts(x0, item)
    feasible = present & (_group_counts(proposals, item) == counts_now).all(axis=1)
    same = (proposals == x0).all(axis=1)
    if item.stacked is not None:
        Q, _, offsets = item.stacked
        current = block_energies(Q, x0, offsets)
        proposed = block_energies(Q, proposals, offsets)
    else:
        pairs = [problem.energies(np.stack([problem.x0, x])) for problem, x in zip(item.problems, proposals)]
        current = np.array([pair[0] for pair in pairs])
        proposed = np.array([pair[1] for pair in pairs])
    outcomes[feasible & same] = UNCHANGED
    moved = feasible & ~same
    outcomes[moved & (proposed < current)] = ACCEPTED
    outcomes[moved & (proposed == current)] = UNCHANGED
    outcomes[moved & (proposed > current)] = REJECTED
    proposals[outcomes != ACCEPTED] = x0[outcomes != ACCEPTED]
    return outcomes, proposals, proposed


def _group_counts(X: np.ndarray, item: _Pending) -> np.ndarray:
    """Ones per constraint group of every block: (n, 1) totals, or (n, G) with N:M groups."""
    if item.groups is None:
        return X.sum(axis=1, dtype=np.int64)[:, None]
    n_groups = int(item.groups.max()) + 1
    return X.reshape(X.shape[0], n_groups, -1).sum(axis=2, dtype=np.int64)


def _merge(context: TensorContext, state: ICBSState, item: _Pending, outcomes: np.ndarray, proposals: np.ndarray,
           energies: np.ndarray, config: ICBSConfig) -> None:
    """Write the accepted answers into the mask and bring the tensor's surrogate up to date."""
    accepted_blocks = np.nonzero(outcomes == ACCEPTED)[0]
    if not accepted_blocks.size:
        return
    name = context.task.name
    chosen = torch.as_tensor(accepted_blocks, dtype=torch.int64)
    values = torch.as_tensor(proposals[accepted_blocks]).to(torch.bool)
    block_rows = item.places.rows[chosen]
    rows = block_rows if block_rows.ndim == 2 else block_rows[:, None].expand_as(values)
    state.masks[name][rows, item.places.cols[chosen]] = values
    if item.stacked is not None and block_rows.ndim == 1 and context.row_error is not None:
        # a one-row layer-wise block's energy IS that row's new error: no recomputation
        context.row_error[block_rows] = torch.as_tensor(energies[accepted_blocks])
        state.surrogate_per_tensor[name] = surrogate(context, state.masks[name], config, rows[:0, 0])
    elif item.stacked is not None and context.row_error is not None:
        # blocks over several rows: each row's share of the energy change, from Q itself
        context.row_error.index_add_(0, rows.reshape(-1), _row_shares(item, accepted_blocks, proposals,
                                                                       rows).reshape(-1))
        state.surrogate_per_tensor[name] = surrogate(context, state.masks[name], config, rows[:0, 0])
    else:
        state.surrogate_per_tensor[name] = surrogate(context, state.masks[name], config, rows.unique())


def _row_shares(item: _Pending, blocks: np.ndarray, proposals: np.ndarray, rows: Tensor) -> Tensor:
    """Per entry: its row's part of the energy change, Σ_b [same row] (x_a x_b − x0_a x0_b) Q_ab.

    Summed over a row's entries this is that row's error change, because entries of
    different rows never couple; it spares recomputing whole rows after column blocks.
    """
    Q = torch.from_numpy(item.stacked[0][blocks]).to(torch.float64)
    new = torch.from_numpy(proposals[blocks]).to(torch.float64)
    old = torch.from_numpy(item.stacked[1][blocks]).to(torch.float64)
    same_row = (rows[:, :, None] == rows[:, None, :]).to(torch.float64)
    change = new[:, :, None] * new[:, None, :] - old[:, :, None] * old[:, None, :]
    return (change * same_row * Q).sum(dim=2)


__all__ = ["run_round"]

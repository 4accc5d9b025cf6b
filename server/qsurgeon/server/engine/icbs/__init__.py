"""The iCBS loop: block coordinate descent over the pruning masks (docs/icbs.md §3, §6).

Every round picks many blocks that are independent of each other, builds their QUBOs
(:mod:`qsurgeon.server.pruning.qubo`), hands them to a :class:`Queue` as one request, and merges
the answers that lower the block's energy. Independence is what makes a round exact:

- layer-wise, row blocks: rows never couple, so a round holds at most one block per
  (tensor, row) and every block of a tensor's sweep can go in the same round;
- layer-wise, column granularity: a block lies in one column; blocks of the same tensor in
  one round use disjoint row sets (the rows are split between them at random);
- fisher (and layerwise+fisher): the empirical Fisher couples every weight of a tensor,
  so a round holds at most one block per tensor.

An answer is accepted only if its energy, recomputed with the problem itself, is below
the current assignment's energy (§3.4), so the surrogate objective — the summed
layer-wise error, the fisher model, or their weighted sum — never increases, whatever
the solver does. All randomness comes from (config.seed, tensor name, epoch/round index),
never from a running generator, so a run resumed from a saved :class:`ICBSState` gives
the same masks as one that was never interrupted.

The modules: :mod:`.state` (what goes in and what is kept), :mod:`.objective` (the
surrogate), :mod:`.schedule` (steps, rounds, seeds), :mod:`.selection` (which weights
form a block), :mod:`.rounds` (build, solve, judge, merge); this module runs the epochs.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.server.engine.icbs.objective import dense_error, mask_row_errors, relative_layer_error, surrogate
from qsurgeon.server.engine.icbs.rounds import run_round
from qsurgeon.server.engine.icbs.schedule import plan_epoch, round_end
from qsurgeon.server.engine.icbs.selection import frozen_mask
from qsurgeon.server.engine.icbs.state import (
    COUNTERS, NEVER, FisherTerms, ICBSState, RoundReport, TensorContext, TensorTask, prepare_tensor,
)
from qsurgeon.server.engine.options import ICBSConfig
from qsurgeon.worker.queue.base import Queue


def initial_state(tasks: list[TensorTask], config: ICBSConfig) -> ICBSState:
    """The state before any round: initial masks, no tabu memory, the initial surrogate."""
    return _initial_state([prepare_tensor(task, config) for task in tasks], config)


def _initial_state(contexts: list[TensorContext], config: ICBSConfig) -> ICBSState:
    state = ICBSState(masks={}, frozen={}, last_visit={}, visits={})
    for context in contexts:
        name = context.task.name
        state.masks[name] = context.task.mask.clone()
        state.frozen[name] = frozen_mask(context, config)
        state.last_visit[name] = torch.full(context.task.mask.shape, NEVER, dtype=torch.int32)
        state.visits[name] = torch.zeros(context.lines, dtype=torch.int32)
        state.counters[name] = dict.fromkeys(COUNTERS, 0)
        state.surrogate_per_tensor[name] = surrogate(context, state.masks[name], config)
    state.initial_surrogate = state.surrogate
    return state


def run_icbs(
    tasks: list[TensorTask],
    config: ICBSConfig,
    queue: Queue,
    *,
    state: ICBSState | None = None,
    on_round: Callable[[ICBSState, RoundReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    job_id: str = "embedded",
) -> ICBSState:
    """Run (or resume) iCBS over ``tasks``; returns the final state (``state.masks`` are the result).

    The state passed in is updated in place and returned. ``should_stop`` is checked
    between rounds; a stopped run can be resumed with the returned state.
    """
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise UsageError("tensor names must be unique")
    contexts = [prepare_tensor(task, config) for task in tasks]
    if state is None:
        state = _initial_state(contexts, config)
    elif set(state.masks) != set(names):
        raise UsageError("the saved iCBS state is for other tensors than the ones given")
    started = time.perf_counter() - state.seconds
    while state.epoch < config.epochs:
        plan = plan_epoch(contexts, config, state.epoch)
        while state.cursor < len(plan):
            if should_stop is not None and should_stop():
                state.seconds = time.perf_counter() - started
                return state
            end = round_end(plan, state.cursor, contexts, config)
            report = run_round(contexts, state, plan[state.cursor:end], config, queue, job_id)
            state.cursor = end
            state.round_index += 1
            state.history_round.append(state.surrogate)
            state.seconds = time.perf_counter() - started
            if on_round is not None:
                on_round(state, report)
        state.history_epoch.append(state.surrogate)
        state.epoch += 1
        state.cursor = 0
    state.done = True
    state.seconds = time.perf_counter() - started
    return state


__all__ = [
    "FisherTerms", "ICBSConfig", "ICBSState", "RoundReport", "TensorTask", "dense_error", "initial_state",
    "mask_row_errors", "relative_layer_error", "run_icbs",
]

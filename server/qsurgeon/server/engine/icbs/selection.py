"""Which weights go into a round's blocks (docs/icbs.md §3): lines, N:M groups, tabu, frozen weights.

A block mixes pruned weights the scores say may be wrong with kept weights that may be
prunable, so the solver has a real swap to consider. Weights a recent block held are
tabu and only fill a shortfall; frozen weights (the fixed fractions) never enter a block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qsurgeon.server.engine.icbs.schedule import keyed_generator
from qsurgeon.server.engine.icbs.state import ICBSState, TensorContext
from qsurgeon.server.engine.options import ICBSConfig


@dataclass
class BlockPlaces:
    """Where a tensor's blocks of one round lie."""

    rows: Tensor  # (n,) one row per block, or (n, B) for column blocks
    cols: Tensor  # (n, B)
    lines: Tensor  # (n,) line index of each block (for tabu bookkeeping)
    groups: Tensor | None  # (B,) N:M group label of every position of a block, if any


def frozen_mask(context: TensorContext, config: ICBSConfig) -> Tensor:
    """Fixed fractions: per line, the lowest-scoring pruned and highest-scoring kept weights."""
    frozen = torch.zeros(context.task.mask.shape, dtype=torch.bool)
    if context.task.sparsity.pattern is not None or (config.fixed_pruned == 0 and config.fixed_kept == 0):
        return frozen
    pruned = context.line_view(context.task.mask)
    rank = context.rank
    frozen_lines = context.line_view(frozen)
    for fraction, is_pruned, lowest in ((config.fixed_pruned, pruned, True), (config.fixed_kept, ~pruned, False)):
        if fraction <= 0:
            continue
        counts = torch.floor(is_pruned.sum(dim=1).to(torch.float64) * fraction).to(torch.int64)
        key = torch.where(is_pruned, rank if lowest else -rank, torch.full_like(rank, math.inf))
        order = torch.argsort(key, dim=1, stable=True)
        take = torch.arange(rank.shape[1])[None, :] < counts[:, None]
        frozen_lines.scatter_(1, order, take | frozen_lines.gather(1, order))
    return frozen


def select_blocks(context: TensorContext, state: ICBSState, lines: Tensor, config: ICBSConfig,
                  round_index: int) -> BlockPlaces | None:
    """The blocks of ``lines`` in this round, or None when no line has a move left."""
    name = context.task.name
    pruned = context.line_view(state.masks[name])[lines]
    tabu_since = state.visits[name][lines].to(torch.int64) - config.tabu_size
    tabu = context.line_view(state.last_visit[name])[lines].to(torch.int64) >= tabu_since[:, None]
    if config.selection == "random":
        priority = torch.rand(pruned.shape, generator=keyed_generator(config.seed, "select", name, round_index),
                              dtype=torch.float64)
    else:
        priority = context.rank[lines]
    pattern = context.task.sparsity.pattern
    groups = None
    if pattern is not None:
        positions = _select_nm_groups(pruned, priority, tabu, context.block, pattern[1])
        groups = torch.arange(context.block // pattern[1]).repeat_interleave(pattern[1])
    else:
        allowed = ~context.line_view(state.frozen[name])[lines]
        if context.by_column:
            allowed = allowed & _row_split(context, lines, config, round_index)
        chosen = _select_in_lines(pruned, priority, allowed, tabu, context.block, config.block_k(context.block))
        if chosen is None:
            return None
        positions, useful = chosen
        # ascending positions: the builder then reads H in order (block order is free)
        lines, positions = lines[useful], positions[useful].sort(dim=1).values
    if context.by_column:
        return BlockPlaces(rows=positions, cols=lines[:, None].expand_as(positions), lines=lines, groups=groups)
    return BlockPlaces(rows=lines, cols=positions, lines=lines, groups=groups)


def _select_in_lines(pruned: Tensor, priority: Tensor, allowed: Tensor, tabu: Tensor, block: int, k: int
                     ) -> tuple[Tensor, Tensor] | None:
    """Positions (m, B') of each line's block: the k pruned with the highest priority plus the
    B'−k kept with the lowest, non-tabu weights first (tabu ones only fill a shortfall).

    Returns (positions, keep_line) or None when no line has a move. B' and k shrink to what
    every line can supply, so all blocks of the call have one size.
    """
    avail_pruned = (allowed & pruned).sum(dim=1)
    avail_kept = (allowed & ~pruned).sum(dim=1)
    size = int(min(block, int((avail_pruned + avail_kept).min())))
    if size < 2:
        return None
    k_line = torch.clamp(torch.full_like(avail_pruned, k), max=avail_pruned)
    kept_line = torch.clamp(size - k_line, max=avail_kept)
    k_line = size - kept_line
    useful = (k_line > 0) & (kept_line > 0)
    if not bool(useful.any()):
        return None
    boost = (~tabu).to(torch.float64) * 2.0
    minus = torch.full_like(priority, -1.0)
    pruned_key = torch.where(allowed & pruned, priority + boost, minus)
    kept_key = torch.where(allowed & ~pruned, (1.0 - priority) + boost, minus)
    most_pruned = int(k_line.max())
    most_kept = int(kept_line.max())
    top_pruned = torch.topk(pruned_key, most_pruned, dim=1, sorted=True).indices
    top_kept = torch.topk(kept_key, most_kept, dim=1, sorted=True).indices
    slots = torch.arange(size)[None, :]
    from_pruned = slots < k_line[:, None]
    positions = torch.where(
        from_pruned,
        top_pruned.gather(1, slots.clamp(max=most_pruned - 1).expand(len(k_line), size)),
        top_kept.gather(1, (slots - k_line[:, None]).clamp(min=0, max=most_kept - 1)),
    )
    return positions, useful


def _select_nm_groups(pruned: Tensor, priority: Tensor, tabu: Tensor, block: int, m: int) -> Tensor:
    """Positions (lines, B) of whole N:M groups: the groups most likely to hold a wrong choice.

    A group's suspicion is its highest pruned priority minus its lowest kept priority (the
    best single swap the scores suggest); groups touched by a tabu block come last.
    """
    lines, length = pruned.shape
    n_groups = block // m
    grouped_priority = priority.reshape(lines, length // m, m)
    grouped_pruned = pruned.reshape(lines, length // m, m)
    best_pruned = torch.where(grouped_pruned, grouped_priority, torch.full_like(grouped_priority, -1.0)).amax(dim=2)
    worst_kept = torch.where(~grouped_pruned, grouped_priority, torch.full_like(grouped_priority, 2.0)).amin(dim=2)
    group_tabu = tabu.reshape(lines, length // m, m).any(dim=2)
    key = best_pruned - worst_kept + (~group_tabu).to(torch.float64) * 4.0
    chosen = torch.topk(key, n_groups, dim=1, sorted=True).indices.sort(dim=1).values
    return (chosen[:, :, None] * m + torch.arange(m)).reshape(lines, n_groups * m)


def _row_split(context: TensorContext, columns: Tensor, config: ICBSConfig, round_index: int) -> Tensor:
    """Column blocks of one round get disjoint random row sets (so they stay independent)."""
    out = context.task.weight.shape[0]
    order = torch.randperm(out, generator=keyed_generator(config.seed, "rows", context.task.name, round_index))
    owner = torch.empty(out, dtype=torch.int64)
    owner[order] = torch.arange(out) % len(columns)
    return owner[None, :] == torch.arange(len(columns))[:, None]


def record_visits(context: TensorContext, state: ICBSState, places: BlockPlaces) -> None:
    """Tabu memory: the block's weights remember the line's block number; the line counts one more."""
    name = context.task.name
    visits = state.visits[name]
    numbers = visits[places.lines].to(torch.int32)
    rows = places.rows if places.rows.ndim == 2 else places.rows[:, None].expand_as(places.cols)
    state.last_visit[name][rows, places.cols] = numbers[:, None].expand_as(places.cols)
    visits[places.lines] += 1


__all__ = ["BlockPlaces", "frozen_mask", "record_visits", "select_blocks"]

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
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from qsurgeon.client.errors import UsageError
from qsurgeon.server.engine.options import ICBSConfig
from qsurgeon.server.pruning.masks import check_mask
from qsurgeon.server.pruning.qubo import (
    block_energies, fisher_block, layerwise_arrays, layerwise_blocks, problems_from_arrays, row_errors,
    symmetric_gram, weighted_sum,
)
from qsurgeon.server.pruning.sparsity import Sparsity
from qsurgeon.worker.block.problem import BlockProblem
from qsurgeon.worker.block.stack import MatrixStack
from qsurgeon.worker.queue.base import Queue, RoundRequest

#: Bytes of float32 block matrices one round may hold; a sweep is cut into rounds below this.
ROUND_BYTES = 256 << 20
_NEVER = -(1 << 30)  # last_visit of a weight that was never in a block


@dataclass
class FisherTerms:
    """Per-sample gradients of one tensor, taken once at the reference (initially pruned) weights.

    The fisher surrogate is the quadratic model around the reference weights
    w_ref = w0∘(1 − initial mask): M(w) = γ·gᵀ(w − w_ref) + ½(w − w_ref)ᵀH(w − w_ref) with
    H = GᵀG/N, so its gradient at the current weights is γg + H(w − w_ref): exact for the
    model, no re-differentiation of the network between rounds.
    """

    per_sample_grads: Tensor  # (N, out, in)
    grad: Tensor  # (out, in), the mean loss gradient at the reference weights


@dataclass
class TensorTask:
    """One prunable weight tensor, handed in by the pipeline."""

    name: str
    weight: Tensor  # (out, in) ORIGINAL weights w0
    mask: Tensor  # (out, in) bool, True = pruned: the initial mask (exact density)
    scores: Tensor  # (out, in) selection scores (higher = keep)
    sparsity: Sparsity
    gram: Tensor | None = None  # (in, in) float64, H = A Aᵀ over calibration tokens
    fisher: FisherTerms | None = None


@dataclass
class RoundReport:
    round_index: int
    epoch: int
    blocks: int
    accepted: int
    unchanged: int
    rejected: int
    failed: int
    surrogate: float  # after the round
    build_seconds: float
    solve_seconds: float
    merge_seconds: float


_COUNTERS = ("accepted", "unchanged", "rejected", "failed")


@dataclass
class ICBSState:
    """Everything needed to continue a run: masks, tabu memory, schedule position, history."""

    masks: dict[str, Tensor]  # current masks, True = pruned
    frozen: dict[str, Tensor]  # weights never put in a block (fixed fractions)
    last_visit: dict[str, Tensor]  # (out, in) int32: the line's block number when the weight was last in a block
    visits: dict[str, Tensor]  # (lines,) int32: blocks done per row (per column for column granularity)
    round_index: int = 0
    epoch: int = 0
    cursor: int = 0  # next step of the current epoch's plan
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    surrogate_per_tensor: dict[str, float] = field(default_factory=dict)
    initial_surrogate: float = 0.0
    history_round: list[float] = field(default_factory=list)
    history_epoch: list[float] = field(default_factory=list)
    seconds: float = 0.0
    done: bool = False

    @property
    def surrogate(self) -> float:
        return float(sum(self.surrogate_per_tensor.values()))

    def to_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors (for safetensors) and a JSON-friendly dict: enough to resume exactly."""
        tensors: dict[str, Tensor] = {}
        for group in ("masks", "frozen", "last_visit", "visits"):
            for name, tensor in getattr(self, group).items():
                tensors[f"{group}/{name}"] = tensor.contiguous()
        meta = {
            "tensors": list(self.masks),
            "round_index": self.round_index, "epoch": self.epoch, "cursor": self.cursor,
            "counters": self.counters, "surrogate_per_tensor": self.surrogate_per_tensor,
            "initial_surrogate": self.initial_surrogate, "history_round": self.history_round,
            "history_epoch": self.history_epoch, "seconds": self.seconds, "done": self.done,
        }
        return tensors, meta

    @classmethod
    def from_dict(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> "ICBSState":
        names = list(meta["tensors"])
        try:
            groups = {
                group: {name: tensors[f"{group}/{name}"] for name in names}
                for group in ("masks", "frozen", "last_visit", "visits")
            }
        except KeyError as missing:
            raise UsageError(f"iCBS checkpoint lacks tensor {missing}") from None
        return cls(
            **groups, round_index=int(meta["round_index"]), epoch=int(meta["epoch"]), cursor=int(meta["cursor"]),
            counters={k: dict(v) for k, v in meta["counters"].items()},
            surrogate_per_tensor={k: float(v) for k, v in meta["surrogate_per_tensor"].items()},
            initial_surrogate=float(meta["initial_surrogate"]), history_round=list(meta["history_round"]),
            history_epoch=list(meta["history_epoch"]), seconds=float(meta["seconds"]), done=bool(meta["done"]),
        )


# ---------------------------------------------------------------------- error helpers
def layer_error(weight0: Tensor, gram: Tensor, mask: Tensor) -> Tensor:
    """Exact layer-wise error of every row, ‖(w0_r∘x_r)ᵀA‖² = (w0∘x)_r H (w0∘x)_rᵀ, float64 (out,)."""
    return row_errors(weight0, gram, mask)


def dense_error(weight0: Tensor, gram: Tensor) -> float:
    """Σ_rows w0ᵀHw0 = ‖W0 A‖²: the error of pruning everything, the denominator of relative errors."""
    return float(layer_error(weight0, gram, torch.ones(weight0.shape, dtype=torch.bool)).sum())


def relative_layer_error(weight0: Tensor, gram: Tensor, mask: Tensor) -> float:
    """Σ_rows e / Σ_rows w0ᵀHw0 for one tensor: ‖(W − Ŵ)A‖² / ‖WA‖²."""
    return float(layer_error(weight0, gram, mask).sum()) / max(dense_error(weight0, gram), 1e-300)


# ---------------------------------------------------------------------- randomness
def _generator(seed: int, *parts: Any) -> torch.Generator:
    """A generator keyed by (seed, parts): no state is shared between rounds or tensors."""
    key = zlib.crc32(repr((int(seed),) + tuple(parts)).encode())
    return torch.Generator().manual_seed(key)


def _round_seed(seed: int, round_index: int) -> int:
    return zlib.crc32(repr(("solver", int(seed), int(round_index))).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------- per-tensor context
@dataclass
class _Context:
    """Per-run, per-tensor data derived from the task (never saved: recomputed on resume)."""

    task: TensorTask
    weight: Tensor  # float64 (out, in)
    gram: Tensor | None  # float64 symmetric
    rank: Tensor  # (lines, line_length) score rank within each line, in [0, 1)
    by_column: bool  # lines are columns (column granularity)
    block: int  # block size used for this tensor
    fisher_g: Tensor | None = None  # (N, out*in) float64
    fisher_grad: Tensor | None = None  # (out*in,) float64
    reference: Tensor | None = None  # (out*in,) float64 reference weights
    row_error: Tensor | None = None  # (out,) float64 cache of the current layer-wise error per row

    @property
    def lines(self) -> int:
        return self.task.weight.shape[1] if self.by_column else self.task.weight.shape[0]

    def line_view(self, tensor: Tensor) -> Tensor:
        return tensor.T if self.by_column else tensor


def _score_rank(scores: Tensor) -> Tensor:
    """Rank of each score within its row, scaled to [0, 1): higher = more important."""
    order = torch.argsort(scores, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order).contiguous())
    return rank.to(torch.float64) / scores.shape[1]


def _prepare(task: TensorTask, config: ICBSConfig) -> _Context:
    weight = task.weight.detach()
    if weight.ndim != 2:
        raise UsageError(f"{task.name}: weight must be 2-D (out, in), got {tuple(weight.shape)}")
    if task.mask.shape != weight.shape or task.scores.shape != weight.shape:
        raise UsageError(f"{task.name}: mask and scores must have the weight's shape {tuple(weight.shape)}")
    check_mask(task.mask, task.sparsity, task.name)
    needs_gram = config.objective in ("layerwise", "layerwise+fisher")
    needs_fisher = config.objective in ("fisher", "layerwise+fisher")
    if needs_gram and task.gram is None:
        raise UsageError(f"{task.name}: objective {config.objective!r} needs the Gram matrix (gram)")
    if needs_fisher and task.fisher is None:
        raise UsageError(f"{task.name}: objective {config.objective!r} needs per-sample gradients (fisher)")
    by_column = task.sparsity.pattern is None and task.sparsity.granularity == "column"
    if by_column and config.objective != "layerwise":
        raise UsageError("column granularity is supported with the layerwise objective only")
    line_scores = task.scores.detach().float().T if by_column else task.scores.detach().float()
    line_length = line_scores.shape[1]
    block = min(config.block_size, line_length)
    if task.sparsity.pattern is not None:
        m = task.sparsity.pattern[1]
        block = max(m, block - block % m)
    context = _Context(task=task, weight=weight.to(torch.float64),
                       gram=symmetric_gram(task.gram) if needs_gram else None,
                       rank=_score_rank(line_scores), by_column=by_column, block=block)
    if needs_fisher:
        grads = task.fisher.per_sample_grads
        if grads.ndim != 3 or grads.shape[1:] != weight.shape or task.fisher.grad.shape != weight.shape:
            raise UsageError(f"{task.name}: fisher gradients must be (N, out, in) and (out, in)")
        context.fisher_g = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)
        context.fisher_grad = task.fisher.grad.detach().reshape(-1).to(torch.float64)
        context.reference = (context.weight * (~task.mask).to(torch.float64)).reshape(-1)
    return context


def _frozen_mask(context: _Context, config: ICBSConfig) -> Tensor:
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


def _surrogate(context: _Context, mask: Tensor, config: ICBSConfig, rows: Tensor | None = None) -> float:
    """The tensor's surrogate; ``rows`` limits the layer-wise recomputation to rows that changed."""
    value = 0.0
    if context.gram is not None:
        if context.row_error is None or rows is None:
            context.row_error = row_errors(context.weight, context.gram, mask)
        elif rows.numel():
            context.row_error[rows] = row_errors(context.weight[rows], context.gram, mask[rows])
        value += float(context.row_error.sum())
    if context.fisher_g is not None:
        weight = config.fisher_weight if config.objective == "layerwise+fisher" else 1.0
        value += weight * _fisher_model(context, mask, config)
    return value


def _fisher_model(context: _Context, mask: Tensor, config: ICBSConfig) -> float:
    change = (context.weight * (~mask).to(torch.float64)).reshape(-1) - context.reference
    projected = context.fisher_g @ change
    return float(config.gamma * (context.fisher_grad @ change)
                 + 0.5 * (projected @ projected) / context.fisher_g.shape[0])


def initial_state(tasks: list[TensorTask], config: ICBSConfig) -> ICBSState:
    """The state before any round: initial masks, no tabu memory, the initial surrogate."""
    contexts = [_prepare(task, config) for task in tasks]
    return _initial_state(contexts, config)


def _initial_state(contexts: list[_Context], config: ICBSConfig) -> ICBSState:
    state = ICBSState(masks={}, frozen={}, last_visit={}, visits={})
    for context in contexts:
        name = context.task.name
        state.masks[name] = context.task.mask.clone()
        state.frozen[name] = _frozen_mask(context, config)
        state.last_visit[name] = torch.full(context.task.mask.shape, _NEVER, dtype=torch.int32)
        state.visits[name] = torch.zeros(context.lines, dtype=torch.int32)
        state.counters[name] = dict.fromkeys(_COUNTERS, 0)
        state.surrogate_per_tensor[name] = _surrogate(context, state.masks[name], config)
    state.initial_surrogate = state.surrogate
    return state


# ---------------------------------------------------------------------- schedule
def _plan(contexts: list[_Context], config: ICBSConfig, epoch: int) -> list[tuple[int, int]]:
    """The epoch's steps as (tensor index, line): a full sweep, or steps ∝ log10(size)."""
    couples_tensor = config.objective != "layerwise"
    if config.steps_per_epoch is None:
        passes = [_passes(context, config) for context in contexts]
        per_tensor = [list(range(context.lines)) * count for context, count in zip(contexts, passes)]
        if not couples_tensor and not any(context.by_column for context in contexts):
            # pass by pass: every line once, then the lines of wide tensors again
            return [(t, line) for repeat in range(max(passes)) for t, context in enumerate(contexts)
                    if repeat < passes[t] for line in range(context.lines)]
        steps = []  # interleave tensors so consecutive steps rarely conflict
        for position in range(max(len(lines) for lines in per_tensor)):
            steps.extend((t, lines[position]) for t, lines in enumerate(per_tensor) if position < len(lines))
        return steps
    sizes = [math.log10(max(10, context.task.weight.numel())) for context in contexts]
    share = [max(1, int(round(config.steps_per_epoch * size / sum(sizes)))) for size in sizes]
    steps = []
    for t, (context, count) in enumerate(zip(contexts, share)):
        generator = _generator(config.seed, "lines", context.task.name, epoch)
        lines = torch.cat([torch.randperm(context.lines, generator=generator)
                           for _ in range(-(-count // context.lines))])[:count]
        steps.extend((t, int(line)) for line in lines)
    order = torch.randperm(len(steps), generator=_generator(config.seed, "order", epoch))
    return [steps[int(i)] for i in order]


def _passes(context: _Context, config: ICBSConfig) -> int:
    """Blocks per line in a full sweep: enough to put ``coverage`` of each line's weights in blocks."""
    length = context.rank.shape[1]
    return max(1, int(round(config.coverage * length / context.block)))


def _round_limit(config: ICBSConfig) -> int:
    if config.round_blocks is not None:
        return config.round_blocks
    return max(1, ROUND_BYTES // (4 * config.block_size * config.block_size))


def _next_round(plan: list[tuple[int, int]], cursor: int, contexts: list[_Context], config: ICBSConfig) -> int:
    """End of the round that starts at ``cursor``: consecutive steps while they stay independent."""
    limit = _round_limit(config)
    couples_tensor = config.objective != "layerwise"
    taken: set[tuple[int, int]] = set()
    per_tensor: dict[int, int] = {}
    end = cursor
    while end < len(plan) and end - cursor < limit:
        t, line = plan[end]
        context = contexts[t]
        if couples_tensor:
            cap = 1
        elif context.by_column:
            cap = max(1, context.task.weight.shape[0] // context.block)
        else:
            cap = context.lines
        if (t, line) in taken or per_tensor.get(t, 0) >= cap:
            break
        taken.add((t, line))
        per_tensor[t] = per_tensor.get(t, 0) + 1
        end += 1
    return end


# ---------------------------------------------------------------------- block selection
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


@dataclass
class _Pending:
    """Blocks of one tensor in a round: where they are and their problems."""

    tensor: int
    rows: Tensor  # (n,) or (n, B)
    cols: Tensor  # (n, B)
    lines: Tensor  # (n,) line index of each block (for tabu bookkeeping)
    problems: list[BlockProblem]
    stacked: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # layer-wise (Q, x0, offsets)
    groups: np.ndarray | None = None  # (B,) N:M group labels of every block, if any


def _build_tensor_blocks(context: _Context, state: ICBSState, lines: Tensor, config: ICBSConfig,
                         round_index: int, buffer: MatrixStack | None = None) -> _Pending | None:
    task = context.task
    name = task.name
    mask = state.masks[name]
    pruned = context.line_view(mask)[lines]
    tabu_since = state.visits[name][lines].to(torch.int64) - config.tabu_size
    tabu = context.line_view(state.last_visit[name])[lines].to(torch.int64) >= tabu_since[:, None]
    if config.selection == "random":
        priority = torch.rand(pruned.shape, generator=_generator(config.seed, "select", name, round_index),
                              dtype=torch.float64)
    else:
        priority = context.rank[lines]
    pattern = task.sparsity.pattern
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
        rows, cols = positions, lines[:, None].expand_as(positions)
    else:
        rows, cols = lines, positions
    ids = [f"{name}:{int(line)}:{round_index}" for line in lines]
    labels = None if groups is None else groups.numpy()
    if config.objective == "layerwise":
        if context.row_error is None:  # resumed run: the cache starts from the saved mask
            context.row_error = row_errors(context.weight, context.gram, mask)
        out = None if buffer is None else buffer.take(cols.shape[0], cols.shape[1])
        stacked = layerwise_arrays(context.weight, context.gram, mask, rows, cols, gram_is_symmetric=True,
                                   row_error=context.row_error, out=out)
        problems = problems_from_arrays(*stacked, ids, labels)
        return _Pending(tensor=-1, rows=rows, cols=cols, lines=lines, problems=problems, stacked=stacked,
                        groups=labels)
    problems = _fisher_problems(context, mask, rows, cols, groups, ids, config)
    return _Pending(tensor=-1, rows=rows, cols=cols, lines=lines, problems=problems, groups=labels)


def _row_split(context: _Context, columns: Tensor, config: ICBSConfig, round_index: int) -> Tensor:
    """Column blocks of one round get disjoint random row sets (so they stay independent)."""
    out = context.task.weight.shape[0]
    order = torch.randperm(out, generator=_generator(config.seed, "rows", context.task.name, round_index))
    owner = torch.empty(out, dtype=torch.int64)
    owner[order] = torch.arange(out) % len(columns)
    return owner[None, :] == torch.arange(len(columns))[:, None]


def _fisher_problems(context: _Context, mask: Tensor, rows: Tensor, cols: Tensor, groups: Tensor | None,
                     ids: list[str], config: ICBSConfig) -> list[BlockProblem]:
    """Fisher (or layerwise+fisher) blocks; the gradient is the model's at the current weights."""
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


# ---------------------------------------------------------------------- the loop
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
    contexts = [_prepare(task, config) for task in tasks]
    if state is None:
        state = _initial_state(contexts, config)
    elif set(state.masks) != set(names):
        raise UsageError("the saved iCBS state is for other tensors than the ones given")
    started = time.perf_counter() - state.seconds
    while state.epoch < config.epochs:
        plan = _plan(contexts, config, state.epoch)
        while state.cursor < len(plan):
            if should_stop is not None and should_stop():
                state.seconds = time.perf_counter() - started
                return state
            end = _next_round(plan, state.cursor, contexts, config)
            report = _run_round(contexts, state, plan[state.cursor:end], config, queue, job_id)
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


def _run_round(contexts: list[_Context], state: ICBSState, steps: list[tuple[int, int]], config: ICBSConfig,
               queue: Queue, job_id: str) -> RoundReport:
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
        built = _build_tensor_blocks(contexts[t], state, torch.tensor(lines, dtype=torch.int64), config, round_index,
                                     buffer)
        if built is not None and built.problems:
            built.tensor = t
            pending.append(built)
    problems = [problem for item in pending for problem in item.problems]
    solve_start = time.perf_counter()
    if problems:
        params = {**config.params(), "seed": _round_seed(config.seed, round_index)}
        result = queue.run_round(RoundRequest(job_id, f"r{round_index}", problems, config.solver, params))
        solutions = list(result.solutions)
        if len(solutions) != len(problems):
            raise RuntimeError(f"queue returned {len(solutions)} answers for {len(problems)} blocks")
    else:
        solutions = []
    merge_start = time.perf_counter()
    totals = dict.fromkeys(_COUNTERS, 0)
    offset = 0
    for item in pending:
        context = contexts[item.tensor]
        name = context.task.name
        answers = solutions[offset:offset + len(item.problems)]
        offset += len(item.problems)
        outcomes, proposals, energies = _judge_all(item, answers)
        for outcome in _COUNTERS:
            count = int((outcomes == _COUNTERS.index(outcome)).sum())
            state.counters[name][outcome] += count
            totals[outcome] += count
        _record_visits(context, state, item)
        accepted_blocks = np.nonzero(outcomes == _ACCEPTED)[0]
        if accepted_blocks.size:
            chosen = torch.as_tensor(accepted_blocks, dtype=torch.int64)
            values = torch.as_tensor(proposals[accepted_blocks]).to(torch.bool)
            block_rows = item.rows[chosen]
            rows = block_rows if block_rows.ndim == 2 else block_rows[:, None].expand_as(values)
            state.masks[name][rows, item.cols[chosen]] = values
            if item.stacked is not None and block_rows.ndim == 1 and context.row_error is not None:
                # a one-row layer-wise block's energy IS that row's new error: no recomputation
                context.row_error[block_rows] = torch.as_tensor(energies[accepted_blocks])
                state.surrogate_per_tensor[name] = _surrogate(context, state.masks[name], config, rows[:0, 0])
            elif item.stacked is not None and context.row_error is not None:
                # blocks over several rows: each row's share of the energy change, from Q itself
                context.row_error.index_add_(0, rows.reshape(-1), _row_shares(item, accepted_blocks, proposals,
                                                                               rows).reshape(-1))
                state.surrogate_per_tensor[name] = _surrogate(context, state.masks[name], config, rows[:0, 0])
            else:
                state.surrogate_per_tensor[name] = _surrogate(context, state.masks[name], config, rows.unique())
    done = time.perf_counter()
    return RoundReport(
        round_index=round_index, epoch=state.epoch, blocks=len(problems), surrogate=state.surrogate,
        build_seconds=solve_start - build_start, solve_seconds=merge_start - solve_start,
        merge_seconds=done - merge_start, **totals,
    )


_ACCEPTED, _UNCHANGED, _REJECTED, _FAILED = range(4)  # indices into _COUNTERS


def _judge_all(item: _Pending, answers: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§3.4 for every block of a tensor: accept only a feasible answer whose energy, recomputed
    from the problem itself, is below the current assignment's. Returns (outcome codes, the
    assignments to apply, their energies).

    Layer-wise blocks are judged together from their stacked matrices (the same float64
    value as ``problem.energy``); other blocks one by one with ``problem.energies``.
    """
    n_blocks = len(item.problems)
    x0 = np.stack([problem.x0 for problem in item.problems]) if item.stacked is None else item.stacked[1]
    outcomes = np.full(n_blocks, _FAILED, np.int64)
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
    outcomes[feasible & same] = _UNCHANGED
    moved = feasible & ~same
    outcomes[moved & (proposed < current)] = _ACCEPTED
    outcomes[moved & (proposed == current)] = _UNCHANGED
    outcomes[moved & (proposed > current)] = _REJECTED
    proposals[outcomes != _ACCEPTED] = x0[outcomes != _ACCEPTED]
    return outcomes, proposals, proposed


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


def _group_counts(X: np.ndarray, item: _Pending) -> np.ndarray:
    """Ones per constraint group of every block: (n, 1) totals, or (n, G) with N:M groups."""
    if item.groups is None:
        return X.sum(axis=1, dtype=np.int64)[:, None]
    n_groups = int(item.groups.max()) + 1
    return X.reshape(X.shape[0], n_groups, -1).sum(axis=2, dtype=np.int64)


def _record_visits(context: _Context, state: ICBSState, item: _Pending) -> None:
    """Tabu memory: the block's weights remember the line's block number; the line counts one more."""
    name = context.task.name
    visits = state.visits[name]
    numbers = visits[item.lines].to(torch.int32)
    rows = item.rows if item.rows.ndim == 2 else item.rows[:, None].expand_as(item.cols)
    state.last_visit[name][rows, item.cols] = numbers[:, None].expand_as(item.cols)
    visits[item.lines] += 1


__all__ = [
    "FisherTerms", "ICBSConfig", "ICBSState", "RoundReport",
    "TensorTask", "dense_error", "initial_state", "layer_error", "relative_layer_error", "run_icbs",
]

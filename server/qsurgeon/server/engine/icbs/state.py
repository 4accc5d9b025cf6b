"""What the iCBS loop reads and keeps: the tensors handed in, the resumable state, round reports.

:class:`ICBSState` is everything a resumed run needs (docs/icbs.md §6): it is saved after
every round as tensors plus a JSON dict, so it holds only plain values. What can be
derived again from the tasks (float64 copies, score ranks, the row-error cache) lives in
:class:`TensorContext` and is rebuilt on resume instead of being saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qsurgeon.client.errors import UsageError
from qsurgeon.server.engine.options import ICBSConfig
from qsurgeon.server.pruning.masks import check_mask
from qsurgeon.server.pruning.qubo import symmetric_gram
from qsurgeon.server.pruning.sparsity import Sparsity

#: how a block's answer was judged (§3.4); an outcome code is its index here
COUNTERS = ("accepted", "unchanged", "rejected", "failed")
ACCEPTED, UNCHANGED, REJECTED, FAILED = range(len(COUNTERS))
NEVER = -(1 << 30)  # last_visit of a weight that was never in a block
#: the per-tensor tensors of the state, each saved under "<group>/<tensor name>"
_TENSOR_GROUPS = ("masks", "frozen", "last_visit", "visits")


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
    weight: Tensor  # (out, in) ORIGINAL weights w0 (--search-on refit: the refit values ũ, with linear/constant)
    mask: Tensor  # (out, in) bool, True = pruned: the initial mask (exact density)
    scores: Tensor  # (out, in) selection scores (higher = keep)
    sparsity: Sparsity
    gram: Tensor | None = None  # (in, in) float64, H = A Aᵀ over calibration tokens
    fisher: FisherTerms | None = None
    # layerwise only: a per-entry linear term (out, in) and per-row constant (out,) of each row's
    # error, for a target other than ``weight`` (``--search-on refit``; pruning/qubo.row_errors)
    linear: Tensor | None = None
    constant: Tensor | None = None


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
        for group in _TENSOR_GROUPS:
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
            groups = {group: {name: tensors[f"{group}/{name}"] for name in names} for group in _TENSOR_GROUPS}
        except KeyError as missing:
            raise UsageError(f"iCBS checkpoint lacks tensor {missing}") from None
        return cls(
            **groups, round_index=int(meta["round_index"]), epoch=int(meta["epoch"]), cursor=int(meta["cursor"]),
            counters={k: dict(v) for k, v in meta["counters"].items()},
            surrogate_per_tensor={k: float(v) for k, v in meta["surrogate_per_tensor"].items()},
            initial_surrogate=float(meta["initial_surrogate"]), history_round=list(meta["history_round"]),
            history_epoch=list(meta["history_epoch"]), seconds=float(meta["seconds"]), done=bool(meta["done"]),
        )


@dataclass
class TensorContext:
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


def prepare_tensor(task: TensorTask, config: ICBSConfig) -> TensorContext:
    """Check ``task`` against the objective and derive its :class:`TensorContext`."""
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
    context = TensorContext(task=task, weight=weight.to(torch.float64),
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


__all__ = [
    "ACCEPTED", "COUNTERS", "FAILED", "FisherTerms", "ICBSState", "NEVER", "REJECTED", "RoundReport",
    "TensorContext", "TensorTask", "UNCHANGED", "prepare_tensor",
]

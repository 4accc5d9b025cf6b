"""Pruning methods: what prunes one transformer block's tensors, by name (``--method``).

A method is a function of a :class:`BlockContext` (the block's weights, the Gram of
their inputs, the options, the queue) returning a :class:`BlockOutcome` (masks, and new
weights where it changed kept ones). :data:`METHODS` maps the names of
:data:`qsurgeon.client.options.Method` to them; another method is one line there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.options import icbs_config
from qsurgeon.server.engine.report import PhaseTimer
from qsurgeon.server.models.base import TargetLayer
from qsurgeon.server.models.capture import LayerStats
from qsurgeon.server.pruning.masks import initial_mask, score_weights
from qsurgeon.server.pruning.sparsity import Sparsity
from qsurgeon.worker.queue.base import Queue

#: receives the run's event dicts (``start``, ``block``, ``round``, ``block_done``, ``done``)
Progress = Callable[[dict[str, Any]], None]


@dataclass
class BlockContext:
    """Everything a pruning method sees for one transformer block."""

    index: int
    targets: list[TargetLayer]
    weights0: dict[str, torch.Tensor]  # parameter name -> original (out, in) weight (a copy)
    stats: dict[str, LayerStats]  # parameter name -> Gram of its inputs
    sparsity: Sparsity
    options: PruneOptions
    queue: Queue
    should_stop: Callable[[], bool]
    progress: Progress
    timings: dict[str, float]
    resume: dict[str, Any] | None = None  # saved in-block state (iCBS) to continue from
    gradients: Callable[[], dict[str, torch.Tensor]] | None = None  # per-sample grads at the current weights
    save_state: Callable[[dict[str, Any]], None] = lambda state: None
    info: dict[str, Any] = field(default_factory=dict)  # per-block facts for the report
    block: Any = None  # the transformer block module (the block-output objective runs it)
    inputs: Any = None  # its calibration inputs (BlockInputs), those the Grams came from


@dataclass
class BlockOutcome:
    """A method's answer: masks (True = pruned), and new weights where it changed kept ones."""

    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    initial: dict[str, torch.Tensor] | None = None  # the one-shot masks a search started from
    initial_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # their refit, where already computed
    refitted: bool = False  # ``weights`` already hold the --refit weights of ``masks``


PruneMethod = Callable[[BlockContext], BlockOutcome]


def initial_masks(context: BlockContext, score: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scores and one-shot masks (docs/icbs.md §2) for every tensor of the block."""
    score = score or context.options.init
    if score == "sparsegpt":  # SparseGPT's masks, Wanda's scores to pick iCBS blocks (sparsegpt.py)
        from qsurgeon.server.pruning.sparsegpt import sparsegpt_initial_masks

        return sparsegpt_initial_masks(context.weights0, {n: s.gram for n, s in context.stats.items()},
                                       context.sparsity, context.options.damp)
    if score == "alps":  # ALPS's masks (alps.py), Wanda's scores to pick iCBS blocks
        masks = {name: alps_outcome(context, name, refit=False)[1] for name in context.weights0}
        scores = {name: score_weights(weight0, "wanda", input_norms=context.stats[name].input_norms().float())
                  for name, weight0 in context.weights0.items()}
        return scores, masks
    scores, masks = {}, {}
    mean_gradients: dict[str, torch.Tensor] = {}
    if score == "gradient":
        if context.gradients is None:
            raise UsageError("init 'gradient' needs a model with a loss (a causal LM or a module with loss_fn)")
        mean_gradients = {name: grads.mean(dim=0) for name, grads in context.gradients().items()}
    for name, weight0 in context.weights0.items():
        norms = context.stats[name].input_norms().float() if score == "wanda" else None
        scores[name] = score_weights(weight0, score, input_norms=norms, gradient=mean_gradients.get(name),
                                     seed=context.options.seed)
        masks[name] = initial_mask(scores[name], context.sparsity)
    return scores, masks


def fisher_terms(context: BlockContext, masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Per-sample gradients at the reference weights w0∘(1 − initial mask) of this block (docs/icbs.md §4)."""
    from qsurgeon.server.engine.icbs import FisherTerms

    if context.gradients is None:
        raise UsageError("this model has no loss for the fisher objective")
    try:
        for layer in context.targets:
            layer.apply_mask(masks[layer.parameter_name])
        gradients = context.gradients()
    finally:
        for layer in context.targets:
            layer.set_weight(context.weights0[layer.parameter_name])
    return {name: FisherTerms(per_sample_grads=grads, grad=grads.mean(dim=0)) for name, grads in gradients.items()}


def _one_shot(score: str) -> PruneMethod:
    def method(context: BlockContext) -> BlockOutcome:
        with PhaseTimer(context.timings, "init"):
            _, masks = initial_masks(context, score)
        return BlockOutcome(masks)

    method.__doc__ = f"One-shot {score} pruning (docs/icbs.md §2): the lowest scores of every group."
    return method


def icbs_method(context: BlockContext) -> BlockOutcome:
    """iCBS (docs/icbs.md §3–§6) on the block's tensors, starting from the ``--init`` mask."""
    from qsurgeon.server.engine.icbs import ICBSState, TensorTask, run_icbs

    options = context.options
    with PhaseTimer(context.timings, "init"):
        scores, masks = initial_masks(context)
        fisher = fisher_terms(context, masks) if options.objective != "layerwise" else {}
    terms: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {
        name: (weight0, None, None, None) for name, weight0 in context.weights0.items()}
    if options.search_on == "refit":  # score masks with the initial mask's refit weights (refit.py)
        from qsurgeon.server.pruning.refit import refit_search_terms

        with PhaseTimer(context.timings, "init"):
            terms = {name: refit_search_terms(context.weights0[name], context.stats[name].gram, masks[name],
                                              options.damp) for name in context.weights0}
    tasks = [
        TensorTask(name=name, weight=terms[name][0], mask=masks[name], scores=scores[name],
                   sparsity=context.sparsity, gram=context.stats[name].gram, fisher=fisher.get(name),
                   linear=terms[name][1], constant=terms[name][2])
        for name in context.weights0
    ]
    config = icbs_config(options)
    state = None
    if context.resume is not None:
        state = ICBSState.from_dict(context.resume["tensors"], context.resume["meta"])

    def on_round(current: "ICBSState", report: Any) -> None:
        tensors, meta = current.to_dict()
        context.save_state({"tensors": tensors, "meta": meta})
        context.progress({
            "event": "round", "block": context.index, "epoch": report.epoch + 1, "epochs": options.epochs,
            "round": report.round_index + 1, "blocks": report.blocks, "accepted": report.accepted,
            "energy": report.surrogate, "initial_energy": current.initial_surrogate,
        })

    with PhaseTimer(context.timings, "icbs"):
        state = run_icbs(tasks, config, context.queue, state=state, on_round=on_round,
                         should_stop=context.should_stop, job_id=f"block{context.index}")
    totals: dict[str, int] = {}
    for counters in state.counters.values():
        for key, count in counters.items():
            totals[key] = totals.get(key, 0) + int(count)
    context.info.update({
        "icbs_blocks": totals,
        "icbs_rounds": state.round_index,
        "icbs_completed": state.done,
        "surrogate_initial": state.initial_surrogate,
        "surrogate_per_epoch": list(state.history_epoch),
        "surrogate_final": state.surrogate,
        "icbs_counters": {name: dict(c) for name, c in state.counters.items()},
    })
    outcome = BlockOutcome({name: state.masks[name].clone() for name in context.weights0}, initial=masks,
                           initial_weights={name: refit for name, (*_, refit) in terms.items()
                                            if refit is not None and options.refit})
    block_output = options.block_output and context.block is not None and context.inputs is not None
    if options.keep_better or block_output:
        with PhaseTimer(context.timings, "icbs"):
            outcome = _keep_better(context, outcome, block_output)
    return outcome


def _keep_better(context: BlockContext, outcome: BlockOutcome, block_output: bool) -> BlockOutcome:
    """``--keep-better`` and ``--block-output``: per tensor (``--keep-better``: per row where the density
    holds per row), iCBS's result or the initial method's, whichever the judge prefers
    (engine/icbs/block_output.py). Each candidate carries the weights the run gives its mask:
    with ``--refit`` its refit, which for ``--init alps`` is exactly ALPS's own result; the chosen
    weights are then kept. ``--keep-better`` judges by each tensor's calibration layer error;
    ``--block-output`` by the block's output error, choosing between the (guarded) iCBS result
    and the initial one."""
    from qsurgeon.server.engine.icbs.block_output import (BlockOutputError, LayerError, choose_by_block_output,
                                                          choose_rows)
    from qsurgeon.server.pruning.refit import refit_rows

    options = context.options
    layers = {layer.parameter_name: layer for layer in context.targets}

    def weight_of(name: str, mask: torch.Tensor) -> torch.Tensor:
        if options.refit:
            return refit_rows(context.weights0[name], context.stats[name].gram, mask, options.damp)
        return context.weights0[name] * ~mask

    candidates: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    same_outside: dict[str, torch.Tensor] = {}  # rows in which iCBS's weights differ from the initial ones
    for name in context.weights0:
        searched = outcome.masks[name]
        first = outcome.initial[name] if outcome.initial is not None else searched
        known = outcome.initial_weights.get(name)  # the initial mask's refit, when the search computed it
        if torch.equal(first, searched):
            candidates[name] = [(searched, known if known is not None else weight_of(name, searched))]
        elif known is not None and options.refit:  # rows refit independently: refit only the rows the search changed
            changed = (first != searched).any(dim=1)
            weight = known.clone()
            weight[changed] = refit_rows(context.weights0[name][changed], context.stats[name].gram,
                                         searched[changed], options.damp)
            candidates[name] = [(searched, weight), (first, known)]
            same_outside[name] = changed
        else:
            candidates[name] = [(searched, weight_of(name, searched)),
                                (first, known if known is not None else weight_of(name, first))]
    if options.keep_better:
        judge = LayerError(context.weights0, {name: context.stats[name].gram for name in context.weights0})
        per_row = context.sparsity.granularity == "row"  # N:M patterns are row-wise too
        facts: dict[str, dict[str, Any]] = {}
        guarded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, options_of in candidates.items():
            if name in same_outside:  # the initial candidate's rows once, iCBS's only where they changed
                judge.rows(name, options_of[0][1], like=(options_of[1][1], same_outside[name]))
            errors = [judge.tensor(name, weight) for _, weight in options_of]
            if len(options_of) == 1:
                guarded[name], rows_initial = options_of[0], 0
            elif per_row:
                mask, weight, index = choose_rows(judge, name, options_of)
                guarded[name], rows_initial = (mask, weight), int((index == 1).sum())
            else:
                best = min(range(len(options_of)), key=lambda i: (errors[i], i))
                guarded[name], rows_initial = options_of[best], options_of[0][0].shape[0] * best
            facts[name] = {"by": "row" if per_row else "tensor", "error_icbs": errors[0],
                           "error_initial": errors[-1], "error_final": judge.tensor(name, guarded[name][1]),
                           "rows_initial": rows_initial, "rows": int(options_of[0][0].shape[0])}
        context.info["keep_better"] = facts
        for name, chosen in guarded.items():  # the guarded result first, the initial one the alternative
            first = candidates[name][-1]
            candidates[name] = [chosen] if chosen is first or torch.equal(chosen[0], first[0]) else [chosen, first]
    if block_output:
        error = BlockOutputError(context.block, context.inputs, context.weights0,
                                 lambda name, weight: layers[name].set_weight(weight))
        choice, history = choose_by_block_output(error, list(context.weights0), candidates)
        context.info.update({
            "block_output_error_icbs": history[0],
            "block_output_error_final": min(history),
            "block_output_initial_masks": sorted(name for name, index in choice.items() if index == 1),
        })
    else:
        choice = {name: 0 for name in candidates}
    return BlockOutcome(masks={name: candidates[name][index][0] for name, index in choice.items()},
                        weights={name: candidates[name][index][1] for name, index in choice.items()}
                        if options.refit else {},
                        initial=outcome.initial, refitted=options.refit)


def sparsegpt_method(context: BlockContext) -> BlockOutcome:
    """SparseGPT (OBS mask selection with weight updates) on every tensor of the block."""
    from qsurgeon.server.pruning.sparsegpt import sparsegpt_prune

    outcome = BlockOutcome(masks={})
    with PhaseTimer(context.timings, "init"):
        for name, weight0 in context.weights0.items():
            weight, mask = sparsegpt_prune(weight0, context.stats[name].gram, context.sparsity,
                                           damp=max(context.options.damp, 1e-6))
            outcome.masks[name], outcome.weights[name] = mask, weight
    return outcome


def alps_outcome(context: BlockContext, name: str, refit: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ALPS for one tensor of the block (ADMM, then the refit on its support): ``(weight, mask)``.
    ``--method alps`` keeps both; ``--init alps`` uses the mask."""
    from qsurgeon.server.pruning.alps import alps_prune

    return alps_prune(context.weights0[name], context.stats[name].gram, context.sparsity,
                      damp=max(context.options.damp, 1e-6), refit=refit)


def alps_method(context: BlockContext) -> BlockOutcome:
    """ALPS (ADMM on the ℓ0-constrained layer reconstruction, then a PCG refit on the support;
    pruning/alps.py) on every tensor of the block."""
    outcome = BlockOutcome(masks={})
    with PhaseTimer(context.timings, "init"):
        for name in context.weights0:
            outcome.weights[name], outcome.masks[name] = alps_outcome(context, name)
    return outcome


#: method name -> per-block pruning function; the names are :data:`qsurgeon.client.options.Method`'s
METHODS: dict[str, PruneMethod] = {
    "icbs": icbs_method,
    "wanda": _one_shot("wanda"),
    "magnitude": _one_shot("magnitude"),
    "sparsegpt": sparsegpt_method,
    "alps": alps_method,
}


__all__ = [
    "BlockContext", "BlockOutcome", "METHODS", "Progress", "PruneMethod", "alps_method", "fisher_terms",
    "icbs_method", "initial_masks", "sparsegpt_method",
]

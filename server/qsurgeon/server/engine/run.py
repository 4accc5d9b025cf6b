"""The pruning pipeline: options in, pruned model out. One function for every caller.

:func:`run_prune` is what ``qsurgeon prune`` calls in-process and what the service runs
inside a job; only the :class:`Queue` differs (in-process vs Redis). Its steps:

1. load the model (safetensors only) and the calibration data;
2. for each transformer block, in order: capture the inputs of its linears from the
   model whose earlier blocks are already pruned, accumulate the Gram ``H = A Aᵀ``, and
   prune the block's tensors with the chosen method (a registry: ``magnitude``,
   ``wanda``, ``icbs``, ``sparsegpt``...); refit kept weights if asked; apply; save a
   checkpoint;
3. write the pruned model folder, the masks and ``report.json`` atomically.

Resuming: a :class:`Checkpoint` is saved after every iCBS round and after every block.
On resume, finished blocks get their saved masks (and weights) back while the capture
re-runs through them, and the unfinished block continues from its saved ``ICBSState``.
Everything is deterministic for a seed, so the masks equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.options import check_engine_options, icbs_config, sparsity_of
from qsurgeon.server.models.base import ModelAdapter, TargetLayer
from qsurgeon.server.models.loading import load_adapter
from qsurgeon.server.models.calibration import CalibrationData, load_calibration
from qsurgeon.server.models.capture import LayerStats, capture_first_block_inputs, collect_stats, run_block
from qsurgeon.server.pruning.masks import check_mask, initial_mask, score_weights
from qsurgeon.server.pruning.refit import refit_rows
from qsurgeon.server.pruning.sparsity import Sparsity
from qsurgeon.worker.queue.base import Queue
from qsurgeon.worker.queue.inprocess import InProcessQueue
from qsurgeon.worker.queue.export import ExportingQueue

#: report phases, in order; each gets its seconds in ``report["seconds"]``
PHASES: tuple[str, ...] = ("load", "calibrate", "init", "icbs", "refit", "save")

Progress = Callable[[dict[str, Any]], None]


# ====================================================================== checkpoints
class Checkpoint(Protocol):
    """Where a run keeps its resumable state: ``load()`` gives the last ``save(state)`` or None."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


class DirectoryCheckpoint:
    """A checkpoint in a folder: tensors in ``state.safetensors``, the rest as JSON in its metadata.

    One file, replaced atomically (write then ``os.replace``), so a crash mid-save leaves
    the previous checkpoint intact. State values may nest dicts and lists; tensors
    anywhere in them are stored as safetensors entries.
    """

    FILE = "state.safetensors"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def save(self, state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _extract_tensors(state, "", tensors)
        partial = self.path / f".{self.FILE}.partial"
        save_file(tensors, str(partial), metadata={"state": json.dumps(skeleton)})
        os.replace(partial, self.path / self.FILE)

    def load(self) -> dict[str, Any] | None:
        from safetensors import safe_open

        file = self.path / self.FILE
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt") as handle:
                skeleton = json.loads(handle.metadata()["state"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # a corrupt or foreign file: say so instead of resuming wrongly
            raise UsageError(f"cannot read checkpoint {str(file)!r}: {error}") from None
        return _insert_tensors(skeleton, tensors)


def _extract_tensors(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "tensor"
        tensors[key] = value.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {str(k): _extract_tensors(v, f"{path}/{k}" if path else str(k), tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_extract_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _insert_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _insert_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_insert_tensors(v, tensors) for v in value]
    return value


# ====================================================================== methods
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


@dataclass
class BlockOutcome:
    """A method's answer: masks (True = pruned), and new weights where it changed kept ones."""

    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    initial: dict[str, torch.Tensor] | None = None  # the one-shot masks a search started from


PruneMethod = Callable[[BlockContext], BlockOutcome]


class _Timer:
    def __init__(self, timings: dict[str, float], phase: str):
        self.timings, self.phase = timings, phase

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *_: Any) -> None:
        self.timings[self.phase] = self.timings.get(self.phase, 0.0) + time.perf_counter() - self.start


def initial_masks(context: BlockContext, score: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scores and one-shot masks (docs/icbs.md §2) for every tensor of the block."""
    score = score or context.options.init
    if score == "sparsegpt":  # SparseGPT's masks, Wanda's scores to pick iCBS blocks (sparsegpt.py)
        from qsurgeon.server.pruning.sparsegpt import sparsegpt_initial_masks

        return sparsegpt_initial_masks(context.weights0, {n: s.gram for n, s in context.stats.items()},
                                       context.sparsity, context.options.damp)
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
        with _Timer(context.timings, "init"):
            _, masks = initial_masks(context, score)
        return BlockOutcome(masks)

    method.__doc__ = f"One-shot {score} pruning (docs/icbs.md §2): the lowest scores of every group."
    return method


def icbs_method(context: BlockContext) -> BlockOutcome:
    """iCBS (docs/icbs.md §3–§6) on the block's tensors, starting from the ``--init`` mask."""
    from qsurgeon.server.engine.icbs import ICBSState, TensorTask, run_icbs

    options = context.options
    with _Timer(context.timings, "init"):
        scores, masks = initial_masks(context)
        fisher = fisher_terms(context, masks) if options.objective != "layerwise" else {}
    tasks = [
        TensorTask(name=name, weight=context.weights0[name], mask=masks[name], scores=scores[name],
                   sparsity=context.sparsity, gram=context.stats[name].gram, fisher=fisher.get(name))
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

    with _Timer(context.timings, "icbs"):
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
    return BlockOutcome({name: state.masks[name].clone() for name in context.weights0}, initial=masks)


def sparsegpt_method(context: BlockContext) -> BlockOutcome:
    """SparseGPT (OBS mask selection with weight updates) on every tensor of the block."""
    from qsurgeon.server.pruning.sparsegpt import sparsegpt_prune

    outcome = BlockOutcome(masks={})
    with _Timer(context.timings, "init"):
        for name, weight0 in context.weights0.items():
            weight, mask = sparsegpt_prune(weight0, context.stats[name].gram, context.sparsity,
                                           damp=max(context.options.damp, 1e-6))
            outcome.masks[name], outcome.weights[name] = mask, weight
    return outcome


#: method name -> per-block pruning function; another method is one line here
METHODS: dict[str, PruneMethod] = {
    "icbs": icbs_method,
    "wanda": _one_shot("wanda"),
    "magnitude": _one_shot("magnitude"),
    "sparsegpt": sparsegpt_method,
}


# ====================================================================== results
@dataclass
class PruneResult:
    """What a run produced: the adapter holds the pruned model in memory."""

    masks: dict[str, torch.Tensor]
    report: dict[str, Any]
    adapter: ModelAdapter
    out: Path | None = None
    completed: bool = True  # False when stopped (time limit or should_stop) before iCBS finished


def _relative(error: float, reference: float) -> float:
    return error / reference if reference > 0 else 0.0


def _tensor_report(weight0: torch.Tensor, gram: torch.Tensor, initial: torch.Tensor, final: torch.Tensor,
                   weight: torch.Tensor | None) -> dict[str, Any]:
    from qsurgeon.server.models.capture import relative_error, weight_error

    error_initial, reference = relative_error(weight0, initial, gram)
    error_final, _ = relative_error(weight0, final, gram)
    entry = {
        "shape": list(weight0.shape),
        "density": 1.0 - float(final.float().mean()),
        "error_initial": _relative(error_initial, reference),
        "error_final": _relative(error_final, reference),
        "error_dense_norm": reference,
    }
    if weight is not None:
        entry["error_weights"] = _relative(weight_error(weight0, weight, gram), reference)
    return entry


# ====================================================================== the run
def _deadline_stop(options: PruneOptions, started: float, should_stop: Callable[[], bool] | None) -> Callable[[], bool]:
    def stop() -> bool:
        if should_stop is not None and should_stop():
            return True
        return options.time_limit is not None and time.perf_counter() - started >= options.time_limit

    return stop


def _check_shapes(adapter: ModelAdapter, sparsity: Sparsity) -> None:
    for layer in adapter.all_targets():
        sparsity.check_shape(layer.shape, layer.parameter_name)


def _restore_block(targets: list[TargetLayer], saved: Mapping[str, Any]) -> None:
    for layer in targets:
        name = layer.parameter_name
        if name in saved.get("weights", {}):
            layer.set_weight(saved["weights"][name])
        else:
            layer.apply_mask(saved["masks"][name])


def run_prune(options: PruneOptions, *, queue: Queue | None = None, progress: Progress | None = None,
              checkpoint: Checkpoint | None = None, should_stop: Callable[[], bool] | None = None,
              adapter: ModelAdapter | None = None, calibration: CalibrationData | None = None) -> PruneResult:
    """Prune ``options.model`` as ``options`` say; write ``options.out`` if set.

    ``queue`` carries iCBS rounds (default: in-process); ``progress`` receives event
    dicts; ``checkpoint`` makes the run resumable; ``should_stop`` is polled between
    iCBS rounds (the time limit too): a stopped run still finishes with valid masks
    (the best found so far) and reports ``completed: false``. ``adapter`` and
    ``calibration`` let Python callers bring their own model (e.g. a plain
    :class:`~qsurgeon.server.models.text.TorchModuleAdapter`) and data.
    """
    check_engine_options(options)
    sparsity = sparsity_of(options)
    if options.out is not None:
        from qsurgeon.server.engine.outputs import check_out_folder

        check_out_folder(options.out)
    emit: Progress = progress or (lambda event: None)
    started = time.perf_counter()
    cpu_started = time.process_time()  # CPU seconds of every thread: comparable on a shared machine
    stop = _deadline_stop(options, started, should_stop)
    timings = dict.fromkeys(PHASES, 0.0)
    queue = queue or InProcessQueue()
    if options.export_blocks is not None:
        queue = ExportingQueue(queue, options.export_blocks)

    with _Timer(timings, "load"):
        if adapter is None:
            adapter = load_adapter(options.model, include=options.include, exclude=options.exclude)
        _check_shapes(adapter, sparsity)
    with _Timer(timings, "calibrate"):
        if calibration is None:
            if adapter.kind == "image-classifier":  # images:DIR, npz:FILE or builtin digits (vision.py)
                from qsurgeon.server.models.vision import load_image_calibration

                calibration = load_image_calibration(options.calibration, adapter, options.samples, options.seed)
            else:
                calibration = load_calibration(options.calibration, adapter.tokenizer, options.samples, options.seq_len)
        inputs = capture_first_block_inputs(adapter, calibration, options.batch_size)

    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None and saved.get("options") != json.loads(json.dumps(options.identity())):
        raise UsageError("the checkpoint belongs to a run with other options; remove it or use the same options")
    finished: list[dict[str, Any]] = list(saved["finished"]) if saved else []
    gradient_source = _gradient_source(options, adapter, calibration)
    blocks = adapter.blocks()
    emit({"event": "start", "blocks": len(blocks), "tensors": len(adapter.all_targets()),
          "tokens": calibration.num_tokens, "resumed_blocks": len(finished)})

    masks: dict[str, torch.Tensor] = {}
    tensor_reports: dict[str, dict[str, Any]] = {}
    block_reports: list[dict[str, Any]] = []
    completed = True

    def save_checkpoint(in_block: dict[str, Any] | None) -> None:
        if checkpoint is not None:
            checkpoint.save({"options": options.identity(), "finished": finished, "in_block": in_block})

    resume_index = len(finished)  # the block that was in progress when the checkpoint was saved
    for index, block in enumerate(blocks):
        targets = adapter.targets(index)
        if index < len(finished):  # resumed: this block's result is already known
            _restore_block(targets, finished[index])
            tensor_reports.update(finished[index]["tensor_reports"])
            block_reports.append(finished[index]["info"])
            masks.update(finished[index]["masks"])
        elif targets:
            emit({"event": "block", "block": index, "blocks": len(blocks), "tensors": len(targets)})
            with _Timer(timings, "calibrate"):
                stats = collect_stats(block, targets, inputs)
            context = BlockContext(
                index=index, targets=targets,
                weights0={layer.parameter_name: layer.weight().detach().clone() for layer in targets},
                stats=stats, sparsity=sparsity, options=options, queue=queue, should_stop=stop,
                progress=emit, timings=timings,
                resume=saved["in_block"] if saved and saved.get("in_block") and index == resume_index else None,
                save_state=save_checkpoint,
                gradients=None if gradient_source is None else (lambda targets=targets: gradient_source(targets)),
            )
            outcome = METHODS[options.method](context)
            if context.info.get("icbs_completed") is False:
                completed = False
            weights = dict(outcome.weights)
            if options.refit:
                with _Timer(timings, "refit"):
                    for name, weight0 in context.weights0.items():
                        weights[name] = refit_rows(weight0, stats[name].gram, outcome.masks[name], options.damp)
            first = outcome.initial if outcome.initial is not None else outcome.masks
            block_tensors = {}
            for layer in targets:
                name = layer.parameter_name
                check_mask(outcome.masks[name], sparsity, name)
                block_tensors[name] = _tensor_report(context.weights0[name], stats[name].gram, first[name],
                                                     outcome.masks[name], weights.get(name))
                if name in weights:
                    layer.set_weight(weights[name] * ~outcome.masks[name])
                else:
                    layer.apply_mask(outcome.masks[name])
            info = {"block": index, **context.info}
            finished.append({"masks": outcome.masks, "weights": weights, "tensor_reports": block_tensors, "info": info})
            tensor_reports.update(block_tensors)
            block_reports.append(info)
            masks.update(outcome.masks)
            save_checkpoint(None)
            emit({"event": "block_done", "block": index, "blocks": len(blocks),
                  "error": sum(t["error_final"] for t in block_tensors.values()) / max(1, len(block_tensors))})
        else:  # nothing to prune here (--include/--exclude): keep the block list aligned for resumes
            finished.append({"masks": {}, "weights": {}, "tensor_reports": {}, "info": {"block": index}})
            block_reports.append({"block": index})
        if any(adapter.targets(later) for later in range(index + 1, len(blocks))):  # inputs of the next block
            with _Timer(timings, "calibrate"):
                inputs = run_block(block, inputs)
    del inputs

    report = _report(options, sparsity, calibration, tensor_reports, block_reports, timings, completed)
    out_path = None
    if options.out is not None:
        from qsurgeon.server.engine.outputs import write_result

        with _Timer(timings, "save"):
            out_path = write_result(options.out, adapter.save, masks, report)
        report["seconds"]["save"] = timings["save"]
        report["seconds"]["total"] = time.perf_counter() - started
        report["cpu_seconds"] = time.process_time() - cpu_started
        (out_path / "report.json").write_text(_report_text(report))
    report["seconds"]["total"] = time.perf_counter() - started
    report["cpu_seconds"] = time.process_time() - cpu_started
    emit({"event": "done", "seconds": report["seconds"]["total"]})
    return PruneResult(masks=masks, report=report, adapter=adapter, out=out_path, completed=completed)


def _gradient_source(options: PruneOptions, adapter: ModelAdapter,
                     calibration: CalibrationData) -> Callable[[list[TargetLayer]], dict[str, torch.Tensor]] | None:
    """How to get per-sample gradients for a block, if the options need them and the model has a loss.

    Encoders without a task head are scored by self-distillation: the distance of the
    current outputs to the dense model's, which are computed here, before any pruning.
    """
    if options.objective == "layerwise" and options.init != "gradient":
        return None
    from qsurgeon.server.models.capture import dense_outputs, per_sample_gradients

    if adapter.kind == "encoder":
        if options.init == "gradient":
            raise UsageError("init 'gradient' needs a task loss; an encoder without a head is scored by "
                             "self-distillation, whose gradient vanishes at the dense weights (use wanda)")
        targets = dense_outputs(adapter, calibration, options.batch_size)
    else:
        targets = None
    return lambda layers: per_sample_gradients(adapter, calibration, layers, distill_targets=targets)


def _report_text(report: Mapping[str, Any]) -> str:
    from qsurgeon.server.engine.outputs import report_json

    return report_json(report) + "\n"


def _report(options: PruneOptions, sparsity: Sparsity, calibration: CalibrationData,
            tensors: dict[str, dict[str, Any]], blocks: list[dict[str, Any]], timings: dict[str, float],
            completed: bool) -> dict[str, Any]:
    total_error_initial = sum(t["error_initial"] * t["error_dense_norm"] for t in tensors.values())
    total_error_final = sum(t["error_final"] * t["error_dense_norm"] for t in tensors.values())
    total_reference = sum(t["error_dense_norm"] for t in tensors.values())
    weights = sum(math.prod(t["shape"]) for t in tensors.values())
    kept = sum(t["density"] * math.prod(t["shape"]) for t in tensors.values())
    accepted: dict[str, int] = {}
    per_epoch: list[float] = []
    for block in blocks:
        for key, count in block.get("icbs_blocks", {}).items():
            accepted[key] = accepted.get(key, 0) + count
    epochs = max((len(b.get("surrogate_per_epoch", [])) for b in blocks), default=0)
    for epoch in range(epochs):
        per_epoch.append(sum(
            (b["surrogate_per_epoch"][epoch] if epoch < len(b.get("surrogate_per_epoch", []))
             else b.get("surrogate_final", 0.0)) for b in blocks if "surrogate_per_epoch" in b
        ))
    summary = {
        "tensors": len(tensors),
        "weights": weights,
        "density": kept / weights if weights else 0.0,
        "sparsity": sparsity.describe(),
        "relative_error_initial": _relative(total_error_initial, total_reference),
        "relative_error_final": _relative(total_error_final, total_reference),
        "completed": completed,
    }
    if any("error_weights" in t for t in tensors.values()):
        summary["relative_error_refit"] = _relative(
            sum(t.get("error_weights", t["error_final"]) * t["error_dense_norm"] for t in tensors.values()),
            total_reference,
        )
    return {
        "qsurgeon_report": 1,
        "options": {**options.to_dict(), "density": sparsity.density},  # every effective option; the density applied
        "calibration": {"source": calibration.source, "samples": calibration.num_samples,
                        "tokens": calibration.num_tokens},
        "summary": summary,
        "icbs": {"blocks": accepted, "surrogate_initial": sum(b.get("surrogate_initial", 0.0) for b in blocks),
                 "surrogate_per_epoch": per_epoch} if options.method == "icbs" else None,
        "tensors": tensors,
        "transformer_blocks": blocks,
        "seconds": {**{phase: timings.get(phase, 0.0) for phase in PHASES}},
    }

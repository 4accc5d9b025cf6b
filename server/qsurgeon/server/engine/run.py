"""The pruning pipeline: options in, pruned model out. One function for every caller.

:func:`run_prune` is what ``qsurgeon prune`` calls in-process and what the service runs
inside a job; only the :class:`Queue` differs (in-process vs Redis). Its steps:

1. load the model (safetensors only) and the calibration data;
2. for each transformer block, in order: capture the inputs of its linears from the
   model whose earlier blocks are already pruned, accumulate the Gram ``H = A Aᵀ``, and
   prune the block's tensors with the chosen method (:data:`~qsurgeon.server.engine.methods.METHODS`:
   ``magnitude``, ``wanda``, ``icbs``, ``sparsegpt``, ``alps``); refit kept weights if asked;
   apply; save a checkpoint. With ``--match-dense`` a second stream of inputs, the dense
   model's, runs beside the first, and the block is pruned in groups of linears that share
   an input, each towards the dense model's output (models/dense_match.py);
3. write the pruned model folder, the masks and ``report.json`` atomically.

Resuming: a :class:`~qsurgeon.server.engine.checkpoint.Checkpoint` is saved after every
iCBS round and after every block. On resume, finished blocks get their saved masks (and
weights) back while the capture re-runs through them, and the unfinished block continues
from its saved ``ICBSState``. Everything is deterministic for a seed, so the masks equal
an uninterrupted run's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import PruneOptions
from qsurgeon.server.engine.checkpoint import Checkpoint
from qsurgeon.server.engine.methods import METHODS, BlockContext, Progress
from qsurgeon.server.engine.options import check_engine_options, sparsity_of
from qsurgeon.server.engine.placement import BlockPlacement, DeviceQueue, resolve_device, solver_device, tensor_bytes
from qsurgeon.server.engine.outputs import check_out_folder, write_result
from qsurgeon.server.experiment.record import announce_export, prune_experiment
from qsurgeon.server.engine.report import PHASES, PhaseTimer, prune_report, report_text, tensor_report
from qsurgeon.server.models.base import ModelAdapter, TargetLayer
from qsurgeon.server.models.loading import load_adapter
from qsurgeon.server.models.calibration import CalibrationData, load_calibration
from qsurgeon.server.models.capture import capture_first_block_inputs, collect_stats, move_inputs, run_block
from qsurgeon.server.models.dense_match import collect_matched_stats, dense_matching_weights, input_groups
from qsurgeon.server.pruning.masks import check_mask
from qsurgeon.server.pruning.refit import refit_rows
from qsurgeon.server.pruning.sparsity import Sparsity
from qsurgeon.worker.queue.base import Queue
from qsurgeon.worker.queue.inprocess import InProcessQueue
from qsurgeon.worker.queue.export import ExportingQueue


@dataclass
class PruneResult:
    """What a run produced: the adapter holds the pruned model in memory."""

    masks: dict[str, torch.Tensor]
    report: dict[str, Any]
    adapter: ModelAdapter
    out: Path | None = None
    completed: bool = True  # False when stopped (time limit or should_stop) before iCBS finished


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
    placement = BlockPlacement(resolve_device(options.device))  # a cuda without CUDA is refused here
    on_device = None if placement.on_host else placement.device
    if options.out is not None:
        check_out_folder(options.out)
    emit: Progress = progress or (lambda event: None)
    started = time.perf_counter()
    cpu_started = time.process_time()  # CPU seconds of every thread: comparable on a shared machine
    stop = _deadline_stop(options, started, should_stop)
    timings = dict.fromkeys(PHASES, 0.0)
    queue = queue or InProcessQueue()
    if options.export_blocks is not None:
        queue = ExportingQueue(queue, options.export_blocks, sample=options.export_sample,
                               per=options.export_sample_per, seed=options.seed)
    if solver_device(options.device) is not None:
        queue = DeviceQueue(queue, solver_device(options.device))
    experiment = prune_experiment(options, emit, append=checkpoint is not None)  # experiment.jsonl
    if experiment is not None:
        queue = experiment.wrap(queue)

    with PhaseTimer(timings, "load"):
        if adapter is None:
            # on a GPU the weights keep the checkpoint's dtype (bf16/fp16): half the host memory;
            # on the CPU float32, as the recorded masks were computed
            dtype = {} if placement.on_host else {"dtype": "auto"}
            adapter = load_adapter(options.model, include=options.include, exclude=options.exclude, **dtype)
        _check_shapes(adapter, sparsity)
        announce_export(options, adapter)  # how much --export-blocks will write, before it writes
        check_fisher_memory(options, adapter)
    emit({"event": "stage", "stage": "calibrate"})  # a service job can be cancelled here, between phases
    with PhaseTimer(timings, "calibrate"):
        if calibration is None:
            if adapter.kind == "image-classifier":  # images:DIR, npz:FILE or builtin digits (vision.py)
                from qsurgeon.server.models.vision import load_image_calibration

                calibration = load_image_calibration(options.calibration, adapter, options.samples, options.seed)
            else:
                calibration = load_calibration(options.calibration, adapter.tokenizer, options.samples, options.seq_len)
        inputs = capture_first_block_inputs(adapter, calibration, options.batch_size)
        keep_on = None
        if on_device is not None:  # activations on the GPU while they fit, else in host memory
            keep_on = placement.activations_device(tensor_bytes((inputs.args, inputs.kwargs)))
            inputs = move_inputs(inputs, keep_on)
        dense_inputs = inputs if options.match_dense else None  # the dense model's stream, block by block

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

    def context_for(index: int, block: Any, inputs: Any, group: list[TargetLayer], weights0: dict[str, torch.Tensor],
                    stats: dict[str, Any], whole: bool) -> BlockContext:
        """What the method sees of one block (or of one group of its linears: ``whole`` False,
        and then an iCBS state is not saved mid-group: it could not be resumed)."""
        resume = saved["in_block"] if whole and saved and saved.get("in_block") and index == resume_index else None
        return BlockContext(
            index=index, targets=group, weights0=weights0, stats=stats, sparsity=sparsity, options=options,
            queue=queue, should_stop=stop, progress=emit, timings=timings, resume=resume,
            save_state=save_checkpoint if whole else (lambda state: None),
            gradients=None if gradient_source is None else (lambda group=group: gradient_source(group)),
            block=block, inputs=inputs,
        )

    for index, block in enumerate(blocks):
        placement.enter(block)  # one block on the device from its capture to its outputs
        targets = adapter.targets(index)
        if dense_inputs is not None and not (targets and index >= len(finished)):
            with PhaseTimer(timings, "calibrate"):  # still dense here: the dense stream's next inputs
                dense_inputs = run_block(block, dense_inputs, on_device, keep_on)
        if index < len(finished):  # resumed: this block's result is already known
            entry = finished[index]
            _restore_block(targets, entry)
        elif targets:
            emit({"event": "block", "block": index, "blocks": len(blocks), "tensors": len(targets)})
            groups = [targets]
            if dense_inputs is not None:  # pruned group by group, each fitted on inputs its predecessors shaped
                with PhaseTimer(timings, "calibrate"):
                    groups = input_groups(block, targets, inputs, on_device)
            entries, originals = [], []
            for number, group in enumerate(groups):
                with PhaseTimer(timings, "calibrate"):
                    weights0 = {layer.parameter_name: _host_copy(layer.weight(), placement) for layer in group}
                    if dense_inputs is None:
                        stats = collect_stats(block, group, inputs, on_device)
                    else:
                        stats, following = collect_matched_stats(block, group, inputs, dense_inputs, originals,
                                                                 on_device, outputs=number == len(groups) - 1)
                        originals += [(layer, layer.weight().detach().clone()) for layer in group]
                        weights0 = dense_matching_weights(weights0, stats)
                context = context_for(index, block, inputs, group, weights0, stats, whole=len(groups) == 1)
                entries.append(_prune_block(context, group, on_device))
            if dense_inputs is not None:
                dense_inputs = following
            entry = _merged(entries)
            if checkpoint is None:  # the new weights are in the model now; only a checkpoint needs copies
                entry = {**entry, "weights": {}}
            if entry["info"].get("icbs_completed") is False:
                completed = False
            finished.append(entry)
            save_checkpoint(None)
            errors = [t["error_final"] for t in entry["tensor_reports"].values()]
            emit({"event": "block_done", "block": index, "blocks": len(blocks),
                  "error": sum(errors) / max(1, len(errors))})
        else:  # nothing to prune here (--include/--exclude): keep the block list aligned for resumes
            entry = {"masks": {}, "weights": {}, "tensor_reports": {}, "info": {"block": index}}
            finished.append(entry)
        tensor_reports.update(entry["tensor_reports"])
        block_reports.append(entry["info"])
        masks.update(entry["masks"])
        if any(adapter.targets(later) for later in range(index + 1, len(blocks))):  # inputs of the next block
            with PhaseTimer(timings, "calibrate"):
                inputs = run_block(block, inputs, on_device, keep_on)
        placement.leave(block)
    del inputs

    report = prune_report(options, sparsity, calibration, tensor_reports, block_reports, timings, completed)
    report["placement"] = placement.facts()
    if experiment is not None:
        report["experiment"] = experiment.summary()
    out_path = None
    if options.out is not None:
        with PhaseTimer(timings, "save"):
            out_path = write_result(options.out, adapter.save, masks, report)
        report["seconds"]["save"] = timings["save"]
        report["seconds"]["total"] = time.perf_counter() - started
        report["cpu_seconds"] = time.process_time() - cpu_started
        (out_path / "report.json").write_text(report_text(report))
        if experiment is not None:
            experiment.finish(out_path)  # experiment.jsonl, one line per block
    report["seconds"]["total"] = time.perf_counter() - started
    report["cpu_seconds"] = time.process_time() - cpu_started
    emit({"event": "done", "seconds": report["seconds"]["total"]})
    return PruneResult(masks=masks, report=report, adapter=adapter, out=out_path, completed=completed)


def _merged(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One block's checkpoint entry from its groups' (``--match-dense`` prunes a block in groups)."""
    if len(entries) == 1:
        return entries[0]
    merged: dict[str, Any] = {"masks": {}, "weights": {}, "tensor_reports": {}, "info": {}}
    for entry in entries:
        for key in ("masks", "weights", "tensor_reports"):
            merged[key].update(entry[key])
        merged["info"] = _merged_facts(merged["info"], entry["info"])
    merged["info"]["block"] = entries[0]["info"]["block"]  # the one fact that does not add up
    merged["info"]["groups"] = [sorted(entry["masks"]) for entry in entries]
    return merged


def _merged_facts(first: Any, second: Any) -> Any:
    """Two groups' facts as one block's: counts and errors add up, flags must all hold, per-tensor dicts unite."""
    if isinstance(first, dict) and isinstance(second, dict):
        return {key: _merged_facts(first[key], second[key]) if key in first and key in second
                else first.get(key, second.get(key)) for key in {**first, **second}}
    if isinstance(first, bool) or isinstance(second, bool):
        return bool(first) and bool(second)
    if isinstance(first, (int, float)) and isinstance(second, (int, float)):
        return first + second
    if isinstance(first, list) and isinstance(second, list):
        numbers = all(isinstance(value, (int, float)) for value in first + second)
        return [a + b for a, b in zip(first, second)] if numbers and len(first) == len(second) else first + second
    return second


def _host_copy(weight: torch.Tensor, placement: BlockPlacement) -> torch.Tensor:
    """The method's copy of a weight: on the CPU a clone (as always); from a GPU block a
    float32 host copy, since the scores, the QUBO builders and the masks work on the host."""
    if placement.on_host:
        return weight.detach().clone()
    return weight.detach().to("cpu", torch.float32)


def check_fisher_memory(options: PruneOptions, adapter: ModelAdapter) -> None:
    """Refuse, with the estimate, a fisher objective whose per-sample gradients would not fit."""
    if options.method != "icbs" or (options.objective == "layerwise" and options.init != "gradient"):
        return
    from qsurgeon.server.engine.plan import available_host_bytes, fisher_block_bytes, format_bytes

    widest = max((sum(t.shape[0] * t.shape[1] for t in adapter.targets(i)) for i in range(len(adapter.blocks()))),
                 default=0)
    needed = fisher_block_bytes(options.samples, widest, options.objective != "layerwise")
    available = available_host_bytes()
    if needed > available:
        raise UsageError(f"--objective {options.objective}: the per-sample gradients of one transformer block "
                         f"need about {format_bytes(needed)} ({options.samples} samples × {widest:,} weights), "
                         f"more than the {format_bytes(available)} of memory available; use fewer --samples, "
                         "--include fewer tensors, or --objective layerwise")


def _prune_block(context: BlockContext, targets: list[TargetLayer], device: torch.device | None = None) -> dict[str, Any]:
    """Prune one transformer block with the chosen method, refit if asked, and apply the result to the model.

    Returns the block's checkpoint entry: masks, changed weights, tensor reports, facts.
    """
    options, sparsity = context.options, context.sparsity
    outcome = METHODS[options.method](context)
    weights = dict(outcome.weights)
    if options.refit and not outcome.refitted:
        with PhaseTimer(context.timings, "refit"):
            for name, weight0 in context.weights0.items():
                if device is None:
                    weights[name] = refit_rows(weight0, context.stats[name].gram, outcome.masks[name], options.damp)
                else:  # the refit's Cholesky and CG on the block's device; the result back to the host
                    weights[name] = refit_rows(weight0.to(device), context.stats[name].gram.to(device),
                                               outcome.masks[name].to(device), options.damp).cpu()
    first = outcome.initial if outcome.initial is not None else outcome.masks
    block_tensors = {}
    for layer in targets:
        name = layer.parameter_name
        check_mask(outcome.masks[name], sparsity, name)
        with PhaseTimer(context.timings, "report"):  # out × in² products per tensor: timed, on the block's device
            block_tensors[name] = tensor_report(context.weights0[name], context.stats[name].gram, first[name],
                                                outcome.masks[name], weights.get(name), device)
        if name not in weights and options.match_dense:  # the mask applies to the dense-matching target
            weights[name] = context.weights0[name] * ~outcome.masks[name]
        if name in weights:
            layer.set_weight(weights[name] * ~outcome.masks[name])
        else:
            layer.apply_mask(outcome.masks[name])
    return {"masks": outcome.masks, "weights": weights, "tensor_reports": block_tensors,
            "info": {"block": context.index, **context.info}}


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


__all__ = ["PruneResult", "run_prune"]

"""Writing a prune's results: the pruned model folder, its masks and the report.

Everything is written into a temporary folder beside ``--out`` and renamed into place
at the end, so a crash, a Ctrl-C or a full disk never leaves a half-written result that
looks finished. ``--out`` must not exist yet, or be an empty folder.

Layout of ``--out``::

    config.json, model.safetensors, tokenizer files   the pruned model (from_pretrained loads it)
    every other non-weight file of the original        e.g. sentence-transformers' modules.json, pooling
    README.md                                          model card: how it was pruned and what it measured,
                                                       then the original's card
    masks.safetensors                                  bool masks keyed by parameter name, True = pruned
    report.json                                        options, per-tensor results, timings
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from qsurgeon.client.errors import UsageError

MASKS_FILE = "masks.safetensors"
REPORT_FILE = "report.json"
CARD_FILE = "README.md"


def check_out_folder(out: str | Path) -> Path:
    """Refuse an ``--out`` that holds anything, or whose parent cannot be written: before any work."""
    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"output folder {str(path)!r} already exists and is not empty")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"the parent folder of {str(path)!r} does not exist")
    return path


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds."""
    out = check_out_folder(out)
    parent = out.absolute().parent
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_masks(masks: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: mask.to(torch.bool).contiguous().cpu() for name, mask in masks.items()}, str(path))


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (inf, nan) become null; tensors become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    return value


def report_json(report: Mapping[str, Any]) -> str:
    return json.dumps(_json_safe(dict(report)), indent=2, sort_keys=False)


def write_result(out: str | Path, save_model: Callable[[Path], None], masks: Mapping[str, torch.Tensor],
                 report: Mapping[str, Any]) -> Path:
    """Write model, masks and report into ``out`` atomically; return the final folder."""
    out = Path(out).expanduser()
    with staged_folder(out) as staging:
        save_model(staging)
        write_model_card(staging / CARD_FILE, report)
        save_masks(masks, staging / MASKS_FILE)
        (staging / REPORT_FILE).write_text(report_json(report) + "\n")
    return out


def _card_section(report: Mapping[str, Any]) -> str:
    options, summary, calibration = report["options"], report["summary"], report["calibration"]
    method = options["method"] + (f" (preset {options['preset']})" if options.get("preset") else "")
    lines = [
        "## Pruned with qsurgeon",
        "",
        f"- method: {method}" + (f", initial mask {options['init']}, {options['epochs']} epoch(s), "
                                 f"solver {options['solver']}, blocks of {options['block_size']}"
                                 if options["method"] == "icbs" else ""),
        f"- sparsity: {summary['sparsity']}; {summary['tensors']} tensors, achieved density {summary['density']:.4f}",
        f"- refit of the kept weights: {'yes' if options.get('refit') else 'no'}",
        "- layer target: " + ("the dense model's output of each layer (`--match-dense`; the errors below are "
                              "measured against it)" if options.get("match_dense") else
                              "each layer's own output on the inputs of the pruned model"),
        f"- calibration: {calibration['source']}, {calibration['samples']} samples, {calibration['tokens']} tokens",
        f"- measured (relative layer-wise reconstruction error on the calibration data, 0 = dense): "
        f"initial mask {summary['relative_error_initial']:.4f}, final mask {summary['relative_error_final']:.4f}"
        + (f", after refit {summary['relative_error_refit']:.4f}" if "relative_error_refit" in summary else ""),
        "- masks: `masks.safetensors` (True = pruned); every option and per-tensor result: `report.json`",
        "- held-out quality against the dense model: `qsurgeon evaluate DENSE THIS_FOLDER`",
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: Path, report: Mapping[str, Any]) -> None:
    """README.md: what qsurgeon did to the model, then the original card (its YAML header stays first)."""
    original = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    header, body = "", original
    if original.startswith("---\n"):
        end = original.find("\n---", 4)
        if end != -1:
            cut = original.find("\n", end + 4)
            header, body = original[: cut + 1 if cut != -1 else len(original)], original[cut + 1 if cut != -1 else len(original):]
    parts = [header + ("\n" if header else ""), _card_section(report)]
    if body.strip():
        parts += ["\n## The original model card\n\n", body.lstrip("\n")]
    path.write_text("".join(parts), encoding="utf-8")

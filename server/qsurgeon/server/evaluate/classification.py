"""Top-1/top-5 accuracy of a dense and a pruned image classifier on labelled images.

Labelled data comes as a folder ``DIR/<class name>/*.png`` (class names matched to the
model's ``id2label``: exactly, then case-insensitively, then as the class index), an
``.npz`` with ``pixel_values`` (see :func:`qsurgeon.server.models.vision.load_npz_images`) and
integer ``labels``, or ``builtin`` (the held-out split of scikit-learn's digits, for digit
classifiers). Both models see the same pixels, preprocessed with the DENSE model's
processor (the pruned folder carries a copy of it). Besides the two accuracies, the
agreement (fraction of images where both predict the same class) shows how far pruning
moved the decisions, independently of the labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from qsurgeon.client.errors import UsageError
from qsurgeon.server.models.vision import (
    ImageCalibrationData,
    builtin_digits,
    list_image_files,
    load_image_classifier,
    load_image_processor,
    load_npz_images,
    preprocess,
    read_images,
)


def match_class_names(names: list[str], id2label: Mapping[int, str]) -> dict[str, int]:
    """Map folder names to class indices; every folder must match, or UsageError names the misfits."""
    exact = {label: index for index, label in id2label.items()}
    folded = {label.casefold(): index for index, label in id2label.items()}
    mapping, unknown = {}, []
    for name in names:
        if name in exact:
            mapping[name] = exact[name]
        elif name.casefold() in folded:
            mapping[name] = folded[name.casefold()]
        elif name.isdigit() and int(name) in id2label:
            mapping[name] = int(name)
        else:
            unknown.append(name)
    if unknown:
        sample = ", ".join(sorted(id2label.values())[:8])
        raise UsageError(f"class folder(s) {', '.join(sorted(unknown))} match no label of the model (labels: {sample}...)")
    return mapping


def labelled_folder(folder: str | Path, processor: Any, num_channels: int,
                    id2label: Mapping[int, str]) -> ImageCalibrationData:
    """``DIR/<class>/*``: images with labels from their class folder's name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"evaluation folder {str(folder)!r} does not exist")
    class_dirs = sorted(path for path in folder.iterdir() if path.is_dir())
    if not class_dirs:
        raise UsageError(f"evaluation folder {str(folder)!r} has no class sub-folders (DIR/<class name>/*.png)")
    mapping = match_class_names([path.name for path in class_dirs], id2label)
    images, labels = [], []
    for class_dir in class_dirs:
        found, _ = read_images(list_image_files(class_dir))
        images.extend(found)
        labels.extend([mapping[class_dir.name]] * len(found))
    if not images:
        raise UsageError(f"evaluation folder {str(folder)!r} holds no readable image")
    pixels = preprocess(images, processor, num_channels)
    return ImageCalibrationData(pixels, torch.tensor(labels, dtype=torch.int64), source=str(folder))


def load_labelled(data: str | Path, processor: Any, num_channels: int, id2label: Mapping[int, str],
                  image_size: tuple[int, int] | None = None) -> ImageCalibrationData:
    """An npz with labels, a folder of class sub-folders, or ``builtin`` (held-out digits).

    ``builtin`` is the held-out part of scikit-learn's digits, which calibration never
    uses; it needs a model whose labels are the digits 0–9.
    """
    text = str(data)
    if text == "builtin":
        digits = [str(digit) for digit in range(10)]
        mapping = match_class_names(digits, id2label)
        heldout = builtin_digits(processor, num_channels, split="heldout")
        lookup = torch.tensor([mapping[digit] for digit in digits])
        return ImageCalibrationData(heldout.pixel_values, lookup[heldout.labels], source="builtin:digits-heldout")
    if text.startswith("npz:"):
        text = text[4:]
    elif text.startswith("images:"):
        text = text[7:]
    path = Path(text)
    if path.is_file():
        labelled = load_npz_images(path, processor, num_channels, image_size)
        if labelled.labels is None:
            raise UsageError(f"{path} has no 'labels' array: evaluation needs labelled images")
        return labelled
    return labelled_folder(path, processor, num_channels, id2label)


@torch.no_grad()
def predict_logits(model: nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Logits over all images, in batches (``.logits``: for DeiT with teacher, the two heads' mean)."""
    model.eval()
    return torch.cat([model(pixel_values=chunk).logits.float() for chunk in pixels.split(batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of images whose label is among the ``k`` highest logits."""
    top = logits.topk(k, dim=-1).indices
    return float((top == labels[:, None]).any(dim=-1).float().mean())


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    scores = {"top1": accuracy(logits, labels, 1)}
    if logits.shape[-1] >= 5:
        scores["top5"] = accuracy(logits, labels, 5)
    return scores


def compare_logits(dense: torch.Tensor, pruned: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The report for one labelled set: both models' accuracies and their agreement."""
    return {
        "task": "classification",
        "images": int(labels.shape[0]),
        "classes": int(dense.shape[-1]),
        "dense": classification_scores(dense, labels),
        "pruned": classification_scores(pruned, labels),
        "agreement": float((dense.argmax(-1) == pruned.argmax(-1)).float().mean()),
    }


def evaluate_classification(dense_dir: str | Path, pruned_dir: str | Path, data: str | Path,
                            *, batch_size: int = 64) -> dict[str, Any]:
    """Top-1 (and top-5 with ≥ 5 classes) of the dense and pruned models, and their agreement.

    ``data``: an npz with ``pixel_values`` + ``labels`` or a folder ``DIR/<class>/*``.
    Raises UsageError for unreadable models or data, or models with different label sets.
    """
    dense = load_image_classifier(dense_dir)
    pruned = load_image_classifier(pruned_dir)
    if dense.config.num_labels != pruned.config.num_labels:
        raise UsageError(f"the models have {dense.config.num_labels} and {pruned.config.num_labels} classes")
    processor = load_image_processor(dense_dir)
    id2label = {int(index): str(label) for index, label in (dense.config.id2label or {}).items()}
    size = getattr(dense.config, "image_size", None)
    image_size = (size, size) if isinstance(size, int) else None
    labelled = load_labelled(data, processor, int(getattr(dense.config, "num_channels", 3)), id2label, image_size)
    if int(labelled.labels.max()) >= dense.config.num_labels or int(labelled.labels.min()) < 0:
        raise UsageError(f"labels must lie in 0..{dense.config.num_labels - 1}")
    report = compare_logits(
        predict_logits(dense, labelled.pixel_values, batch_size),
        predict_logits(pruned, labelled.pixel_values, batch_size),
        labelled.labels,
    )
    report["data"] = labelled.source
    return report


def format_classification(report: Mapping[str, Any]) -> str:
    """Human-readable lines for ``qsurgeon evaluate --task classification``."""
    lines = [f"images               {report['images']} ({report['classes']} classes, {report.get('data', '')})"]
    for metric in ("top1", "top5"):
        if metric in report["dense"]:
            lines.append(f"{metric:<6} dense {report['dense'][metric]:.4f}  pruned {report['pruned'][metric]:.4f}")
    lines.append(f"agreement            {report['agreement']:.4f}")
    return "\n".join(lines)

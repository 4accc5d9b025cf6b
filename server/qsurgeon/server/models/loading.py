"""Choosing and loading the adapter for a model reference (``builtin:NAME`` or a folder).

This is the one module that knows every adapter kind, so it sits above them all: it
imports :mod:`.text` and :mod:`.vision`, and neither imports it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

from qsurgeon.client.errors import UsageError

from qsurgeon.server.models.base import DEFAULT_EXCLUDE, ModelAdapter
from qsurgeon.server.models.folders import is_causal_lm, model_folder, read_config
from qsurgeon.server.models.text import HFTextAdapter
from qsurgeon.server.models.vision import HFImageAdapter, is_image_classifier_config, is_image_model_folder


def model_kind(reference: str) -> str | None:
    """The kind ``reference`` loads as (``encoder``, ``causal-lm``, ``image-classifier``), from
    its config.json alone, without loading weights; None when that cannot be read (loading
    the model then says why). Presets use it: some settings differ by model kind.
    """
    try:
        config = read_config(model_folder(reference))
    except UsageError:
        return None
    if not config:
        return None
    if is_image_classifier_config(config):
        return "image-classifier"
    return "causal-lm" if is_causal_lm(SimpleNamespace(**config)) else "encoder"


def load_adapter(reference: str, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 dtype: Any = None) -> ModelAdapter:
    """The CLI's way in: a ``builtin:`` name or a local Hugging Face folder.

    ``dtype``: None loads float32 (what the CPU path computes in); ``"auto"`` keeps the
    checkpoint's dtype (bf16/fp16), as a GPU run does to halve host memory.
    """
    folder = model_folder(reference)
    extra = {} if dtype is None else {"dtype": dtype}
    if is_image_model_folder(folder):
        return HFImageAdapter.from_folder(folder, include=include, exclude=exclude, **extra)
    return HFTextAdapter.from_folder(folder, include=include, exclude=exclude, **extra)

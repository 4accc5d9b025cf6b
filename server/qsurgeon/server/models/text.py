"""Text models: Hugging Face encoders and decoders from a folder, and plain torch modules.

:class:`HFTextAdapter` covers Hugging Face encoders (BERT family) and decoders (GPT-2,
Llama, Mistral); :class:`TorchModuleAdapter` covers a plain ``torch.nn.Module`` driven
from Python with a user-supplied loss. Loading is deliberately narrow: safetensors weights
only, never ``trust_remote_code``, so a model folder cannot execute code on the machine
that prunes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from qsurgeon.client.errors import UsageError
from qsurgeon.server.models.base import DEFAULT_EXCLUDE, ModelAdapter
from qsurgeon.server.models.folders import check_model_folder, copy_companion_files, is_causal_lm

class HFTextAdapter(ModelAdapter):
    """A Hugging Face text model from a local folder: encoder (``AutoModel``) or causal LM."""

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str, include=(), exclude=DEFAULT_EXCLUDE):
        super().__init__(model, include, exclude)
        self.tokenizer = tokenizer
        self.kind = kind  # "encoder" | "causal-lm"

    @classmethod
    def from_folder(cls, folder: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE,
                    dtype: torch.dtype = torch.float32) -> "HFTextAdapter":
        folder = check_model_folder(folder)
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # our own progress goes to stderr

        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise UsageError(f"cannot read the model config in {folder}: {str(error).splitlines()[0]}") from None
        kind = "causal-lm" if is_causal_lm(config) else "encoder"
        loader = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        try:
            model = loader.from_pretrained(
                folder, config=config, use_safetensors=True, trust_remote_code=False,
                local_files_only=True, dtype=dtype,
            )
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load the model in {folder}: {str(error).splitlines()[0]}") from None
        tokenizer = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None  # pre-tokenised calibration still works without one
        if tokenizer is not None and tokenizer.pad_token is None:
            # Decoders often ship no pad token; padding positions are masked out of every
            # statistic anyway, so any id will do and eos is the conventional one.
            tokenizer.pad_token = tokenizer.eos_token
        adapter = cls(model, tokenizer, kind, include, exclude)
        adapter.source = folder
        return adapter

    def call_inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        inputs: dict[str, Any] = {"input_ids": batch["input_ids"]}
        if "attention_mask" in batch:
            inputs["attention_mask"] = batch["attention_mask"]
        if self.kind == "causal-lm":
            inputs["use_cache"] = False
        return (), inputs

    def loss(self, model_outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.kind != "causal-lm":
            return super().loss(model_outputs, batch)
        logits = model_outputs.logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        keep = batch["attention_mask"][:, 1:].bool() if "attention_mask" in batch else torch.ones_like(labels, dtype=torch.bool)
        return nn.functional.cross_entropy(logits[keep], labels[keep])

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        if self.source is not None:  # sentence-transformers modules, model card, ...
            copy_companion_files(self.source, folder)


class TorchModuleAdapter(ModelAdapter):
    """A plain ``nn.Module`` from the Python API, called as ``model(batch["input_ids"])``.

    ``input_ids`` holds whatever the module's forward takes (token ids, or float features
    with an all-ones ``attention_mask`` of the same shape: see
    :meth:`CalibrationData.from_inputs`); ``loss_fn(outputs, batch)`` gives the loss for
    gradient scores and the fisher objective.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                 include=(), exclude=DEFAULT_EXCLUDE):
        super().__init__(model, include, exclude)
        self.loss_fn = loss_fn
        self.kind = "module"

    def call_inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (batch["input_ids"],), {}

    def loss(self, model_outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_fn is None:
            return super().loss(model_outputs, batch)
        return self.loss_fn(model_outputs, batch)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.model.state_dict().items()}
        save_file(_untie(state), str(folder / "model.safetensors"))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone tensors that alias an earlier one."""
    seen: set[int] = set()
    result = {}
    for name, tensor in state.items():
        pointer = tensor.data_ptr()
        result[name] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    return result

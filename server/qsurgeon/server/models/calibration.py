"""Calibration data: the token batches whose activations define the pruning objective.

Three sources:

- a text file, one sample per line, tokenised with the model's tokenizer;
- pre-tokenised ids: an ``.npy`` (loaded with ``allow_pickle=False``) or a
  ``.safetensors`` file holding ``input_ids`` (and optionally ``attention_mask``);
- ``builtin``: real English prose that ships with every Python, the docstrings of the
  standard library. They are read with :mod:`ast` from the source files (no module is
  ever imported), in sorted file order, so the corpus is deterministic for a given
  Python. A hash of each paragraph splits it into a *calibration* part and a disjoint
  *held-out* part used by evaluations and benchmarks.

Samples shorter than ``seq_len`` are padded; the attention mask marks the padding so
every statistic can leave it out.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

from qsurgeon.client.errors import UsageError

Split = Literal["calibration", "heldout"]

#: every HELDOUT_MODULUS-th paragraph (by hash) is held out from calibration
HELDOUT_MODULUS = 5
#: directories of the standard library that hold tests, vendored wheels or third-party code
_SKIPPED_DIRECTORIES = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled",
    "turtledemo", "lib2to3", "__phello__", "config-3.11-x86_64-linux-gnu",
})
_MIN_CHARACTERS = 60
_MIN_WORDS = 8


@dataclass
class CalibrationData:
    """Token batches: ``input_ids`` and ``attention_mask`` are (samples, seq_len) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.ndim < 2 or self.input_ids.shape[:2] != self.attention_mask.shape:
            raise UsageError(
                f"calibration ids must be (samples, seq_len, ...) with a (samples, seq_len) mask, got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        if self.input_ids.shape[0] == 0:
            raise UsageError("calibration data holds no samples")

    @classmethod
    def from_inputs(cls, inputs: torch.Tensor, source: str = "tensor") -> "CalibrationData":
        """Calibration for a plain module: each row of ``inputs`` is one sample, nothing is padding."""
        if inputs.ndim < 2:
            raise UsageError(f"module inputs must be (samples, ...) with at least 2 dimensions, got {tuple(inputs.shape)}")
        return cls(inputs, torch.ones(inputs.shape[:2], dtype=torch.int64), source)

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: what every statistic is averaged over."""
        return int(self.attention_mask.sum())

    def sample_order(self, by_length: bool) -> torch.Tensor:
        """The order in which :meth:`batches` visits the samples."""
        if by_length:
            return torch.argsort(self.attention_mask.sum(dim=1), descending=True, stable=True)
        return torch.arange(self.num_samples)

    def batches(self, batch_size: int, by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Batches; trailing columns that are padding in every sample are cut off.

        Short texts padded to ``seq_len`` would otherwise cost full-length attention and
        matrix products for tokens that every statistic ignores anyway. ``by_length``
        groups samples of similar length (longest first) so that little padding is left
        at all: sums over tokens (Gram matrices) do not depend on the order, and on the
        built-in corpus it halves the tokens a forward pass computes. Without it the
        batches follow the samples' order (for per-sample outputs).
        """
        order = self.sample_order(by_length)
        for start in range(0, self.num_samples, batch_size):
            chosen = order[start:start + batch_size]
            ids = self.input_ids[chosen]
            mask = self.attention_mask[chosen]
            used = torch.nonzero(mask.any(dim=0)).reshape(-1)
            width = int(used[-1]) + 1 if used.numel() else 1
            yield {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}


# ------------------------------------------------------------------------ built-in corpus
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIPPED_DIRECTORIES and not d.startswith("."))
        files.extend(Path(directory) / name for name in sorted(names) if name.endswith(".py"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


_WHITESPACE = re.compile(r"\s+")
_PROSE = re.compile(r"^[A-Z][^\n]*[.!?]$")


def _paragraphs(docstring: str) -> Iterator[str]:
    """Prose paragraphs of a docstring: no code examples, option tables or signatures."""
    for block in re.split(r"\n\s*\n", docstring):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or any(line.startswith((">>>", "...", "$", "%", "|", "+", "--", ":", "#")) for line in lines):
            continue
        text = _WHITESPACE.sub(" ", " ".join(lines)).strip()
        if len(text) < _MIN_CHARACTERS or len(text.split()) < _MIN_WORDS or not _PROSE.match(text):
            continue
        letters = sum(character.isalpha() or character == " " for character in text)
        if letters < 0.85 * len(text):  # mostly symbols: code, paths, tables
            continue
        yield text


def _file_docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring:
                yield docstring


def split_of(text: str) -> Split:
    """Which split a paragraph belongs to: decided by its hash, so the splits never overlap."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return "heldout" if digest[0] % HELDOUT_MODULUS == 0 else "calibration"


@lru_cache(maxsize=None)
def _corpus_prefix(count: int, split: Split) -> tuple[str, ...]:
    texts: list[str] = []
    seen: set[str] = set()
    for path in _stdlib_files():
        for docstring in _file_docstrings(path):
            for paragraph in _paragraphs(docstring):
                if paragraph in seen or split_of(paragraph) != split:
                    continue
                seen.add(paragraph)
                texts.append(paragraph)
                if len(texts) >= count:
                    return tuple(texts)
    return tuple(texts)


def builtin_texts(count: int, split: Split = "calibration", offset: int = 0) -> list[str]:
    """The first ``count`` paragraphs (after ``offset``) of one split of the built-in corpus."""
    if split not in ("calibration", "heldout"):
        raise UsageError(f"split must be 'calibration' or 'heldout', got {split!r}")
    texts = _corpus_prefix(count + offset, split)[offset:]
    if len(texts) < count:
        raise UsageError(f"the built-in corpus has only {len(texts)} {split} paragraphs, asked for {count}")
    return list(texts)


# ------------------------------------------------------------------------ sources
def tokenize_texts(tokenizer: Any, texts: list[str], seq_len: int) -> CalibrationData:
    if tokenizer is None:
        raise UsageError("this model has no tokenizer: give pre-tokenised ids (.npy or .safetensors)")
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return CalibrationData(encoded["input_ids"].long(), encoded["attention_mask"].long())


def read_text_file(path: Path, samples: int) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"calibration file {str(path)!r} is not UTF-8 text") from None
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"calibration file {str(path)!r} is empty")
    return lines[:samples]


def read_token_file(path: Path, samples: int, seq_len: int, pad_id: int = 0) -> CalibrationData:
    """Pre-tokenised ids: 2-D integers; the mask comes from the file or marks every id real."""
    mask: np.ndarray | None = None
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise UsageError(f"cannot read {str(path)!r} as a plain .npy array: {error}") from None
    else:
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise UsageError(f"cannot read {str(path)!r} as safetensors: {error}") from None
        if "input_ids" not in arrays:
            raise UsageError(f"{str(path)!r} must hold a tensor named 'input_ids' (found: {', '.join(arrays)})")
        ids, mask = arrays["input_ids"], arrays.get("attention_mask")
    if ids.dtype.kind not in "iu" or ids.ndim != 2:
        raise UsageError(f"token ids must be a 2-D integer array (samples, length), got {ids.dtype} {ids.shape}")
    if ids.size == 0:
        raise UsageError(f"token file {str(path)!r} holds no ids")
    ids = ids[:samples, :seq_len]
    mask = np.ones_like(ids) if mask is None else mask[:samples, :seq_len]
    if mask.shape != ids.shape:
        raise UsageError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
    return CalibrationData(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64) != 0).long())


def load_calibration(source: str, tokenizer: Any, samples: int, seq_len: int) -> CalibrationData:
    """``builtin``, a text file, or a token file -> padded token batches."""
    if samples < 1 or seq_len < 2:
        raise UsageError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    if source.startswith(("images:", "npz:")):  # image calibration (vision.py) given to a text model
        raise UsageError(f"--calibration {source.split(':', 1)[0]}:... is image data, but the model is not an image classifier")
    if source == "builtin":
        data = tokenize_texts(tokenizer, builtin_texts(samples, "calibration"), seq_len)
        data.source = "builtin"
        return data
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"calibration file {source!r} does not exist (or use 'builtin')")
    if path.suffix in (".npy", ".safetensors"):
        data = read_token_file(path, samples, seq_len)
    else:
        data = tokenize_texts(tokenizer, read_text_file(path, samples), seq_len)
    data.source = str(path)
    return data

"""The small GPT-2-style language model the quality benchmark prunes: corpus, training, cache.

Nothing in qsurgeon depends on this model: any local Hugging Face causal-LM folder
prunes and evaluates the same way. It exists because the machines this project runs on
have no network and no pretrained causal LM, and a pruning benchmark on an untrained
model measures nothing. It lives in the package (not only in ``benchmarks/``) so that
``qsurgeon bench quality`` can train it in-process from an installed wheel.

Corpus: English prose that ships with every Debian system — the license texts under
``/usr/share/common-licenses`` and the plain-text documentation under ``/usr/share/doc``
(READMEs, Markdown, copyright files; gzipped files skipped), de-duplicated by content.
It is real, varied English and, crucially, DIFFERENT from the calibration corpus
(docstrings of the Python standard library, ``qsurgeon.server.models.calibration``), so
perplexity after pruning measures generalisation rather than memorised calibration
text. Every tenth document (by a hash of its text) is held out for perplexity.

Two recipes: :data:`FULL` (4 layers, d=128, 600 steps: about 5 minutes on 2 cores; the
model of docs/results.md) and :data:`QUICK` (2 layers, d=64, a small slice of the corpus:
seconds), which ``bench quality --quick`` trains when no model is cached. The result is
a normal HF folder (``config.json``, ``model.safetensors``, tokenizer files) plus
``heldout.txt`` and ``train_report.json``, kept in a cache folder outside the source
tree (:func:`default_cache_dir`) so an installed package never writes into itself.
Seeded; rerunning with the same corpus gives the same model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qsurgeon.client.errors import UsageError

DOC_ROOTS = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))
TEXT_NAMES = ("readme", "copyright", "news", "todo", "authors", "changes", "faq")
TEXT_SUFFIXES = (".md", ".txt", ".rst")
MAX_FILE_BYTES = 200_000
HELDOUT_EVERY = 10

#: sub-folders of the cache holding each recipe's model
LM_FOLDER = "tiny-gpt2"
QUICK_LM_FOLDER = "tiny-gpt2-quick"


@dataclass(frozen=True)
class LMRecipe:
    """Everything that decides the trained model (with the seed and the corpus)."""

    name: str
    steps: int
    max_corpus_chars: int
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    batch_size: int
    seq_len: int
    warmup: int
    max_minutes: float  # safety cap for a heavily loaded machine; the report says if it cut training short


FULL = LMRecipe("full", steps=600, max_corpus_chars=4_000_000, vocab_size=2048, n_embd=128, n_layer=4, n_head=4,
                n_inner=512, batch_size=12, seq_len=128, warmup=50, max_minutes=9.0)
#: a few seconds of training: enough that perplexity is far below the vocabulary size, so
#: pruning it changes a number that means something, but not a model to quote results of
QUICK = LMRecipe("quick", steps=150, max_corpus_chars=300_000, vocab_size=512, n_embd=64, n_layer=2, n_head=2,
                 n_inner=256, batch_size=8, seq_len=64, warmup=15, max_minutes=2.0)


def default_cache_dir() -> Path:
    """``$QSURGEON_CACHE``, else ``$XDG_CACHE_HOME/qsurgeon``, else ``~/.cache/qsurgeon``."""
    if os.environ.get("QSURGEON_CACHE"):
        return Path(os.environ["QSURGEON_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "qsurgeon"


def is_trained(folder: Path) -> bool:
    """A finished model: training writes the report last, so a cut-off run is not taken for one."""
    return (folder / "train_report.json").is_file() and (folder / "model.safetensors").is_file()


def _is_candidate(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz") or not path.is_file() or path.is_symlink():
        return False
    if path.parts[:4] == ("/", "usr", "share", "common-licenses"):
        return True
    return name.endswith(TEXT_SUFFIXES) or name.split(".")[0] in TEXT_NAMES


def collect_documents(max_chars: int = FULL.max_corpus_chars, roots: tuple[Path, ...] = DOC_ROOTS) -> list[str]:
    """The corpus, de-duplicated by content and sorted by hash (stable across runs)."""
    documents: dict[str, str] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            try:
                if not _is_candidate(path) or path.stat().st_size > MAX_FILE_BYTES:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            text = "\n".join(line.rstrip() for line in text.splitlines()).strip()
            if len(text) >= 200:
                documents.setdefault(hashlib.sha256(text.encode()).hexdigest(), text)
    ordered = [documents[key] for key in sorted(documents)]
    kept, total = [], 0
    for text in ordered:
        if total >= max_chars:
            break
        kept.append(text)
        total += len(text)
    return kept


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    """(train, heldout): every tenth document by hash of its text, so the split never shifts."""
    train, heldout = [], []
    for text in documents:
        bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY
        (heldout if bucket == 0 else train).append(text)
    return train, heldout


def build_tokenizer(train: list[str], vocab_size: int, seq_len: int) -> Any:
    """A byte-level BPE trained on the training split, wrapped as an HF fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=seq_len * 2,
    )


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts as one id stream, each ended by the end-of-text token."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def stream_perplexity(model: Any, stream: torch.Tensor, seq_len: int, max_windows: int = 200) -> float:
    """Perplexity over consecutive windows of the stream (the training report's held-out number)."""
    model.eval()
    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[:max_windows]
    total, count = 0.0, 0
    for start in range(0, len(windows), 16):
        batch = windows[start : start + 16]
        loss = model(input_ids=batch, labels=batch).loss
        total += float(loss) * batch.numel()
        count += batch.numel()
    model.train()
    return math.exp(total / count)


def train(out: Path, recipe: LMRecipe = FULL, seed: int = 0, max_minutes: float | None = None,
          log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Train the model of ``recipe`` and save it to ``out``; returns the training report."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    random.seed(seed)
    started = time.perf_counter()
    documents = collect_documents(recipe.max_corpus_chars)
    train_docs, heldout_docs = split_documents(documents)
    if not train_docs or not heldout_docs:
        raise UsageError(f"cannot train the benchmark LM: found no text under {' or '.join(map(str, DOC_ROOTS))} "
                         "(pass --lm DIR with a causal LM folder)")
    tokenizer = build_tokenizer(train_docs, recipe.vocab_size, recipe.seq_len)
    train_ids = token_stream(tokenizer, train_docs)
    heldout_ids = token_stream(tokenizer, heldout_docs)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=recipe.seq_len * 2, n_embd=recipe.n_embd, n_layer=recipe.n_layer,
        n_head=recipe.n_head, n_inner=recipe.n_inner,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))
    seq_len, batch_size, steps = recipe.seq_len, recipe.batch_size, recipe.steps
    budget = (recipe.max_minutes if max_minutes is None else max_minutes) * 60.0
    train_started = time.perf_counter()
    step, losses, cut_short = 0, [], False
    generator = torch.Generator().manual_seed(seed)
    while step < steps:
        elapsed = time.perf_counter() - train_started
        if elapsed >= budget:
            cut_short = True
            break
        progress = step / steps
        lr = 1e-3 * min(1.0, (step + 1) / recipe.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 200 == 0:
            log(f"step {step:5d}  {elapsed:6.0f} s  train loss {sum(losses[-200:]) / 200:.3f}")
    heldout_ppl = stream_perplexity(model, heldout_ids, seq_len)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "heldout.txt").write_text("\n\n".join(heldout_docs), encoding="utf-8")
    report = {
        "recipe": asdict(recipe),
        "corpus": "/usr/share/common-licenses + plain-text /usr/share/doc (deduplicated)",
        "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
        "tokens": {"train": int(len(train_ids)), "heldout": int(len(heldout_ids))},
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step, "cut_short_by_time_cap": cut_short, "batch_size": batch_size, "seq_len": seq_len, "seed": seed,
        "final_train_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "heldout_perplexity": heldout_ppl,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2))  # last: marks the folder finished
    return report


def ensure_trained(out: Path, recipe: LMRecipe = FULL, seed: int = 0,
                   log: Callable[[str], None] = lambda line: None) -> Path:
    """Train unless ``out`` already holds a finished model (the cache)."""
    if not is_trained(out):
        train(out, recipe, seed, log=log)
    return out

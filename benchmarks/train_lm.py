"""Train the small GPT-2-style language model the quality benchmark prunes.

Nothing in qsurgeon depends on this model: any local Hugging Face causal-LM folder
prunes and evaluates the same way. It exists because the machines this project runs on
have no network and no pretrained causal LM, and a pruning benchmark on an untrained
model measures nothing.

Corpus: English prose that ships with every Debian system — the license texts under
``/usr/share/common-licenses`` and the plain-text documentation under ``/usr/share/doc``
(READMEs, Markdown, copyright files; gzipped files skipped), de-duplicated by content.
It is real, varied English and, crucially, DIFFERENT from the calibration corpus
(docstrings of the Python standard library, ``qsurgeon.server.models.calibration``), so
perplexity after pruning measures generalisation rather than memorised calibration
text. Every tenth document (by a hash of its text) is held out for perplexity.

The result is cached under ``benchmarks/cache/tiny-gpt2`` as a normal HF folder
(``config.json``, ``model.safetensors``, tokenizer files) plus ``heldout.txt`` and
``train_report.json``. Seeded; rerunning with the same corpus gives the same model.

    .venv/bin/python benchmarks/train_lm.py [--out DIR] [--steps 600] [--max-minutes 9]

Training runs a fixed number of steps (deterministic for a given seed and corpus);
``--max-minutes`` is only a safety cap for a heavily loaded machine, and the report says
whether it cut training short. On a shared 2-core machine 600 steps take about 5 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "cache" / "tiny-gpt2"
DOC_ROOTS = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))
TEXT_NAMES = ("readme", "copyright", "news", "todo", "authors", "changes", "faq")
TEXT_SUFFIXES = (".md", ".txt", ".rst")
MAX_FILE_BYTES = 200_000
MAX_CORPUS_CHARS = 4_000_000
HELDOUT_EVERY = 10
VOCAB_SIZE = 2048
SEQ_LEN = 128


def _is_candidate(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".gz") or not path.is_file() or path.is_symlink():
        return False
    if path.parts[:4] == ("/", "usr", "share", "common-licenses"):
        return True
    return name.endswith(TEXT_SUFFIXES) or name.split(".")[0] in TEXT_NAMES


def collect_documents() -> list[str]:
    """The corpus, de-duplicated by content and sorted by hash (stable across runs)."""
    documents: dict[str, str] = {}
    for root in DOC_ROOTS:
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
        if total >= MAX_CORPUS_CHARS:
            break
        kept.append(text)
        total += len(text)
    return kept


def split_documents(documents: list[str]) -> tuple[list[str], list[str]]:
    train, heldout = [], []
    for text in documents:
        bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY
        (heldout if bucket == 0 else train).append(text)
    return train, heldout


def build_tokenizer(train: list[str]):
    """A byte-level BPE trained on the training split, wrapped as an HF fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train, vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=SEQ_LEN * 2,
    )


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def stream_perplexity(model, stream: torch.Tensor, seq_len: int = SEQ_LEN, max_windows: int = 200) -> float:
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


def train(out: Path, steps: int, max_minutes: float, seed: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    random.seed(seed)
    started = time.perf_counter()
    documents = collect_documents()
    train_docs, heldout_docs = split_documents(documents)
    if not train_docs or not heldout_docs:
        raise SystemExit("train_lm: found no text under /usr/share/common-licenses or /usr/share/doc")
    tokenizer = build_tokenizer(train_docs)
    train_ids = token_stream(tokenizer, train_docs)
    heldout_ids = token_stream(tokenizer, heldout_docs)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=SEQ_LEN * 2, n_embd=128, n_layer=4, n_head=4, n_inner=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98))
    batch_size = 12
    budget = max_minutes * 60.0
    train_started = time.perf_counter()
    step, losses, cut_short = 0, [], False
    warmup = 50
    generator = torch.Generator().manual_seed(seed)
    while step < steps:
        elapsed = time.perf_counter() - train_started
        if elapsed >= budget:
            cut_short = True
            break
        progress = step / steps
        lr = 1e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (batch_size,), generator=generator)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 200 == 0:
            print(f"step {step:5d}  {elapsed:6.0f} s  train loss {sum(losses[-200:]) / 200:.3f}", flush=True)
    heldout_ppl = stream_perplexity(model, heldout_ids)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "heldout.txt").write_text("\n\n".join(heldout_docs), encoding="utf-8")
    report = {
        "corpus": "/usr/share/common-licenses + plain-text /usr/share/doc (deduplicated)",
        "documents": {"train": len(train_docs), "heldout": len(heldout_docs)},
        "tokens": {"train": int(len(train_ids)), "heldout": int(len(heldout_ids))},
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step, "cut_short_by_time_cap": cut_short, "batch_size": batch_size, "seq_len": SEQ_LEN, "seed": seed,
        "final_train_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "heldout_perplexity": heldout_ppl,
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    return report


def ensure_trained(out: Path = DEFAULT_OUT, steps: int = 600, max_minutes: float = 9.0, seed: int = 0) -> Path:
    """Train unless ``out`` already holds a finished model (the cache)."""
    if (out / "train_report.json").is_file() and (out / "model.safetensors").is_file():
        return out
    train(out, steps, max_minutes, seed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=9.0, help="safety cap on training time (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if the cache exists")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.force or not (args.out / "train_report.json").is_file():
        report = train(args.out, args.steps, args.max_minutes, args.seed)
    else:
        report = json.loads((args.out / "train_report.json").read_text())
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

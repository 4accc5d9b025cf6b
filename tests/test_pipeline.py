"""run_prune end to end on tiny random models: exact densities, saved outputs, resume, determinism."""

from __future__ import annotations

import json
import typing

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qsurgeon.client.errors import UsageError
from qsurgeon.client.options import Method, PruneOptions
from qsurgeon.server.engine.checkpoint import DirectoryCheckpoint
from qsurgeon.server.engine.methods import METHODS
from qsurgeon.server.engine.outputs import MASKS_FILE, REPORT_FILE, load_masks
from qsurgeon.server.engine.run import run_prune
from qsurgeon.server.pruning.masks import check_mask
from qsurgeon.server.pruning.sparsity import Sparsity
from test_adapters import save_tiny_model

FAST = {"samples": 16, "seq_len": 32, "block_size": 16, "epochs": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-models")
    return {kind: save_tiny_model(kind, root / kind) for kind in ("bert", "gpt2", "llama")}


def _options(model, **overrides) -> PruneOptions:
    return PruneOptions(model=str(model), **{**FAST, **overrides})


def _saved_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("granularity", ["row", "column", "tensor"])
def test_exact_density_at_every_granularity_in_the_saved_model(models, tmp_path, granularity):
    out = tmp_path / "out"
    result = run_prune(_options(models["bert"], method="icbs", density=0.4, granularity=granularity, out=str(out)))
    sparsity = Sparsity(0.4, granularity)
    masks = load_masks(out / MASKS_FILE)
    weights = _saved_weights(out)
    assert set(masks) == set(result.masks) and len(masks) == 12
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        check_mask(mask, sparsity, name)  # exact count in every row / column / the tensor
        weight = weights[name]
        assert torch.equal(weight == 0, mask)  # zeros in the saved model are exactly the masked weights
        groups = {"row": weight.shape[1], "column": weight.shape[0], "tensor": weight.numel()}[granularity]
        kept = (weight != 0).sum(dim={"row": 1, "column": 0, "tensor": (0, 1)}[granularity])
        assert (kept == round(0.4 * groups)).all()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["summary"]["density"] == pytest.approx(np.mean([round(0.4 * 32) / 32, round(0.4 * 64) / 64]), abs=0.02)
    assert set(report["seconds"]) >= {"load", "calibrate", "init", "icbs", "refit", "save", "total"}
    assert report["summary"]["relative_error_final"] <= report["summary"]["relative_error_initial"]


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_patterns_group_by_group(models, tmp_path, pattern):
    out = tmp_path / "out"
    run_prune(_options(models["bert"], method="icbs", pattern=pattern, out=str(out)))
    n, m = map(int, pattern.split(":"))
    for name, weight in _saved_weights(out).items():
        if name in load_masks(out / MASKS_FILE):
            groups = (weight != 0).reshape(-1, m).sum(dim=1)
            assert (groups == n).all(), name


def test_saved_model_reloads_with_from_pretrained(models, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "out"
    result = run_prune(_options(models["bert"], method="wanda", out=str(out)))
    reloaded = AutoModel.from_pretrained(out, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for name, mask in result.masks.items():
        parameter = reloaded.get_parameter(name)
        assert torch.equal(parameter == 0, mask)
    encoded = tokenizer(["a short sentence"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**encoded).last_hidden_state, result.adapter.model(**encoded).last_hidden_state)


def test_icbs_beats_wanda_and_is_reproducible(models):
    wanda = run_prune(_options(models["bert"], method="wanda"))
    first = run_prune(_options(models["bert"], method="icbs", epochs=2, seed=3))
    second = run_prune(_options(models["bert"], method="icbs", epochs=2, seed=3))
    assert all(torch.equal(first.masks[name], second.masks[name]) for name in first.masks)
    assert first.report["summary"]["relative_error_final"] < wanda.report["summary"]["relative_error_final"]
    # wanda is iCBS with 0 epochs: the same masks as iCBS's starting point
    zero = run_prune(_options(models["bert"], method="icbs", epochs=0))
    assert all(torch.equal(zero.masks[name], wanda.masks[name]) for name in wanda.masks)
    assert first.report["icbs"]["blocks"]["accepted"] > 0
    assert len(first.report["icbs"]["surrogate_per_epoch"]) == 2


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_block", [0, 1])
def test_checkpoint_resume_gives_identical_masks(models, tmp_path, crash_block):
    options = _options(models["bert"], method="icbs", epochs=2, seed=1)
    reference = run_prune(options)
    checkpoint = DirectoryCheckpoint(tmp_path / "ckpt")
    rounds = []

    def crash_mid_block(event):
        if event["event"] == "round":
            rounds.append(event)
            if event["block"] == crash_block and len([r for r in rounds if r["block"] == crash_block]) == 2:
                raise _Crash  # after the checkpoint of this block's second round was saved

    with pytest.raises(_Crash):
        run_prune(options, checkpoint=checkpoint, progress=crash_mid_block)
    saved = checkpoint.load()
    assert len(saved["finished"]) == crash_block and saved["in_block"] is not None
    resumed_events = []
    resumed = run_prune(_options(models["bert"], method="icbs", epochs=2, seed=1), checkpoint=checkpoint,
                        progress=resumed_events.append)
    start = next(e for e in resumed_events if e["event"] == "start")
    assert start["resumed_blocks"] == crash_block
    # finished blocks are not redone; blocks after the interrupted one start fresh
    assert not any(e["event"] == "round" and e["block"] < crash_block for e in resumed_events)
    for name, mask in reference.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    with pytest.raises(UsageError, match="other options"):
        run_prune(_options(models["bert"], method="icbs", epochs=3, seed=1), checkpoint=checkpoint)


def test_time_limit_stops_with_valid_masks(models):
    result = run_prune(_options(models["bert"], method="icbs", epochs=400, time_limit=0.3))
    assert result.report["summary"]["completed"] is False
    for name, mask in result.masks.items():
        check_mask(mask, Sparsity(0.5), name)


def test_should_stop_is_honoured(models):
    result = run_prune(_options(models["bert"], method="icbs", epochs=5), should_stop=lambda: True)
    assert result.report["icbs"]["blocks"].get("accepted", 0) == 0
    assert result.completed is False


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoders_with_pretokenised_calibration(models, tmp_path, kind):
    ids = np.random.default_rng(0).integers(100, 30000, size=(8, 24))
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "out"
    result = run_prune(_options(models[kind], method="icbs", calibration=str(tmp_path / "ids.npy"), out=str(out)))
    weights = _saved_weights(out)
    assert not any("lm_head" in name for name in result.masks)
    for name, mask in result.masks.items():
        check_mask(mask, Sparsity(0.5), name)
        stored = weights[name]
        zeros = stored == 0
        assert torch.equal(zeros.T if kind == "gpt2" else zeros, mask), name  # Conv1D stores (in, out)
    assert result.report["summary"]["relative_error_final"] < result.report["summary"]["relative_error_initial"]


def test_refit_lowers_the_error_and_keeps_the_mask(models):
    plain = run_prune(_options(models["bert"], method="wanda"))
    refit = run_prune(_options(models["bert"], method="wanda", refit=True))
    summary = refit.report["summary"]
    assert summary["relative_error_refit"] < summary["relative_error_final"]
    for name, entry in refit.report["tensors"].items():
        assert entry["error_weights"] <= entry["error_final"] + 1e-12, name
        if ".layer.0." in name:  # block 0 sees the same inputs either way: same mask, same mask error
            assert entry["error_final"] == pytest.approx(plain.report["tensors"][name]["error_final"], rel=1e-9)
    for layer in refit.adapter.all_targets():
        assert torch.equal(layer.weight() == 0, refit.masks[layer.parameter_name])


def test_the_registry_holds_exactly_the_declared_methods():
    """``--method`` is checked against the Method Literal before a run starts; a name there
    without a function here would fail mid-run, a function without a name is unreachable."""
    assert sorted(METHODS) == sorted(typing.get_args(Method))


def test_sparsegpt_is_a_registered_method(models):
    result = run_prune(_options(models["bert"], method="sparsegpt", pattern="2:4"))
    assert "relative_error_refit" in result.report["summary"]
    for name, mask in result.masks.items():
        check_mask(mask, Sparsity(0.5, pattern=(2, 4)), name)


def test_export_blocks_writes_the_solved_problems(models, tmp_path):
    run_prune(_options(models["bert"], method="icbs", export_blocks=str(tmp_path / "blocks")))
    manifest = json.loads((tmp_path / "blocks" / "manifest.json").read_text())
    assert len(manifest["blocks"]) > 0


def test_options_validate_themselves(models):
    for bad, message in [
        ({"density": 0.0}, "density"), ({"density": 1.0}, "density"), ({"method": "prayer"}, "method: unknown value 'prayer'"),
        ({"objective": "vibes"}, "objective: unknown value 'vibes'"),
        ({"granularity": "diagonal"}, "granularity"), ({"pattern": "2-4"}, "N:M"), ({"epochs": -1}, "epochs"),
        ({"density": 0.3, "pattern": "2:4"}, "contradicts"), ({"time_limit": 0}, "time_limit"),
    ]:
        with pytest.raises(UsageError, match=message):
            _options(models["bert"], **bad)
    with pytest.raises(UsageError, match="unknown solver 'oracle'"):  # the engine's registry decides
        run_prune(_options(models["bert"], solver="oracle"))
    options = _options(models["bert"], pattern="2:4")
    assert PruneOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options
    with pytest.raises(UsageError, match="colour: unknown option"):
        PruneOptions.from_dict({"model": "x", "colour": "red"})


def test_pattern_that_does_not_divide_the_width_fails_before_writing(models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="multiple of 24"):
        run_prune(_options(models["bert"], pattern="2:24", out=str(out)))
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind, objective", [
    pytest.param("llama", "fisher", marks=pytest.mark.slow), ("bert", "layerwise+fisher"),
])
def test_fisher_objectives_lower_their_surrogate(models, kind, objective):
    """Causal LMs use next-token loss, encoders self-distillation; iCBS never raises the surrogate."""
    result = run_prune(_options(models[kind], method="icbs", objective=objective, samples=8, steps_per_epoch=12))
    icbs = result.report["icbs"]
    assert icbs["blocks"]["accepted"] > 0
    assert icbs["surrogate_per_epoch"][-1] < icbs["surrogate_initial"] + 1e-12
    for name, mask in result.masks.items():
        check_mask(mask, Sparsity(0.5), name)


def test_include_prunes_only_matching_blocks_and_resumes(models, tmp_path):
    options = _options(models["bert"], method="icbs", include=["encoder.layer.1.*"])
    checkpoint = DirectoryCheckpoint(tmp_path / "ckpt")
    result = run_prune(options, checkpoint=checkpoint)
    assert sorted({name.split(".")[2] for name in result.masks}) == ["1"]
    assert result.adapter.targets(0) == []
    block0_linears = [m for m in result.adapter.blocks()[0].modules() if isinstance(m, torch.nn.Linear)]
    assert block0_linears and all((m.weight != 0).all() for m in block0_linears)  # block 0 left dense
    again = run_prune(options, checkpoint=checkpoint)  # everything restored from the checkpoint
    assert all(torch.equal(again.masks[name], mask) for name, mask in result.masks.items())


def test_plain_module_with_user_loss(tmp_path):
    """A plain nn.Module from Python: layer-wise iCBS, then fisher with the user's loss and gradient init."""
    from qsurgeon.server.models.text import TorchModuleAdapter
    from qsurgeon.server.models.calibration import CalibrationData
    from test_adapters import _Stack

    torch.manual_seed(0)
    features = torch.randn(24, 4)
    calibration = CalibrationData.from_inputs(features)
    for objective, init in [("layerwise", "wanda"), ("fisher", "gradient"), ("layerwise+fisher", "magnitude")]:
        model = _Stack()
        dense_outputs = model(features).detach()
        adapter = TorchModuleAdapter(model, loss_fn=lambda out, batch: out.pow(2).mean(), exclude=["head"])
        out = tmp_path / objective
        result = run_prune(PruneOptions(model="stack", method="icbs", objective=objective, init=init, block_size=4,
                                        steps_per_epoch=6, out=str(out)),
                           adapter=adapter, calibration=calibration)
        assert sorted(result.masks) == ["layers.0.0.weight", "layers.1.0.weight", "layers.2.0.weight"]
        for name, mask in result.masks.items():
            check_mask(mask, Sparsity(0.5), name)
            assert torch.equal(model.get_parameter(name) == 0, mask)
        assert not torch.equal(model(features), dense_outputs)
        saved = load_file(str(out / "model.safetensors"))
        assert torch.equal(saved["layers.1.0.weight"] == 0, result.masks["layers.1.0.weight"])
        assert result.report["icbs"]["surrogate_per_epoch"][-1] <= result.report["icbs"]["surrogate_initial"] + 1e-12

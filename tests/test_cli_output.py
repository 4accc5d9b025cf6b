"""What ``qsurgeon prune`` prints besides the masks: the bar on a terminal, the compile notice, the summary line."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from qsurgeon.client.cli import main
from test_adapters import save_tiny_model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_model("bert", tmp_path_factory.mktemp("output") / "bert")


def _prune_args(bert, out, *extra):
    return ["prune", str(bert), "--samples", "8", "--seq-len", "24", "--block-size", "16", "--out", str(out), *extra]


CLI = "import sys; from qsurgeon.client.cli import main; sys.exit(main(sys.argv[1:]))"


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, so the bar is drawn in place as on a real one."""

    def isatty(self) -> bool:
        return True


def test_terminal_bar_has_an_eta_and_names_transformer_blocks_and_qubos_apart(bert):
    from qsurgeon.server.engine.progress import ProgressBar
    from qsurgeon.server.engine.run import PruneOptions, run_prune

    stream = _Terminal()
    run_prune(PruneOptions(model=str(bert), samples=8, seq_len=24, block_size=16), progress=ProgressBar(stream))
    text = stream.getvalue()
    assert "\r" in text  # redrawn in place
    frames = [frame.strip() for frame in re.split(r"[\r\n]", text) if frame.strip()]
    bars = [frame for frame in frames if re.match(r"transformer block [12]/2 \S* *[012]/2 \[\d\d:\d\d<", frame)]
    assert any(re.search(r"\[\d\d:\d\d<\d\d:\d\d\], epoch 1/1, round 1: \d+ QUBOs", frame) for frame in bars), bars
    # finished transformer blocks stay as lines above the bar; the bar is cleared at the end
    assert [frame.split(" done:")[0] for frame in frames if " done: " in frame] == [
        "transformer block 1/2", "transformer block 2/2"]
    assert frames[-1].startswith("done in ")


def test_summary_line_shows_the_refit_error(bert, tmp_path, capsys):
    out = tmp_path / "quality"
    assert main(_prune_args(bert, out, "--preset", "quality", "--quiet")) == 0
    line = capsys.readouterr().out.strip()
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["relative_error_refit"] < summary["relative_error_final"]
    assert (f"relative layer error {summary['relative_error_initial']:.4f} -> {summary['relative_error_final']:.4f}"
            f" (mask), {summary['relative_error_refit']:.4f} after refit; wrote {out}") in line


def test_summary_line_without_refit_says_nothing_of_one(bert, tmp_path, capsys):
    assert main(_prune_args(bert, tmp_path / "plain", "--quiet")) == 0
    line = capsys.readouterr().out.strip()
    assert re.search(r"relative layer error 0\.\d{4} -> 0\.\d{4}; wrote ", line) and "refit" not in line


@pytest.mark.slow
def test_compile_notice_on_the_first_run_only(bert, tmp_path):
    """With an empty numba cache the first prune says it compiles the kernels; the next one, cached, does not."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "OMP_WAIT_POLICY": "PASSIVE"}
    runs = [subprocess.run([sys.executable, "-c", CLI, *_prune_args(bert, tmp_path / f"out{i}")],
                           env=env, capture_output=True, text=True, timeout=600) for i in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-2000:]
    first, second = (run.stderr.splitlines() for run in runs)
    assert first.count(next(line for line in first if line.startswith("first run only: numba is compiling"))) == 1
    assert first.index(next(line for line in first if line.startswith("first run only"))) == 1  # before block 1
    assert not [line for line in second if "compiling" in line]
    assert any(name.endswith(".nbi") for _, _, files in os.walk(tmp_path / "numba-cache") for name in files)

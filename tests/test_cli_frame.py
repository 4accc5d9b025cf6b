"""The CLI frame: commands of portions whose extras are missing say which extra to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qsurgeon.client import cli


@pytest.fixture
def command_module_needing_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    module = tmp_path / "qsurgeon_test_commands.py"
    module.write_text("import qsurgeon_not_installed_dependency\n\ndef register(subparsers):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", [("qsurgeon_test_commands", ("frobnicate",), "quantum")])
    return "frobnicate"


def test_missing_extra_names_the_extra(command_module_needing_missing_package: str, capsys) -> None:
    code = cli.main([command_module_needing_missing_package, "--anything"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'qsurgeon[quantum]'" in err
    assert "qsurgeon_not_installed_dependency" in err
    assert "Traceback" not in err


def test_absent_command_module_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", [("qsurgeon.no_such_module", ("ghost",), "server")])
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["ghost"])


def test_user_errors_print_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    code = cli.main(["solve", str(tmp_path / "missing.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "no such file" in err


def test_solvers_lists_exhaustive(capsys) -> None:
    assert cli.main(["solvers", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"name": "exhaustive"' in out

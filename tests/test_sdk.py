"""The SDK and the service CLI against a real uvicorn server (in a thread) and a real worker
thread, with the real Redis; and the base-install promise (no numpy/torch in the client)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from redis_support import REDIS_URL, key_prefix, redis_client

redis = pytest.importorskip("redis")
uvicorn = pytest.importorskip("uvicorn")

from qsurgeon.client.cli import main as cli_main  # noqa: E402
from qsurgeon.client.errors import UsageError  # noqa: E402
from qsurgeon.client.schemas import Job, SolveResult  # noqa: E402
from qsurgeon.client.sdk import (  # noqa: E402
    AsyncClient, AuthenticationError, BadRequestError, Client, NotFoundError, ServiceUnavailableError,
)
from qsurgeon.server.api import ServiceConfig, create_app  # noqa: E402
from qsurgeon.worker.queue.consumer import Worker  # noqa: E402
from qsurgeon.worker.queue.settings import QueueSettings, connect  # noqa: E402

KEY = "sdk-test-key-0123456789"
pytestmark = pytest.mark.redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with key_prefix(redis_client(), "qssdk") as prefix:
        yield from _running_service(tmp_path_factory, prefix)


def _running_service(tmp_path_factory, prefix: str):
    settings = QueueSettings(prefix=prefix)
    config = ServiceConfig(data_dir=tmp_path_factory.mktemp("data"), redis_url=REDIS_URL, api_keys=frozenset({KEY}),
                           queue=settings, sync_solve_max_variables=12)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    server_thread = threading.Thread(target=server.run, daemon=True)
    server_thread.start()
    worker = Worker(connect(REDIS_URL), settings=settings, backends=["exhaustive"])
    worker_thread = threading.Thread(target=worker.run, daemon=True)
    worker_thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    worker.stop()
    server.should_exit = True
    server_thread.join(timeout=10)
    worker_thread.join(timeout=10)


def brute_force(Q: np.ndarray, k: int) -> float:
    Q = Q.astype(np.float32).astype(np.float64)
    best = np.inf
    for pattern in range(1 << Q.shape[0]):
        x = np.array([(pattern >> i) & 1 for i in range(Q.shape[0])], dtype=float)
        if x.sum() == k:
            best = min(best, float(x @ Q @ x))
    return best


def symmetric(seed: int, size: int) -> np.ndarray:
    A = np.random.default_rng(seed).normal(size=(size, size))
    return (A + A.T) / 2


def test_client_solves_small_and_large_problems(service, tmp_path):
    with Client(service, api_key=KEY) as client:
        assert client.health()["status"] == "ok" and client.ready()
        Q = symmetric(0, 8)
        answer = client.solve(Q, 3, solver="exhaustive")
        assert isinstance(answer, SolveResult) and sum(answer.x) == 3
        assert answer.energy == pytest.approx(brute_force(Q, 3), rel=1e-9, abs=1e-12)
        big = symmetric(1, 14)
        job = client.solve(big, 6, solver="exhaustive")
        assert isinstance(job, Job) and job.kind.value == "solve"
        events = list(client.events(job))
        assert [e.data["state"] for e in events if e.type == "state"] == ["queued", "running", "succeeded"]
        assert events[-1].type == "end"
        done = client.wait(job, timeout=30, poll=0.1)
        assert done.state.value == "succeeded"
        [path] = client.download(done, tmp_path / "out")
        solution = json.loads(path.read_text())
        assert solution["energy"] == pytest.approx(brute_force(big, 6), rel=1e-9, abs=1e-12)
        assert any(j.id == job.id for j in client.list(state="succeeded"))
        assert "exhaustive" in [s.name for s in client.solvers() if s.exact]


def test_client_typed_errors(service):
    with Client(service, api_key=KEY) as client:
        with pytest.raises(NotFoundError) as missing:
            client.get("0" * 32)
        assert missing.value.status == 404
        with pytest.raises(UsageError, match="density: Input should be less than 1"):
            client.submit_prune("builtin:minilm", density=1.5)  # refused before anything is sent
        with pytest.raises(BadRequestError, match="unknown solver 'nope'"):
            client.submit_prune("builtin:minilm", solver="nope")  # only the server knows its solvers
        with pytest.raises(BadRequestError, match="unknown solver"):
            client.solve([[1.0, 0.0], [0.0, 1.0]], 1, solver="nope")
        with pytest.raises(BadRequestError, match="k must lie"):
            client.solve([[1.0, 0.0], [0.0, 1.0]], 3, solver="exhaustive")
    with Client(service, api_key="wrong-key-0123456789") as client, pytest.raises(AuthenticationError):
        client.list()
    with Client(service, api_key=None) as client, pytest.raises(AuthenticationError) as error:
        client.list()
    assert error.value.status == 401
    with Client("http://127.0.0.1:9", api_key=KEY) as client, pytest.raises(ServiceUnavailableError):
        client.get("0" * 32)


def test_async_client(service):
    async def scenario():
        async with AsyncClient(service, api_key=KEY) as client:
            Q = symmetric(2, 9)
            answer = await client.solve(Q, 4, solver="exhaustive")
            assert answer.energy == pytest.approx(brute_force(Q, 4), rel=1e-9, abs=1e-12)
            job = await client.solve(symmetric(3, 13), 2, solver="exhaustive")
            kinds = [event.type async for event in client.events(job)]
            assert kinds[-1] == "end" and "state" in kinds
            done = await client.wait(job, timeout=30, poll=0.1)
            assert done.artifacts == ["solution.json"]
            with pytest.raises(NotFoundError):
                await client.cancel("f" * 32)

    asyncio.run(scenario())


def test_service_cli_commands(service, tmp_path, capsys):
    with Client(service, api_key=KEY) as client:
        job = client.solve(symmetric(4, 13), 5, solver="exhaustive")
        client.wait(job, timeout=30, poll=0.1)
    common = ["--url", service, "--api-key", KEY]
    assert cli_main(["status", job.id, *common]) == 0
    assert job.id in capsys.readouterr().out
    assert cli_main(["watch", job.id, *common, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["type"] == "end"
    assert cli_main(["download", job.id, str(tmp_path / "d"), *common]) == 0
    assert (tmp_path / "d" / "solution.json").is_file()
    assert cli_main(["cancel", job.id, *common]) == 0  # finished: cancel changes nothing
    assert "succeeded" in capsys.readouterr().out
    assert cli_main(["purge", job.id, *common]) == 0  # finished: its records and files go
    assert "purged (succeeded)" in capsys.readouterr().out
    assert cli_main(["status", job.id, *common]) == 2 and "404" in capsys.readouterr().err
    assert cli_main(["status", "0" * 32, *common]) == 2
    assert "404" in capsys.readouterr().err
    assert cli_main(["submit", "builtin:minilm", "--density", "1.5", *common]) == 2
    assert "density" in capsys.readouterr().err
    assert cli_main(["submit", "builtin:minilm", "--seed", "abc", *common]) == 2
    assert "--seed: Input should be a valid integer" in capsys.readouterr().err
    # every prune option has a flag, and its value travels typed, as the server's schema wants it
    assert cli_main(["submit", "builtin:minilm", "--epochs", "0", "--coverage", "0.25", "--no-refit",
                     "--solver-param", "sweeps=8", "--json", *common]) == 0
    submitted = json.loads(capsys.readouterr().out)
    assert submitted["options"] == {"epochs": 0, "coverage": 0.25, "refit": False, "solver_params": {"sweeps": 8}}
    assert cli_main(["cancel", submitted["id"], *common]) == 0


def test_client_modules_import_without_numpy_or_torch():
    code = (
        "import sys\n"
        "for name in ('numpy', 'torch', 'redis', 'fastapi'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "import qsurgeon.client.sdk, qsurgeon.client.schemas, qsurgeon.client.cli.jobs\n"
        "from qsurgeon.client.cli import build_parser\n"
        "build_parser().parse_args(['status', '--url', 'http://x'])\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

"""A bounded, seeded schemathesis run (`st run --checks all`) over the live `/openapi.json`.

The server runs in this process (uvicorn in a thread) on the real Redis with a worker thread,
so `/readyz` is ready and small solves are answered. Every check is on. One setting departs
from the defaults, in ``schemathesis.toml`` here: `positive_data_acceptance` also accepts 422,
because some rules span fields in ways JSON Schema cannot state (a square ``Q``, ``groups`` as
long as the problem, a model name that exists in this server's folder, a solver parameter that
the chosen solver declares); the schema states every rule it can (bounds, patterns, Q xor F,
k xor groups+counts, which fields go together).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
import subprocess
import threading
import time

import pytest
from redis_support import REDIS_URL, key_prefix, redis_client

pytest.importorskip("schemathesis")
uvicorn = pytest.importorskip("uvicorn")

from test_service_integration import free_port  # noqa: E402

from qsurgeon.server.api import ServiceConfig, create_app  # noqa: E402
from qsurgeon.worker.queue.consumer import Worker  # noqa: E402
from qsurgeon.worker.queue.settings import QueueSettings, connect  # noqa: E402

KEY = "schema-key-0123456789abcdef"
EXAMPLES = 8
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""
pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_schemathesis_finds_no_failure(tmp_path):
    # The command lives beside the interpreter that runs the tests (the venv's bin/), which
    # need not be on PATH: `make test` calls .venv/bin/python directly.
    here = str(Path(sys.executable).parent)
    st = shutil.which("st", path=here) or shutil.which("schemathesis", path=here)
    if st is None:
        pytest.skip("the schemathesis command is not installed")
    with key_prefix(redis_client(), "qsst") as prefix:
        config = ServiceConfig(data_dir=tmp_path / "data", redis_url=REDIS_URL, api_keys=frozenset({KEY}),
                               queue=QueueSettings(prefix=prefix), max_upload_bytes=2_000_000,
                               max_json_bytes=1_000_000, sync_solve_max_variables=12, sync_solve_timeout=20,
                               # API only: accepted jobs are not run here; they fail at their
                               # one-second deadline, so event streams end
                               max_running_jobs=0, job_deadline_seconds=1.0, supervise_interval=0.5)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="error"))
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        worker = Worker(connect(REDIS_URL), settings=config.queue)
        working = threading.Thread(target=worker.run, daemon=True)
        working.start()
        try:
            deadline = time.monotonic() + 30
            while not server.started:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
            import httpx  # the first /v1/solvers imports every solver's SDK: not part of what is timed

            httpx.get(f"http://127.0.0.1:{port}/v1/solvers", headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            (tmp_path / "schemathesis.toml").write_text(CONFIG)
            result = subprocess.run(
                [st, "--config-file", str(tmp_path / "schemathesis.toml"), "run",
                 f"http://127.0.0.1:{port}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
                 "--seed", "20261126", "--header", f"Authorization: Bearer {KEY}", "--workers", "1", "--request-timeout", "30",
                 "--phases", "examples,coverage,fuzzing", "--no-color"],
                capture_output=True, text=True, cwd=tmp_path, timeout=300)
            assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
        finally:
            worker.stop()
            server.should_exit = True
            serving.join(timeout=20)
            working.join(timeout=20)

"""The REST API in-process (FastAPI TestClient) against the real Redis and a real worker thread:
auth, validation answers, raw solving, solve jobs, events, metrics, archive safety."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
import zipfile
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from redis_support import REDIS_URL, running_worker

redis = pytest.importorskip("redis")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from qsurgeon.client.errors import UsageError  # noqa: E402
from qsurgeon.client.options import JobOptions  # noqa: E402
from qsurgeon.client.schemas import JobCreate, JobState  # noqa: E402
from qsurgeon.server.api import ServiceConfig, create_app, load_api_keys  # noqa: E402
from qsurgeon.server.api.jobs.archives import ArchiveError, extract_model_archive  # noqa: E402
from qsurgeon.server.api.jobs.store import JobStore  # noqa: E402
from qsurgeon.server.api.jobs.submit import create_job, model_path_for_request  # noqa: E402
from qsurgeon.worker.queue.consumer import Worker  # noqa: E402
from qsurgeon.worker.block.problem import BlockProblem  # noqa: E402
from qsurgeon.worker.queue.settings import QueueSettings, connect  # noqa: E402

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.redis


@pytest.fixture
def config(tmp_path, prefix) -> ServiceConfig:
    models = tmp_path / "models"
    models.mkdir()
    return ServiceConfig(data_dir=tmp_path / "data", redis_url=REDIS_URL, models_dir=models,
                         api_keys=frozenset({KEY}), queue=QueueSettings(prefix=prefix),
                         max_upload_bytes=200_000, max_json_bytes=100_000, sync_solve_max_variables=12)


@pytest.fixture
def worker(config):
    with running_worker(Worker(connect(REDIS_URL), settings=config.queue, backends=["exhaustive"]), registered=True) as instance:
        yield instance


@pytest.fixture
def api(config):
    with TestClient(create_app(config)) as client:
        yield client


def nothing_stored(api: TestClient, config: ServiceConfig) -> bool:
    jobs = api.get("/v1/jobs", headers=AUTH).json()["jobs"]
    leftovers = list(config.jobs_dir.iterdir()) if config.jobs_dir.exists() else []
    uploads = list(config.data_dir.glob("*.upload"))
    return not jobs and not leftovers and not uploads


def brute_force(Q: np.ndarray, k: int) -> float:
    size = Q.shape[0]
    best = np.inf
    for pattern in range(1 << size):
        x = np.array([(pattern >> i) & 1 for i in range(size)], dtype=float)
        if x.sum() == k:
            best = min(best, float(x @ Q @ x))
    return best


def symmetric(rng: np.random.Generator, size: int) -> np.ndarray:
    A = rng.normal(size=(size, size))
    return (A + A.T) / 2


# ---------------------------------------------------------------------- auth and health
def test_auth_required_everywhere_but_health(api):
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code in (200, 503)
    for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/solvers"), ("GET", "/v1/metrics"),
                         ("POST", "/v1/jobs"), ("POST", "/v1/solve"), ("DELETE", f"/v1/jobs/{'0' * 32}")):
        assert api.request(method, path).status_code == 401, path
        wrong = api.request(method, path, headers={"Authorization": "Bearer not-the-key-at-all-xx"})
        assert wrong.status_code == 403, path
    missing = api.get("/v1/jobs", headers={"Authorization": "Basic abc"})
    assert missing.status_code == 401 and "Bearer" in missing.json()["detail"]
    assert api.get("/v1/jobs", headers=AUTH).status_code == 200


def test_api_keys_from_env_and_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nfile-key-0123456789abcdef\n\n")
    assert load_api_keys(keys_file, env="env-key-0123456789abcdef, ") == {
        "file-key-0123456789abcdef", "env-key-0123456789abcdef"}
    with pytest.raises(UsageError, match="shorter than 16"):
        load_api_keys(None, env="short")
    with pytest.raises(UsageError, match="does not exist"):
        load_api_keys(tmp_path / "nope", env="")


def test_readyz_needs_a_worker(api, config):
    response = api.get("/readyz")
    assert response.status_code == 503 and response.json()["workers"] == 0
    worker = Worker(connect(REDIS_URL), settings=config.queue, backends=["exhaustive"])
    worker._heartbeat()
    assert api.get("/readyz").json() == {"ready": True, "redis": True, "workers": 1, "detail": ""}


# ---------------------------------------------------------------------- raw solving
def test_solve_small_problem_synchronously(api, worker):
    rng = np.random.default_rng(0)
    Q = symmetric(rng, 9)
    response = api.post("/v1/solve", headers=AUTH, json={"Q": Q.tolist(), "k": 4, "solver": "exhaustive"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert sum(body["x"]) == 4 and body["solver"] == "exhaustive"
    # the API re-evaluates in float64 from the float32 problem it built
    Q32 = Q.astype(np.float32).astype(np.float64)
    assert body["energy"] == pytest.approx(brute_force(Q32, 4), rel=1e-9, abs=1e-12)
    assert body["metadata"]["worker"] == worker.name


def test_solve_grouped_and_factored(api, worker):
    rng = np.random.default_rng(1)
    F = rng.normal(size=(2, 8))
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    response = api.post("/v1/solve", headers=AUTH, json={
        "F": F.tolist(), "groups": groups, "counts": [2, 1], "solver": "exhaustive"})
    assert response.status_code == 200, response.text
    x = np.array(response.json()["x"])
    assert x[:4].sum() == 2 and x[4:].sum() == 1
    problem = BlockProblem.factored(F, groups=np.array(groups), counts=np.array([2, 1]))
    best = min(problem.energy(np.array([(p >> i) & 1 for i in range(8)])) for p in range(256)
               if problem.is_feasible(np.array([(p >> i) & 1 for i in range(8)])))
    assert response.json()["energy"] == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_solve_without_workers_is_503(api):
    response = api.post("/v1/solve", headers=AUTH, json={"Q": [[1.0, 0.0], [0.0, 2.0]], "k": 1,
                                                          "solver": "exhaustive"})
    assert response.status_code == 503 and "worker" in response.json()["detail"]


@pytest.mark.parametrize("body, status, words", [
    ('{"Q": [[1, 0], [0, 1]], "k": 1', 400, "malformed JSON"),
    (json.dumps({"Q": "not a matrix", "k": 1}), 422, "Q"),
    (json.dumps({"Q": [[1, 0], [0, 1]], "k": "one"}), 422, "k"),
    (json.dumps({"Q": [[1, 0], [0, 1]], "k": 5}), 422, "k must lie in 0..2"),
    (json.dumps({"Q": [[1, 2], [0, 1]], "k": 1}), 422, "symmetric"),
    (json.dumps({"Q": [[1, 0, 0], [0, 1]], "k": 1}), 422, "square"),
    (json.dumps({"k": 1}), 422, "exactly one of Q or F"),
    (json.dumps({"Q": [[1, 0], [0, 1]], "k": 1, "solver": "os.system"}), 422, "unknown solver"),
    (json.dumps({"Q": [[1, 0], [0, 1]], "k": 1, "extra": 1}), 422, "extra"),
])
def test_solve_rejects_bad_input(api, body, status, words):
    response = api.post("/v1/solve", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_large_problem_becomes_a_job_with_events_and_artifact(api, worker, config):
    rng = np.random.default_rng(2)
    Q = symmetric(rng, 14)  # above sync_solve_max_variables = 12
    response = api.post("/v1/solve", headers=AUTH, json={"Q": Q.tolist(), "k": 5, "solver": "exhaustive"})
    assert response.status_code == 202, response.text
    job_id = response.json()["job"]["id"]
    deadline = time.monotonic() + 30
    while (job := api.get(f"/v1/jobs/{job_id}", headers=AUTH).json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["state"] == "succeeded", job
    assert job["artifacts"] == ["solution.json"] and job["kind"] == "solve"
    solution = api.get(f"/v1/jobs/{job_id}/artifacts/solution.json", headers=AUTH).json()
    Q32 = Q.astype(np.float32).astype(np.float64)
    assert solution["energy"] == pytest.approx(brute_force(Q32, 5), rel=1e-9, abs=1e-12)
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=AUTH) as stream:
        lines = list(stream.iter_lines())
    states = [json.loads(line[6:])["state"] for i, line in enumerate(lines)
              if line.startswith("data: ") and lines[i - 1] == "event: state"]
    assert states == ["queued", "running", "succeeded"]
    assert lines[-2:] == ["event: end", "data: {}"] or lines[-3:-1] == ["event: end", "data: {}"]
    # resuming from an event id skips what came before it
    first_id = next(line[4:] for line in lines if line.startswith("id: "))
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers={**AUTH, "Last-Event-ID": first_id}) as stream:
        later = [line for line in stream.iter_lines() if line.startswith("id: ")]
    assert first_id not in [line[4:] for line in later] and len(later) == len(
        [line for line in lines if line.startswith("id: ")]) - 1
    for name in ("../../etc/passwd", "problem.npz", "nope"):
        assert api.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=AUTH).status_code == 404
    samples = metric_samples(api)
    assert samples["qsurgeon_jobs", (("state", "succeeded"),)] == 1
    assert samples["qsurgeon_blocks_solved_total", ()] == 1 and samples["qsurgeon_workers", ()] == 1


# ---------------------------------------------------------------------- job requests
def test_unknown_job_is_404(api):
    for job_id in ("0" * 32, "not-a-job", "..%2f..%2fetc"):
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events"), ("GET", "/artifacts/report.json")):
            response = api.request(method, f"/v1/jobs/{job_id}{path}", headers=AUTH)
            assert response.status_code == 404, (method, job_id, path)


@pytest.mark.parametrize("body, status, words", [
    ('{"model": "builtin:minilm", ', 400, "malformed JSON"),
    ('[1, 2]', 400, "JSON object"),
    (json.dumps({"model": "builtin:minilm", "options": {"density": 1.5}}), 422, "options.density: Input should be less than 1"),
    (json.dumps({"model": "builtin:minilm", "options": {"density": "half"}}), 422, "density"),
    (json.dumps({"model": "builtin:minilm", "options": "dense"}), 422, "options"),
    (json.dumps({"model": 7}), 422, "model"),
    (json.dumps({"model": "../../etc"}), 422, "no paths"),
    (json.dumps({"model": "/abs/path"}), 422, "no paths"),
    (json.dumps({"model": "not-there"}), 422, "no model named 'not-there'"),
    (json.dumps({"model": "builtin:minilm", "options": {"out": "/tmp/x"}}), 422, "set by the server"),
    (json.dumps({"model": "builtin:minilm", "options": {"calibration": "/etc/passwd"}}), 422, "set by the server"),
    (json.dumps({"model": "builtin:minilm", "options": {"no_such_option": 1}}), 422, "options.no_such_option: Extra inputs are not permitted"),
    (json.dumps({"model": "builtin:minilm", "options": {"method": "rm -rf"}}), 422, "options.method: Input should be 'icbs'"),
    (json.dumps({"model": "builtin:minilm", "options": {"density": 1}}), 422, "options.density"),
    (json.dumps({"model": "builtin:minilm", "options": {"pattern": "2:0"}}), 422, "options.pattern: 2:0 must keep"),
    (json.dumps({"model": "builtin:minilm", "options": {"seed": -1}}), 422, "options.seed"),
    (json.dumps({"model": "builtin:minilm", "options": {"seed": "abc"}}), 422, "options.seed"),
    (json.dumps({"model": "builtin:minilm", "options": {"samples": 1e9}}), 422, "options.samples"),
    (json.dumps({"model": "builtin:minilm", "options": {"epochs": 1e6}}), 422, "options.epochs"),
    (json.dumps({"model": "builtin:minilm", "options": {"block_size": 1e6}}), 422, "options.block_size"),
    (json.dumps({"model": "builtin:minilm", "options": {"solver_params": "x"}}), 422, "options.solver_params"),
    (json.dumps({"model": "builtin:minilm", "options": {"epochs": "2"}}), 422, "epochs"),
    (json.dumps({"model": "upload"}), 422, "model_archive"),
    (json.dumps({"model": "builtin:minilm", "surprise": True}), 422, "surprise"),
])
def test_bad_job_requests_are_4xx_and_store_nothing(api, config, body, status, words):
    response = api.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert nothing_stored(api, config)


def test_oversize_bodies_are_413(api, config):
    big = json.dumps({"model": "builtin:minilm", "options": {"include": ["x" * 200_000]}})
    assert api.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=big).status_code == 413
    archive = tar_bytes({"model/config.json": b"{}", "model/model.safetensors": os.urandom(300_000)})
    response = api.post("/v1/jobs", headers=AUTH, data={"spec": json.dumps({"model": "upload"})},
                        files={"model_archive": ("m.tar", archive, "application/octet-stream")})
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    assert nothing_stored(api, config)


def test_hostile_archives_are_refused_and_leave_nothing(api, config):
    cases = {
        "dotdot": (tar_bytes({"model/config.json": b"{}", "../x.safetensors": b"x"}), "'..'"),
        "absolute": (tar_bytes({"/etc/x.json": b"{}"}), "absolute"),
        "symlink": (tar_bytes({"model/config.json": b"{}"}, links={"model/w.safetensors": "/etc/passwd"}), "link"),
        "pickle": (tar_bytes({"model/config.json": b"{}", "model/pytorch_model.bin": b"x"}), "only safetensors"),
        "zip-dotdot": (zip_bytes({"../evil.json": b"{}"}), "'..'"),
        "no-weights": (tar_bytes({"model/config.json": b"{}"}), "no .safetensors"),
        "garbage": (b"this is not an archive at all" * 10, "neither a tar nor a zip"),
    }
    for name, (archive, words) in cases.items():
        response = api.post("/v1/jobs", headers=AUTH, data={"spec": json.dumps({"model": "upload"})},
                            files={"model_archive": (f"{name}.tar", archive, "application/octet-stream")})
        assert response.status_code == 422, (name, response.text)
        assert words in response.json()["detail"], (name, response.json())
    assert nothing_stored(api, config)
    assert not (config.data_dir.parent / "x.safetensors").exists()


def test_valid_upload_is_extracted_into_the_job(config, tmp_path):
    archive = tmp_path / "m.zip"
    archive.write_bytes(zip_bytes({"mini/config.json": b"{}", "mini/model.safetensors": tiny_safetensors(),
                                   "mini/tokenizer.json": b"{}", "mini/.gitattributes": b"x",
                                   "mini/.cache/evil.bin": b"pickle"}))
    store = JobStore(connect(REDIS_URL), config.queue.prefix)
    job = create_job(config, store, JobCreate(model="upload", calibration="upload", options={"density": 0.4}),
                     archive=archive, calibration_text="one sentence\nanother one\n".encode())
    spec = store.spec(job.id)
    model = Path(spec["model_path"])
    assert model == (config.jobs_dir / job.id / "model" / "mini").resolve()
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert Path(spec["calibration"]).read_text() == "one sentence\nanother one\n"
    assert store.get(job.id).options == {"density": 0.4} and store.get(job.id).state.value == "queued"
    with pytest.raises(UsageError, match="empty"):
        create_job(config, store, JobCreate(model="builtin:minilm", calibration="upload"), calibration_text=b"  \n")
    with pytest.raises(UsageError, match="UTF-8"):
        create_job(config, store, JobCreate(model="builtin:minilm", calibration="upload"),
                   calibration_text=b"\xff\xfe\xfa")
    assert [p.name for p in config.jobs_dir.iterdir()] == [job.id]


def test_models_folder_names_resolve_inside_it_only(config):
    (config.models_dir / "tiny").mkdir()
    assert model_path_for_request(config, "tiny") == str(config.models_dir / "tiny")
    assert model_path_for_request(config, "builtin:minilm") == "builtin:minilm"
    outside = config.models_dir.parent / "secret"
    outside.mkdir()
    (config.models_dir / "link").symlink_to(outside)
    for name in ("secret", "link", "nope"):
        with pytest.raises(UsageError):
            model_path_for_request(config, name)


def test_extract_rejects_bombs(tmp_path):
    archive = tmp_path / "big.tar"
    archive.write_bytes(tar_bytes({"m/config.json": b"{}", "m/a.safetensors": b"0" * 5000}))
    with pytest.raises(ArchiveError, match="more than 1000 bytes"):
        extract_model_archive(archive, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists()


def test_openapi_documents_the_routes(api):
    schema = api.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/artifacts/{name}",
                 "/v1/solve", "/v1/solvers", "/healthz", "/readyz", "/v1/metrics"):
        assert path in paths, path
    content = paths["/v1/jobs"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert "JobCreate" in schema["components"]["schemas"]


def test_options_lists_what_a_job_may_set_with_bounds(api):
    options = api.get("/v1/options", headers=AUTH).json()
    assert set(options) == set(JobOptions.model_fields)
    assert not {"model", "out", "calibration", "export_blocks"} & set(options)
    assert options["epochs"]["default"] == 1 and options["solver"]["default"] == "auto"
    assert options["block_size"] | {"default": 128, "type": "integer", "minimum": 2, "maximum": 4096} == \
        options["block_size"]
    density = options["density"]  # optional: the bounds of its number, and nullable
    assert density["default"] is None and density["nullable"] is True and density["type"] == "number"
    assert (density["exclusiveMinimum"], density["exclusiveMaximum"]) == (0.0, 1.0)
    assert options["method"]["enum"] == list(get_args(JobOptions.model_fields["method"].annotation))
    assert {"icbs", "wanda"} <= set(options["method"]["enum"])
    assert options["include"]["maxItems"] == 64 and "nullable" not in options["include"]
    assert all(item["description"] for item in options.values())


def test_openapi_shows_every_option_with_its_bounds(api):
    schema = api.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    job_options = components["JobOptions"]
    assert set(job_options["properties"]) == set(JobOptions.model_fields)
    assert job_options["properties"]["block_size"]["maximum"] == 4096
    assert job_options["additionalProperties"] is False
    assert components["JobCreate"]["properties"]["options"]["$ref"] == "#/components/schemas/JobOptions"
    text = json.dumps(schema)  # every reference in the document resolves
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)):
        assert ref in components, ref


@pytest.mark.parametrize("options, words", [
    ({"block_size": 5000}, "options.block_size: Input should be less than or equal to 4096"),
    ({"block_size": 1}, "options.block_size: Input should be greater than or equal to 2"),
    ({"density": 0.0}, "options.density: Input should be greater than 0"),
    ({"exclude": ["x"] * 65}, "options.exclude: List should have at most 64 items"),
])
def test_a_bound_violated_is_422_naming_the_field_json_and_multipart(api, config, options, words):
    spec = json.dumps({"model": "builtin:minilm", "calibration": "upload", "options": options})
    as_json = api.post("/v1/jobs", headers={**AUTH, "Content-Type": "application/json"}, content=spec)
    as_multipart = api.post("/v1/jobs", headers=AUTH, data={"spec": spec},  # a file part makes it multipart
                            files={"calibration": ("c.txt", b"one sample\n", "text/plain")})
    assert as_multipart.request.headers["content-type"].startswith("multipart/form-data")
    for response in (as_json, as_multipart):
        assert response.status_code == 422, response.text
        assert words in response.json()["detail"]
    assert nothing_stored(api, config)


def test_only_dependencies_read_the_app_state():
    """Routes name what they need (dependencies.py); none digs in request.app.state itself."""
    api_dir = Path(create_app.__code__.co_filename).parent
    readers = sorted(str(path.relative_to(api_dir)) for path in api_dir.rglob("*.py")
                     if "app.state" in path.read_text() and path.name not in ("dependencies.py", "app.py"))
    assert readers == []


# ---------------------------------------------------------------------- metrics
def metric_samples(api: TestClient) -> dict[tuple[str, tuple], float]:
    """/v1/metrics parsed by prometheus_client's own parser: (sample name, labels) -> value."""
    response = api.get("/v1/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_parse_and_large_counters_keep_every_digit(api, config):
    client = connect(REDIS_URL)
    client.hset(f"{config.queue.prefix}:stats", mapping={"blocks_queued": 1234567, "blocks_solved": 987654321,
                                                         "solve_seconds": 12.5})
    samples = metric_samples(api)
    assert samples["qsurgeon_blocks_queued_total", ()] == 1234567
    assert samples["qsurgeon_blocks_solved_total", ()] == 987654321
    assert samples["qsurgeon_solve_seconds_total", ()] == 12.5
    assert samples["qsurgeon_blocks_dead_total", ()] == 0
    job_states = {dict(labels)["state"] for name, labels in samples if name == "qsurgeon_jobs"}
    assert job_states == {state.value for state in JobState}
    assert samples["qsurgeon_jobs_running_here", ()] == 0 and samples["qsurgeon_workers", ()] == 0


def test_each_app_has_its_own_metrics_registry(api, config, tmp_path):
    """Two apps in one process (two prefixes) report their own queues; nothing global is registered."""
    other = ServiceConfig(data_dir=tmp_path / "other", redis_url=REDIS_URL, api_keys=frozenset({KEY}),
                          queue=QueueSettings(prefix=f"{config.queue.prefix}-other"))
    client = connect(REDIS_URL)
    client.hset(f"{config.queue.prefix}:stats", "blocks_failed", 3)
    client.hset(f"{other.queue.prefix}:stats", "blocks_failed", 5)
    try:
        with TestClient(create_app(other)) as second:
            assert metric_samples(second)["qsurgeon_blocks_failed_total", ()] == 5
        assert metric_samples(api)["qsurgeon_blocks_failed_total", ()] == 3
    finally:
        client.delete(f"{other.queue.prefix}:stats")
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("qsurgeon")]


def test_solvers_lists_capabilities(api):
    names = {item["name"]: item for item in api.get("/v1/solvers", headers=AUTH).json()}
    assert names["exhaustive"]["exact"] is True and names["exhaustive"]["max_variables"] == 24


# ---------------------------------------------------------------------- helpers
def tar_bytes(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tiny_safetensors() -> bytes:
    """A valid safetensors file holding one 2×2 float32 tensor."""
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)

"""MLflow tracking against real backends: SQLite files, a local ``mlflow server``, dead and hanging ports."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypertrain.tracking import (
    HTTP_ENV_DEFAULTS,
    MAX_PARAM_VALUE,
    Tracker,
    default_tags,
    model_flops_utilization,
    open_client,
)

mlflow = pytest.importorskip("mlflow")
MlflowClient = mlflow.MlflowClient


@pytest.fixture(autouse=True)
def _clean_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No telemetry, no inherited tracking URI, and the tracker's HTTP defaults undone after each test."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_URI", *HTTP_ENV_DEFAULTS):
        monkeypatch.setenv(name, "x")  # records the original state, restored at teardown
        monkeypatch.delenv(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


# --------------------------------------------------------------------------------------------------
# A real local tracking server, booted in the background while the SQLite tests run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    exe = shutil.which("mlflow", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if exe is None:
        pytest.skip("the mlflow CLI is not installed")
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_file = open(root / "server.log", "wb")  # noqa: SIM115 - closed in the finaliser
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and its uvicorn child: the group we started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        log_file.close()


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"mlflow server at {url} did not answer within {timeout} s")


# --------------------------------------------------------------------------------------------------
# SQLite in the run directory
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory (so one SQLite database to create) shared by the SQLite tests."""
    return tmp_path_factory.mktemp("run")


def test_sqlite_params_tags_metrics_artifacts(run_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"shards": 3}')
    shard_dir = tmp_path / "manifests"
    (shard_dir / "sub").mkdir(parents=True)
    (shard_dir / "sub" / "a.json").write_text("{}")
    params = {
        "train": {"lr": 5e-5, "global_batch_size": 256},
        "model": {"name": "tiny", "dtype": "auto"},
        "pha": {"tasks": ["t1", "t2"]},
        "note": "x" * (MAX_PARAM_VALUE + 10),
    }
    tags = default_tags(method="hart", model="tiny", datasets=["sni", "p3"], world_size=8)

    tracker = Tracker(run_dir, run_name="first", flush_interval=0.05, start_timeout=120)
    assert tracker.tracking_uri == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
    run_id = tracker.start(params, tags)
    assert run_id is not None and tracker.run_id == run_id
    for name, value in HTTP_ENV_DEFAULTS.items():
        assert os.environ[name] == value
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "loss/lm": 0.5, "lr": 1e-4, "skip": None}, step=step)
    tracker.log_artifact(manifest, artifact_path="manifests")
    tracker.log_artifact(shard_dir)
    manifest.write_text("changed after the call")  # the tracker copied the file at call time
    tracker.log_dict({"train_batch_size": 256, "zero_optimization": {"stage": 2}}, "ds_config.json")
    tracker.log_dict({"a": [1, 2]}, "configs/resolved.yaml")
    tracker.set_tags({"phase": "train"})
    tracker.close()
    assert tracker.dropped == 0

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["train.lr"] == "5e-05" and run.data.params["model.name"] == "tiny"
    assert run.data.params["train.global_batch_size"] == "256"
    assert run.data.params["pha.tasks"] == '["t1","t2"]'
    assert len(run.data.params["note"]) == MAX_PARAM_VALUE
    assert run.data.tags["method"] == "hart" and run.data.tags["datasets"] == "sni,p3"
    assert run.data.tags["world_size"] == "8" and run.data.tags["phase"] == "train"
    assert _metric_steps(client, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert [s for s, _ in _metric_steps(client, run_id, "loss/lm")] == list(range(5))
    assert "skip" not in run.data.metrics
    assert {"ds_config.json", "configs", "manifests", "params_full.json"} <= _artifacts(client, run_id)
    local = Path(client.download_artifacts(run_id, "manifests/manifest.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == {"shards": 3}
    assert _artifacts(client, run_id, "manifests") >= {"manifests/manifest.json", "manifests/sub"}
    full = json.loads(Path(client.download_artifacts(run_id, "params_full.json", str(tmp_path / "dl"))).read_text())
    assert len(full["note"]) == MAX_PARAM_VALUE + 10
    assert (run_dir / "mlartifacts").is_dir(), "SQLite artifacts live beside the database, not in the cwd"
    assert not (run_dir / ".mlflow_staging").exists()


def test_resume_continues_run_and_keeps_params(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = Tracker(run_dir, flush_interval=0.05, start_timeout=120)
    run_id = first.start({"train": {"lr": 1e-4, "total_steps": 10}}, {"method": "hart"})
    for step in range(3):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close(status="KILLED")
    client = MlflowClient(first.tracking_uri)
    assert client.get_run(run_id).info.status == "KILLED"

    second = Tracker(run_dir, run_id=run_id, flush_interval=0.05, start_timeout=120)
    assert second.run_id == run_id
    with caplog.at_level(logging.WARNING, logger="hypertrain.tracking"):
        assert second.start({"train": {"lr": 2e-4, "total_steps": 10, "seed": 1}}, {"method": "hart"}) == run_id
        assert client.get_run(run_id).info.status == "RUNNING"
        for step in range(3, 6):
            second.log_metrics({"loss": float(step)}, step=step)
        second.close()
    assert "train.lr" in caplog.text and "immutable" in caplog.text

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _metric_steps(client, run_id, "loss") == [(s, float(s)) for s in range(6)]
    assert run.data.params["train.lr"] == "0.0001"  # immutable: the first value stays
    assert run.data.params["train.seed"] == "1"  # new params are added
    changes = sorted(_artifacts(client, run_id, "param_changes"))
    assert len(changes) == 1
    recorded = client.download_artifacts(run_id, changes[0])
    assert json.loads(Path(recorded).read_text()) == {"train.lr": {"logged": "0.0001", "now": "0.0002"}}


def test_resume_of_unknown_run_starts_a_new_one(run_dir: Path) -> None:
    tracker = Tracker(run_dir, run_id="0123456789abcdef0123456789abcdef")
    new_id = tracker.start({"a": 1}, {})
    tracker.close()
    assert new_id is not None and new_id != "0123456789abcdef0123456789abcdef"
    run = MlflowClient(tracker.tracking_uri).get_run(new_id)
    assert run.data.tags["hypertrain.resumed_from_missing_run"] == "0123456789abcdef0123456789abcdef"


def _open_and_log(uri: str) -> str:
    client = open_client(uri)
    try:
        experiment_id = client.create_experiment("race")
    except mlflow.exceptions.MlflowException:  # another process made it first
        experiment_id = client.get_experiment_by_name("race").experiment_id
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 1.0, step=0)
    return run.info.run_id


def test_jobs_opening_a_new_sqlite_store_at_once_all_get_it(tmp_path: Path) -> None:
    """Without the lock, MLflow's table creation races (3 of 3 tries failed with 4 processes)."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        run_ids = pool.map(_open_and_log, [uri] * 4)
    assert len(set(run_ids)) == 4
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids)


def test_tracking_uri_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    assert Tracker(tmp_path).tracking_uri == "sqlite:////somewhere/else.db"
    assert Tracker(tmp_path, tracking_uri="http://h:1").tracking_uri == "http://h:1"


def test_disabled_tracker_is_a_no_op(tmp_path: Path) -> None:
    threads = threading.active_count()
    tracker = Tracker(tmp_path / "rank3", enabled=False)
    assert tracker.start({"a": 1}, {"b": "c"}) is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_artifact(__file__)
    tracker.log_dict({"a": 1}, "x.json")
    tracker.set_tags({"b": "d"})
    tracker.close()
    assert tracker.run_id is None and tracker.dropped == 0
    assert not (tmp_path / "rank3").exists()
    assert threading.active_count() == threads


# --------------------------------------------------------------------------------------------------
# Unreachable servers: training must not notice
# --------------------------------------------------------------------------------------------------


def test_dead_server_never_blocks_or_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    tracker = Tracker(tmp_path, tracking_uri=uri, start_timeout=120, max_buffer=100)
    with caplog.at_level(logging.WARNING, logger="hypertrain.tracking"):
        begin = time.monotonic()
        assert tracker.start({"a": 1}, {"b": "c"}) is None
        starting = time.monotonic() - begin
        begin = time.monotonic()
        for step in range(200):
            tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
        tracker.log_dict({"a": 1}, "x.json")
        logged = time.monotonic() - begin
        begin = time.monotonic()
        tracker.close(timeout=5)
        closing = time.monotonic() - begin
    assert starting < 60, "start() returns once the first attempt fails, not after start_timeout"
    assert logged < 5.0, "log_metrics must only append to a buffer"
    assert closing < 5 + 3.0
    assert tracker.run_id is None
    assert tracker.dropped == 400  # 300 pushed out of the 100-row buffer + 100 never sent
    failures = [r for r in caplog.records if "failed" in r.getMessage() and uri in r.getMessage()]
    assert 1 <= len(failures) <= 3, "failure warnings are rate-limited, not one per call"
    assert "400 metric rows" in caplog.text
    assert not (tmp_path / "mlflow.db").exists()


def test_hanging_server_close_returns_within_timeout(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts TCP connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tracker = Tracker(tmp_path, tracking_uri=uri, start_timeout=0.5)
        begin = time.monotonic()
        assert tracker.start({"a": 1}, {}) is None
        for step in range(10):
            tracker.log_metrics({"loss": 1.0}, step=step)
        tracker.close(timeout=2)
        elapsed = time.monotonic() - begin
    assert elapsed < 0.5 + 2 + 3.0
    assert tracker.dropped == 10


# --------------------------------------------------------------------------------------------------
# A real tracking server
# --------------------------------------------------------------------------------------------------


def test_local_mlflow_server_receives_metrics(
    mlflow_server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, proc = mlflow_server
    _wait_until_up(url, proc)
    tracker = Tracker(tmp_path, tracking_uri=url, experiment="server-test", flush_interval=0.05, start_timeout=120)
    run_id = tracker.start({"train": {"lr": 0.1}}, {"method": "pha"})
    assert run_id is not None
    for step in range(20):
        tracker.log_metrics({"loss": 2.0 - step / 10, "samples_per_s": 100.0}, step=step)
    tracker.log_dict({"stage": 3}, "ds_config.json")
    tracker.close(timeout=30)
    assert tracker.dropped == 0
    client = MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.1"
    assert run.data.tags["method"] == "pha"
    assert [s for s, _ in _metric_steps(client, run_id, "loss")] == list(range(20))
    assert "ds_config.json" in _artifacts(client, run_id)
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------------
# Tags and helpers
# --------------------------------------------------------------------------------------------------


def test_default_tags_git_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    tags = default_tags(method="hart", model="xl", datasets=["sni"], world_size=16)
    assert tags["slurm_job_id"] == "4242" and tags["slurm_array_task_id"] == "3"
    assert "slurm_array_job_id" not in tags
    assert tags["method"] == "hart" and tags["world_size"] == "16" and tags["hostname"]
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") and (repo / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
        assert tags["git_commit"] == head and tags["git_dirty"] in ("true", "false")
    monkeypatch.setenv("PATH", "")  # no git at all: no tag, no error
    assert "git_commit" not in default_tags(method="hart", model="xl", datasets=[], world_size=1)


def test_mfu() -> None:
    assert model_flops_utilization(3e15, 10.0, 1, 1e15) == pytest.approx(0.3)
    assert model_flops_utilization(1e15, 0.0, 8, 1e15) == 0.0


def test_inputs_and_the_experiment_description_reach_mlflow(run_dir: Path, tiny_data: Path) -> None:
    from hypertrain.run_record import dataset_inputs

    evals = run_dir.parent / "eval_set"
    shutil.copytree(tiny_data, evals)
    tracker = Tracker(run_dir, experiment="described", experiment_description="what these runs are")
    run_id = tracker.start({"a": 1}, {"mlflow.note.content": "one line"})
    tracker.log_inputs(dataset_inputs([tiny_data], [evals / "manifest.json", run_dir / "missing"]))
    tracker.close()
    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.note.content"] == "one line"
    contexts = sorted({t.value for d in run.inputs.dataset_inputs for t in d.tags})
    assert contexts == ["eval", "training"] and len(run.inputs.dataset_inputs) == 2  # the missing one is skipped
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.note.content"] == "what these runs are"
    client.set_experiment_tag(run.info.experiment_id, "mlflow.note.content", "the user's own note")
    again = Tracker(run_dir, experiment="described", experiment_description="what these runs are")
    again.start({}, {})
    again.close()
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.note.content"] == "the user's own note"
    assert again.experiment_id == run.info.experiment_id


def test_run_records_describe_each_method_and_keep_only_its_sections() -> None:
    from hypertrain.config import Config, load_config
    from hypertrain.run_record import compare_link, run_description, runs_link, source_tags, used_params

    repo = Path(__file__).resolve().parents[1]
    hypertuning = load_config(Config, repo / "configs" / "hart_tiny.yaml", ["method=hypertuning", "hart.generator=parallel",
                                                                                 "hart.alpha=0.0"])
    line = run_description(hypertuning, ["/d/sni/train"])
    assert line.startswith("HyperTuning: HART's code with generator=parallel") and "alpha=0" in line
    assert "data sni/train" in line
    pha = load_config(Config, repo / "configs" / "pha_tiny.yaml", [])
    assert set(used_params(pha)) == {"method", "model", "data", "train", "eval", "run", "pha"}
    assert "hart" not in used_params(pha) and "sni_prep" not in used_params(hypertuning)
    tags = source_tags([str(Path.cwd() / "hypertrain" / "main.py"), "--config", "a b.yaml", "run.dir=runs/hart"])
    assert tags["mlflow.source.name"] == "hypertrain/main.py"  # the UI shows its last part: main.py
    assert tags["hypertrain.command"].endswith("main.py --config 'a b.yaml' run.dir=runs/hart")
    assert runs_link("http://u:pw@host:5000/", "3") == "http://***@host:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert compare_link("sqlite:///x.db", ["1"], ["ab"]).startswith("http://127.0.0.1:5000/#/compare-runs?runs=%5B%22ab")

"""The trainer under the faults a shared cluster produces, through the real launcher on CPU: lost ``latest``,
explicit fresh starts, damaged shards, crashes, a tracking backend that is down at start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_prep.shards import read_manifest
from tests.test_input_checks import rewrite_member
from tests.test_trainer import finish, latest_tag, launch, log_tail, metrics


def mlflow_runs(uri: str, experiment: str = "hypertrain"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def sqlite_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir}/mlflow.db"


def test_lost_latest_falls_back_and_fresh_starts_must_be_explicit(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    common = ["run.checkpoint_every=2", "run.keep_last=2"]
    assert finish(launch(run_dir, tiny_data, "train.total_steps=6", *common, ranks=1), run_dir) == 0, log_tail(run_dir)
    (run_dir / "checkpoints" / "latest").unlink()

    # latest lost: resume from the newest checkpoint that verifies, say so, record it, one MLflow run
    assert finish(launch(run_dir, tiny_data, "train.total_steps=8", *common, ranks=1), run_dir) == 0, log_tail(run_dir)
    assert "latest is missing; resuming from step-00000006" in log_tail(run_dir, 200)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))
    client, runs = mlflow_runs(sqlite_uri(run_dir))
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "latest is missing" in runs[0].data.tags["hypertrain.resume_fallback"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000006", "step-00000008"]

    # run.resume=never over checkpoints: refused, nothing touched
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    code = finish(launch(run_dir, tiny_data, "train.total_steps=8", "run.resume=never", *common, ranks=1), run_dir)
    assert code == 2
    assert "already holds checkpoints (newest step-00000008)" in log_tail(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before

    # run.resume=restart: the old attempt is set aside, the new one starts at 0 and keeps its own checkpoints
    code = finish(launch(run_dir, tiny_data, "train.total_steps=2", "run.resume=restart", *common, ranks=1), run_dir)
    assert code == 0, log_tail(run_dir)
    (previous,) = (run_dir / "previous").iterdir()
    assert (previous / "checkpoints" / "step-00000008").is_dir() and (previous / "metrics.jsonl").is_file()
    assert latest_tag(run_dir) == "step-00000002" and sorted(metrics(run_dir)) == [1, 2]
    _, runs = mlflow_runs(sqlite_uri(run_dir))
    assert len(runs) == 2


def test_a_damaged_shard_stops_the_run_before_training(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / read_manifest(data)["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 1
    shard.write_bytes(bytes(raw))
    run_dir = tmp_path / "run"
    assert finish(launch(run_dir, data, "train.total_steps=4"), run_dir) == 2
    assert f"{shard}: sha256 differs from the manifest" in log_tail(run_dir)
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "checkpoints").exists()


def test_a_crash_ends_the_mlflow_run_failed_and_names_the_member(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = data / read_manifest(data)["shards"][0]["file"]
    member = rewrite_member(shard, 5, b'{"id": "broken", ')
    run_dir = tmp_path / "run"
    code = finish(launch(run_dir, data, "train.total_steps=4", "data.verify_shards=none", ranks=1), run_dir)
    assert code == 2, log_tail(run_dir)
    assert f"{shard}: member {member}: not a valid episode" in log_tail(run_dir, 80)
    _, runs = mlflow_runs(sqlite_uri(run_dir))
    assert len(runs) == 1 and runs[0].info.status == "FAILED"


def test_a_backend_down_at_start_still_gives_one_run_with_every_step(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    store = tmp_path / "store"
    store.write_text("a file where the store's directory should be: the sqlite backend cannot open")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    steps = ["run.checkpoint_every=2", "run.tracking_flush_timeout=2"]
    code = finish(launch(run_dir, tiny_data, "train.total_steps=4", *steps, ranks=1, env=env), run_dir)
    assert code == 0, log_tail(run_dir)
    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "hypertrain_state.json").read_text())
    assert state["mlflow_run_id"] is None  # the backend never answered during the first attempt

    store.unlink()
    store.mkdir()  # the backend is back
    code = finish(launch(run_dir, tiny_data, "train.total_steps=6", *steps, ranks=1, env=env), run_dir)
    assert code == 0, log_tail(run_dir)
    client, runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # every step exactly once (MLflow does not promise the order of a history: backfilled steps can come back
    # after later ones)
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == list(range(1, 7))
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == runs[0].info.run_id


def _wait_steps(run_dir: Path, count: int, process) -> None:
    from tests.test_trainer import wait_for

    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= count, 240,
             f"{count} steps", process, run_dir)


def test_sigterm_to_the_node_launcher_ends_in_a_checkpoint_with_workers_alive(tiny_data, tmp_path):
    # DeepSpeed's per-node launcher terminates every process under it, loader workers included: the workers leave
    # the signal to their rank, which finishes its step and checkpoints inside the launcher's 30 s grace period.
    import psutil

    run_dir = tmp_path / "run"
    process = launch(run_dir, tiny_data, "train.total_steps=100000", "run.checkpoint_every=100000",
                     "data.num_workers=2")
    _wait_steps(run_dir, 3, process)
    (node_launcher,) = [p for p in psutil.Process(process.pid).children(recursive=True)
                        if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    node_launcher.terminate()
    code = finish(process, run_dir, timeout=120)
    assert code == 1  # DeepSpeed's launcher exits 1 after forwarding a SIGTERM, whatever the ranks did (docs)
    log = log_tail(run_dir, 400)
    assert "killed by signal" not in log, log
    tag = latest_tag(run_dir)
    assert tag is not None, f"no checkpoint after the launcher's SIGTERM:\n{log}"
    state = json.loads((run_dir / "checkpoints" / tag / "hypertrain_state.json").read_text())
    assert state["reason"] == "signal SIGTERM" and state["step"] == max(metrics(run_dir))
    _, runs = mlflow_runs(sqlite_uri(run_dir))
    assert runs[0].info.status == "KILLED"


def test_hypertrain_stop_checkpoints_and_every_launcher_exits_zero(tiny_data, tmp_path):
    from hypertrain.cli import main as cli_main
    from hypertrain.stop import STOP_FILE

    assert cli_main(["stop", str(tmp_path / "nowhere")]) == 2
    run_dir = tmp_path / "run"
    process = launch(run_dir, tiny_data, "train.total_steps=100000", "run.checkpoint_every=100000")
    _wait_steps(run_dir, 3, process)
    assert cli_main(["stop", str(run_dir)]) == 0
    assert finish(process, run_dir, timeout=120) == 0, log_tail(run_dir)
    state = json.loads((run_dir / "checkpoints" / latest_tag(run_dir) / "hypertrain_state.json").read_text())
    assert state["reason"] == "stop request" and state["step"] == max(metrics(run_dir))
    assert not (run_dir / STOP_FILE).exists()  # resuming is the same command, and does not stop at once
    _, runs = mlflow_runs(sqlite_uri(run_dir))
    assert runs[0].info.status == "KILLED"

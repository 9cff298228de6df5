"""The trainer through the real `deepspeed` launcher: 2 CPU ranks (gloo), ZeRO-2/3, 8-bit Adam, real shards.

Each launch starts real processes (about 15-30 s on 2 cores), so the scenarios share launches where they can.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(run_dir: Path, data: Path, *overrides: str, ds_config: str = "zero2.json", ranks: int = 2,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `deepspeed hypertrain/main.py` with the tiny HART config on CPU (a new process group).

    One rank runs `python hypertrain/main.py` itself (a group of one, as a user's plain run): the launcher's two
    extra interpreters cost about 7 s a launch, and the multi-rank tests cover the launcher.
    """
    launcher = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    command = [
        *(launcher if ranks > 1 else [sys.executable]),
        "hypertrain/main.py", "--config", "configs/hart_tiny.yaml", "--ds_config", f"ds_configs/{ds_config}",
        f"data.train=[{data}]", f"run.dir={run_dir}", "run.log_every=1", "data.num_workers=1",
        "train.optimizer=adamw8bit", "train.global_batch_size=8", "train.micro_batch_size=4", *overrides,
    ]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # default: sqlite in run.dir
    full_env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})})
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"run did not finish in {timeout}s:\n{log_tail(run_dir)}") from None


def log_tail(run_dir: Path, lines: int = 40) -> str:
    path = run_dir.parent / f"{run_dir.name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step rows of rank 0's metrics.jsonl; a step logged twice (before a crash and after resume) keeps the last."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run exited ({process.returncode}) before {what}:\n{log_tail(run_dir)}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}:\n{log_tail(run_dir)}")
        time.sleep(0.05)


def latest_tag(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("hypertrain")
    return client, client.search_runs([experiment.experiment_id])


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A local pretrained-style checkpoint (config.json + safetensors + tokenizer) of the tiny shape."""
    from hypertrain.models.registry import build_t5, load_tokenizer

    path = tmp_path_factory.mktemp("tiny_checkpoint")
    build_t5("tiny", device="cpu", seed=0).save_pretrained(path)
    load_tokenizer("byt5").save_pretrained(path)
    return path


def check_finished_run(run_dir: Path, steps: int) -> None:
    """Loss went down, the last checkpoint is complete, MLflow holds params, tags, per-step metrics, artifacts."""
    rows = metrics(run_dir)
    assert sorted(rows) == list(range(1, steps + 1))
    first, last = sum(rows[s]["loss"] for s in (1, 2, 3)) / 3, sum(rows[s]["loss"] for s in range(steps - 2, steps + 1)) / 3
    assert last < 0.7 * first, (first, last)
    assert latest_tag(run_dir) == f"step-{steps:08d}"
    checkpoint = run_dir / "checkpoints" / f"step-{steps:08d}"
    state = json.loads((checkpoint / "hypertrain_state.json").read_text())
    assert state["step"] == steps and state["batches_consumed"] == steps and state["world_size"] == 2
    assert sorted(p.name for p in checkpoint.glob("rank*.safetensors")) == ["rank00000.safetensors", "rank00001.safetensors"]
    assert (checkpoint / "trainable.safetensors").is_file()

    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer"] == "adamw8bit" and run.data.params["method"] == "hart"
    assert run.data.tags["world_size"] == "2" and run.data.tags["method"] == "hart"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, steps + 1))
    assert {"opt/lr", "opt/grad_norm", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_s", "train/loss/lm",
            "train/loss/consistency"} <= set(run.data.metrics)
    assert run.data.tags["hypertrain.metric_names"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"deepspeed_config.json", "manifests", "config.yaml", "command.json"} <= artifacts
    # what the run says about itself (issue 19): description, who and how, datasets, only the sections it uses
    tags = run.data.tags
    assert tags["mlflow.note.content"].startswith("HART: the hypernetwork decodes") and f"; {steps} steps, batch 8" in tags[
        "mlflow.note.content"]
    assert tags["mlflow.source.name"] == "hypertrain/main.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["hypertrain.command"].startswith("hypertrain/main.py --local_rank=0 --config")
    assert tags["mlflow.user"]
    assert not any(k.startswith(("sni_prep.", "p3_prep.", "c4_prep.", "pha.", "lora.")) for k in run.data.params)
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name.startswith("sni/test:") and {t.key: t.value for t in dataset.tags} == {
        "mlflow.data.context": "training"}
    assert json.loads(dataset.dataset.profile)["episodes"] == 8
    experiment = client.get_experiment(run.info.experiment_id)
    assert "`train/loss/lm`" in experiment.tags["mlflow.note.content"]
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)


def test_zero3_loads_partitioned_and_trains(tiny_data, tiny_checkpoint, tmp_path):
    # The main model comes from a local checkpoint: from_pretrained partitions it at load (HfDeepSpeedConfig),
    # and the hypernetwork's copy of it must gather the weights first.
    run_dir = tmp_path / "run"
    code = finish(launch(run_dir, tiny_data, "train.total_steps=30", "run.checkpoint_every=100",
                         f"model.name={tiny_checkpoint}", ds_config="zero3.json"), run_dir)
    assert code == 0, log_tail(run_dir)
    check_finished_run(run_dir, 30)


def test_compiled_decode_trains_under_zero2(tiny_data, tmp_path):
    # hart.compile_decode inside the DeepSpeed engine (ZeRO-2 gradient hooks, 8-bit Adam), fixed shapes
    run_dir = tmp_path / "run"
    code = finish(launch(run_dir, tiny_data, "train.total_steps=30", "run.checkpoint_every=100",
                         "hart.compile_decode=default", "data.pad_to_max=true"), run_dir, timeout=600)
    assert code == 0, log_tail(run_dir)
    check_finished_run(run_dir, 30)


def test_kill9_then_resume_reproduces_the_uninterrupted_losses(tiny_data, tmp_path):
    steps = ["train.total_steps=24", "run.checkpoint_every=6", "train.warmup_steps=3"]
    reference = tmp_path / "reference"  # ZeRO-2, 8-bit Adam, uninterrupted
    assert finish(launch(reference, tiny_data, *steps), reference) == 0, log_tail(reference)
    check_finished_run(reference, 24)

    crashed = tmp_path / "crashed"
    process = launch(crashed, tiny_data, *steps)
    wait_for(lambda: latest_tag(crashed) == "step-00000012", 240, "the step-12 checkpoint", process, crashed)
    os.killpg(process.pid, signal.SIGKILL)  # no warning, no checkpoint: like a node failure
    process.wait()
    assert finish(launch(crashed, tiny_data, *steps), crashed) == 0, log_tail(crashed)

    expected, resumed = metrics(reference), metrics(crashed)
    assert sorted(resumed) == list(range(1, 25))
    for step in range(13, 25):  # recomputed after the restart: bitwise equal on CPU
        assert resumed[step]["loss"] == expected[step]["loss"], step
        assert resumed[step]["grad_norm"] == expected[step]["grad_norm"], step
        assert resumed[step]["lr"] == expected[step]["lr"], step

    steps_in_file = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps_in_file == list(range(1, 25)), "steps computed again after the resume are recorded once"
    client, runs = mlflow_runs(crashed)
    assert len(runs) == 1, "the resumed run must continue the same MLflow run"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == list(range(1, 25))


def test_sigterm_checkpoints_and_exits_zero(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    process = launch(run_dir, tiny_data, "train.total_steps=100000", "run.checkpoint_every=100000")
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3, 240,
             "three steps", process, run_dir)
    import psutil

    ranks = [  # the training processes (the launcher's own launch.py also names main.py, without --local_rank)
        p for p in psutil.Process(process.pid).children(recursive=True)
        if "hypertrain/main.py" in p.cmdline() and any(a.startswith("--local_rank") for a in p.cmdline())
    ]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGTERM)  # one rank is told; all must agree on the same step
    assert finish(process, run_dir, timeout=120) == 0, log_tail(run_dir)
    tag = latest_tag(run_dir)
    state = json.loads((run_dir / "checkpoints" / tag / "hypertrain_state.json").read_text())
    assert state["reason"].startswith("signal") and tag == f"step-{state['step']:08d}"
    assert state["step"] == max(metrics(run_dir))
    _, runs = mlflow_runs(run_dir)
    assert runs[0].info.status == "KILLED"


def test_dead_tracking_server_does_not_stop_training(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    process = launch(run_dir, tiny_data, "train.total_steps=4", "run.tracking_flush_timeout=3", ranks=1,
                     env={"MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{free_port()}"})
    assert finish(process, run_dir) == 0, log_tail(run_dir)
    assert sorted(metrics(run_dir)) == [1, 2, 3, 4]
    log = log_tail(run_dir, 10_000)
    assert "http://***@127.0.0.1" in log and "s3cret" not in log  # credentials never reach the logs


def test_batch_size_mismatch_is_rejected_before_launch(tiny_data, tmp_path):
    bad = tmp_path / "bad.json"
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    bad.write_text(json.dumps({**config, "train_batch_size": 12}))
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hypertrain.main", "--config", "configs/hart_tiny.yaml", "--ds_config", str(bad),
         f"data.train=[{tiny_data}]", f"run.dir={tmp_path / 'run'}", "train.global_batch_size=8",
         "train.micro_batch_size=4"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 2
    assert "12" in result.stderr and "8" in result.stderr and "4" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - start < 60

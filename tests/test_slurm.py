"""The Slurm job scripts: signal forwarding of ``slurm/lib.sh`` (no Slurm needed), then real jobs on a one-node
cluster (``scripts/slurm_cluster.sh up``) with tiny models on CPU ranks.

On the cluster: ``sbatch slurm/hart_t5xl.sh`` trains 2 ranks to the end through the several-node code path (srun,
one torchrun per node, c10d rendezvous: checkpoint, one finished MLflow run tagged with the job id); a USR1 sent
to the batch shell mid-run on the default one-node (deepspeed) path makes the ranks checkpoint, the job requeues
itself, restarts (``SLURM_RESTART_COUNT=1``), resumes and finishes the same MLflow run; the prep job array merges
after ``afterok``. Those tests skip, with the reason, when Slurm is not installed or no controller answers.
Requeued jobs get a 2-minute BeginTime from Slurm; the tests release it (``scontrol update StartTime=now``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (apt-get install slurm-wlm munge, then: sudo bash scripts/slurm_cluster.sh up)"
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s (is slurmctld running? sudo bash scripts/slurm_cluster.sh up)"
    if result.returncode != 0:
        return f"no Slurm controller answers ({result.stderr.strip()[:200]}); start one: sudo bash scripts/slurm_cluster.sh up"
    states = result.stdout.split()
    if not any(s.rstrip("*~#!%$@^-").split("+")[0] in {"idle", "mixed", "allocated", "completing"} for s in states):
        return f"no usable Slurm node (states: {states or 'none'}); sudo bash scripts/slurm_cluster.sh up resumes it"
    return None


_PROBLEM = _cluster_problem()
needs_cluster = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


@pytest.fixture(scope="module")
def tiny_data(sni_sample, tmp_path_factory) -> Path:
    """8 real S-NI episodes (4 test tasks x 2): one global batch of 8."""
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    out = tmp_path_factory.mktemp("slurm_data")
    prepare(SNIPrepConfig(src=str(sni_sample), out=str(out), split="test", max_instances_per_task=2))
    return out


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("SLURM_")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "VENV": str(VENV), "HYPERTRAIN_REPO": str(REPO)})
    env.update(extra)
    return env


def sbatch(script: str, env: dict[str, str], *options: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", *options, script], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def submit_training(run_dir: Path, data: Path, steps: int, **env: str) -> tuple[str, Path]:
    """``sbatch slurm/hart_t5xl.sh`` with the tiny HART config on 2 CPU ranks; returns (job id, log file)."""
    log = run_dir.parent / f"{run_dir.name}.out"
    overrides = (f"data.train=[{data}] data.num_workers=1 train.total_steps={steps} train.warmup_steps=2 "
                 "run.log_every=1 train.global_batch_size=8 train.micro_batch_size=4 train.optimizer=adamw8bit")
    variables = job_env(CONFIG="configs/hart_tiny.yaml", GPUS_PER_NODE="2", RUN_DIR=str(run_dir),
                        OVERRIDES=overrides, **env)
    job = sbatch("slurm/hart_t5xl.sh", variables, "--gpus-per-node=0", f"--output={log}", "--time=15")
    return job, log


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, Reason, ExitCode, ...)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"scontrol show job {job}: {result.stderr}"
    info = {}
    for field in result.stdout.split():
        key, _, value = field.partition("=")
        info.setdefault(key, value)
    return info


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"(no {path})"
    text = [line for line in path.read_text(errors="replace").splitlines() if "Warning" not in line]
    return "\n".join(text[-lines:])


def wait_job(job: str, log: Path, timeout: float) -> dict[str, str]:
    """Poll until the job has ended; a requeued job waiting for its BeginTime is released at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info["JobState"] in FINAL_STATES:
            return info
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime" and int(info.get("Restarts", 0)) > 0:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)
        time.sleep(1)
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
    raise AssertionError(f"job {job} did not end in {timeout}s ({job_info(job).get('JobState')}):\n{tail(log)}")


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("hypertrain")
    assert experiment is not None, "no MLflow experiment in the run directory"
    return client, client.search_runs([experiment.experiment_id])


def latest_checkpoint(run_dir: Path) -> dict:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return json.loads((run_dir / "checkpoints" / tag / "hypertrain_state.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# slurm/lib.sh's signal forwarding, on a fake launcher (no Slurm needed)

FAKE_LAUNCHER = """
import os, signal, subprocess, sys, time
from pathlib import Path

out, role = Path(sys.argv[1]), sys.argv[2]
def mark(name):
    def handler(signum, frame):
        (out / f"{name}.{signal.Signals(signum).name}").write_text("")
        if name.startswith("rank"):
            time.sleep(1)  # a worker signalled by mistake has time to leave its mark
            for child in children:
                child.terminate()
            sys.exit(0)
    return handler
children = []
if role == "launcher":       # like deepspeed's launch.py / torchrun: no LOCAL_RANK, ranks below it
    signal.signal(signal.SIGUSR1, mark("launcher"))
    ranks = [subprocess.Popen([sys.executable, __file__, str(out), "rank"], env={**os.environ, "LOCAL_RANK": str(i)})
             for i in range(2)]
    sys.exit(max(r.wait() for r in ranks))
name = f"{role}{os.environ['LOCAL_RANK']}-{os.getpid()}"
(out / f"{name}.started").write_text("")
time.sleep(float(os.environ.get("FAKE_HANDLER_DELAY", "0")) if role == "rank" else 0)  # like importing torch
signal.signal(signal.SIGUSR1, mark(name))
if role == "rank":           # a rank with a data-loader worker below it (which inherits LOCAL_RANK)
    children.append(subprocess.Popen([sys.executable, __file__, str(out), "worker"]))
(out / f"{name}.ready").write_text("")
time.sleep(60)
sys.exit(5)                   # not stopped in time
"""


def _fake_job(tmp_path: Path, wait_for: str = ".ready", count: int = 4, **env: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "marks"
    out.mkdir()
    script = tmp_path / "fake_launcher.py"
    script.write_text(FAKE_LAUNCHER)
    environment = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    environment.update(env)
    process = subprocess.Popen(["bash", str(REPO / "slurm" / "lib.sh"), "node", sys.executable, str(script), str(out),
                                "launcher"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(list(out.glob(f"*{wait_for}"))) < count:  # 2 ranks + 2 workers
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0] if process.poll() else "timeout"
        time.sleep(0.1)
    return process, out


def _assert_only_ranks_got_usr1(process: subprocess.Popen, out: Path) -> str:
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    got = sorted(p.name.split("-")[0] + "." + p.suffix[1:] for p in out.glob("*.SIGUSR1"))
    assert got == ["rank0.SIGUSR1", "rank1.SIGUSR1"], (got, output)  # not the launcher, not the workers
    return output


def test_usr1_to_the_batch_shell_reaches_the_ranks_only(tmp_path):
    """The one-node path: the batch shell (here the wrapper) gets USR1 and signals the topmost LOCAL_RANK processes."""
    process, out = _fake_job(tmp_path)
    process.send_signal(signal.SIGUSR1)
    assert "sending SIGUSR1 to training ranks" in _assert_only_ranks_got_usr1(process, out)


def test_usr1_waits_until_the_ranks_can_take_it(tmp_path):
    """A USR1 that arrives while the ranks are still starting (no handler yet) is held back, not fatal to them."""
    process, out = _fake_job(tmp_path, wait_for=".started", count=2, FAKE_HANDLER_DELAY="2")
    process.send_signal(signal.SIGUSR1)
    assert "(or not ready) yet" in _assert_only_ranks_got_usr1(process, out)


def test_a_stop_request_file_reaches_the_ranks_of_a_node(tmp_path):
    """The several-node path: each node's wrapper polls the request file the batch shell writes into RUN_DIR."""
    stop_file = tmp_path / ".slurm-stop-1-0"
    process, out = _fake_job(tmp_path, HYPERTRAIN_STOP_FILE=str(stop_file))
    stop_file.write_text("USR1 1700000000.0\n")
    assert "sending SIGUSR1 to training ranks" in _assert_only_ranks_got_usr1(process, out)


# ---------------------------------------------------------------------------------------------------------------
# real jobs on the one-node cluster


@needs_cluster
def test_sbatch_trains_two_ranks_to_a_checkpoint_and_an_mlflow_run(tiny_data, tmp_path):
    """LAUNCHER=torchrun: the code path of several nodes (srun, one torchrun per node, c10d rendezvous), on one."""
    run_dir = tmp_path / "run"
    job, log = submit_training(run_dir, tiny_data, steps=6, LAUNCHER="torchrun")
    info = wait_job(job, log, timeout=300)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    text = log.read_text(errors="replace")
    assert "launcher=torchrun" in text and "ranks/node=2" in text
    assert re.search(rf"head=\S+:{29500 + int(job) % 10000}\b", text), tail(log)  # MASTER_PORT from the job id

    state = latest_checkpoint(run_dir)
    assert state["step"] == 6 and state["world_size"] == 2 and state["reason"] == "end of training"
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-00000006").glob("rank*.safetensors")) == [
        "rank00000.safetensors", "rank00001.safetensors"]

    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm_job_id"] == job and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))


def _usr1_requeue_resume(tiny_data: Path, run_dir: Path, **env: str) -> tuple[str, str]:
    """Send USR1 to the batch shell mid-run; the job must checkpoint, requeue, resume and finish one MLflow run."""
    steps = 24
    job, log = submit_training(run_dir, tiny_data, steps=steps, **env)
    deadline = time.monotonic() + 180
    while len(metric_steps(run_dir)) < 3:
        info = job_info(job)
        if info["JobState"] in FINAL_STATES or time.monotonic() > deadline:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)
            raise AssertionError(f"job {job} ({info['JobState']}) never reached step 3:\n{tail(log)}")
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)  # like --signal=B:USR1@T

    info = wait_job(job, log, timeout=300)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert int(info["Restarts"]) >= 1
    assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" in text, tail(log)
    assert "(signal SIGUSR1)" in text and f"requeueing job {job}" in text, tail(log)

    interrupted = int(text.split("(signal SIGUSR1)")[0].rsplit("step-", 1)[1][:8])
    assert 3 <= interrupted < steps
    assert f"resumed from {run_dir}/checkpoints/step-{interrupted:08d} at step {interrupted}" in text
    state = latest_checkpoint(run_dir)
    assert state["step"] == steps and state["reason"] == "end of training"
    assert sorted(set(metric_steps(run_dir))) == list(range(1, steps + 1))

    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1, "the restarted job must continue the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    history = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(set(history)) == list(range(1, steps + 1)) and history[-1] == steps
    return job, text


@needs_cluster
def test_usr1_checkpoints_requeues_and_resumes_the_same_mlflow_run(tiny_data, tmp_path):
    job, text = _usr1_requeue_resume(tiny_data, tmp_path / "run")
    assert "launcher=deepspeed" in text and "sending SIGUSR1 to training ranks" in text
    assert f"--master_port={29500 + int(job) % 10000}" in text  # MASTER_PORT derived from the job id


@needs_cluster
def test_prep_job_array_then_merge_after_ok(sni_sample, tmp_path):
    out = tmp_path / "sni"
    env = job_env(SNI_SRC=str(sni_sample), OUT=str(out), MERGE_SBATCH_ARGS=f"--output={tmp_path}/merge-%j.out")
    job = sbatch("slurm/prep_sni.sh", env, "--array=0-1", "--cpus-per-task=1", "--mem=1G",
                 f"--output={tmp_path}/prep-%A_%a.out")
    logs = tmp_path / "prep.log"
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob("merge-*.out")) or "merged and verified" not in \
            list(tmp_path.glob("merge-*.out"))[0].read_text(errors="replace"):
        if time.monotonic() > deadline:
            logs.write_text("\n".join(p.read_text(errors="replace") for p in tmp_path.glob("*.out")))
            raise AssertionError(f"merge of array {job} did not finish:\n{tail(logs, 60)}")
        time.sleep(1)
    for split in ("train", "test"):
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert len({s["file"].split("-")[1] for s in manifest["shards"]}) == 2  # pieces j0000 and j0001
        assert not list((out / split).glob("manifest.part-*"))

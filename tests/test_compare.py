"""``hypertrain compare`` on two real training runs (tiny HART and HyperTuning, evaluated on real S-NI shards)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.sni import prepare
from hypertrain.compare import DEFAULT_METRICS, glob_regex, metric_label, select_metrics
from hypertrain.config import SNIPrepConfig
from hypertrain.demo import write_ds_config

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 6


@pytest.fixture(scope="module")
def two_runs(sni_sample, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two finished runs in one sqlite store (experiment ``cmp``); returns (db path, method → run id)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("compare")
    data = root / "data"
    prepare(SNIPrepConfig(src=str(sni_sample), out=str(data), split="test", max_instances_per_task=4))
    db = root / "mlflow.db"
    ds_config = write_ds_config(root)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    for method, extra in (("hart", []), ("hypertuning", ["method=hypertuning", "hart.generator=parallel", "hart.alpha=0.0"])):
        command = [
            sys.executable, "-m", "hypertrain.main", "--config", "configs/hart_tiny.yaml", "--ds_config", str(ds_config),
            *extra, f"data.train=[{data}]", f"eval.data=[{data}]", f"run.dir={root / method}", "run.experiment=cmp",
            f"run.name={method}", "run.log_every=1", f"train.total_steps={STEPS}", "train.global_batch_size=8",
            "train.micro_batch_size=8", "data.num_workers=1", "eval.max_examples_per_task=2", "eval.max_new_tokens=8",
        ]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    return db, {run.info.run_name: run.info.run_id for run in runs}


def run_compare(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """``hypertrain compare ARGS`` through the command line's entry point, in this process (MLflow and matplotlib
    are imported once)."""
    from hypertrain.cli import main

    capsys.readouterr()
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["hypertrain", "compare", *args], code, captured.out, captured.err)


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, (path, image.shape)
    assert image[..., :3].std() > 0.01, f"{path} is blank"


def test_compare_prints_the_table_and_writes_valid_pngs(two_runs, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    db, ids = two_runs
    assert sorted(ids) == ["hart", "hypertuning"]
    out = tmp_path / "cmp"
    result = run_compare(capsys, "--tracking-uri", str(db), "--experiment", "cmp", "--out", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0]
    for column in ("run", "method", "model", "steps", "train loss", "sni rougeL", "sni exact_match", "samples/s", "MFU"):
        assert column in header, header
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert sorted(rows) == ["hart", "hypertuning"] and rows["hypertuning"][1] == "hypertuning"

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    for name, run_id in ids.items():
        run = client.get_run(run_id)
        assert rows[name][2] == "tiny" and rows[name][3] == str(STEPS)
        assert rows[name][4] == f"{run.data.metrics['train/loss']:.3f}"  # the last logged training loss
        assert f"{100 * run.data.metrics['eval/sni/rougeL']:.2f}" in rows[name]  # a fraction in MLflow, 0-100 here

    assert "train loss (last window)" in header  # a window mean, not the last step the console printed
    with open(out / "comparison.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert {row["run_id"] for row in table} == set(ids.values())
    for row in table:  # raw numbers, not the table's formatted strings
        run = client.get_run(row["run_id"])
        # MLflow holds fractions (metric names version 2); compare shows the papers' 0-100 scale
        assert float(row["eval/sni/rougeL"]) == pytest.approx(100 * run.data.metrics["eval/sni/rougeL"])
        assert float(row["train_loss_last_window"]) == run.data.metrics["train/loss"]
        # throughput: total samples over total step time (not a mean of per-window rates)
        assert float(row["samples_per_s"]) == pytest.approx(STEPS * 8 / run.data.metrics["perf/train_time_s"])
        assert row["mfu"] == ""  # none logged on CPU: empty, not "-"
    assert (out / "comparison.md").read_text().startswith("| run ")
    for name in ("loss.png", "eval.png", "throughput.png"):
        assert_png(out / name)
    assert str(out / "loss.png") in result.stdout
    experiment = client.get_experiment_by_name("cmp").experiment_id  # where to look in the UI, printed and kept
    assert f"#/experiments/{experiment}/runs?workflowType=machine_learning" in result.stdout
    assert "#/compare-runs?runs=" in (out / "links.txt").read_text()


def test_compare_selects_runs_and_metrics(two_runs, tmp_path, capsys):
    db, ids = two_runs
    result = run_compare(capsys, "--tracking-uri", f"sqlite:///{db}", "--runs", ids["hart"], "--metric", "eval/*/exact_match",
                         "--out", str(tmp_path / "one"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "sni exact_match" in lines[0] and "rougeL" not in lines[0]
    assert lines[2].split()[0] == "hart" and not lines[3].strip()  # one run only
    assert_png(tmp_path / "one" / "eval.png")


def test_compare_says_what_is_missing(two_runs, tmp_path, capsys):
    db, _ = two_runs
    result = run_compare(capsys, "--tracking-uri", str(db), "--experiment", "nope", "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and "no experiment 'nope'" in result.stderr and "cmp" in result.stderr
    result = run_compare(capsys, "--tracking-uri", str(tmp_path / "absent"), "--out", str(tmp_path / "x"))
    assert result.returncode == 1 and "no MLflow store" in result.stderr
    assert not (tmp_path / "x").exists()


def test_metric_globs_stay_within_a_path_segment():
    names = ["eval/sni/rougeL", "eval/sni/exact_match", "eval/sni/rougeL/Arithmetic",
             "eval/sni/exact_match/Arithmetic", "eval/sni/time_s", "eval/p3/accuracy"]
    assert select_metrics(names, DEFAULT_METRICS) == [
        "eval/sni/rougeL", "eval/sni/exact_match", "eval/p3/accuracy", "eval/sni/rougeL/Arithmetic"]
    assert select_metrics(names, ["eval/sni/exact_match**"]) == ["eval/sni/exact_match",
                                                                 "eval/sni/exact_match/Arithmetic"]
    assert not glob_regex("eval/*/rougeL").match("eval/sni/rougeL/x")
    assert metric_label("eval/sni/rougeL/String_Edits") == "sni String_Edits rougeL"
    assert metric_label("eval/sni/rougeL") == "sni rougeL"


def test_runs_of_both_metric_conventions_read_alike():
    from hypertrain.metric_names import VERSION, VERSION_TAG, readable_eval, sectioned

    earlier = {"eval/sni/rougeL": 47.5, "eval/sni/category/Word_Analogy/exact_match": 20.0,
               "eval/p3/dataset/hellaswag/median": 30.0, "eval/sni/num_examples": 8.0, "loss": 1.0}
    today = {"eval/sni/rougeL": 0.475, "eval/sni/exact_match/Word_Analogy": 0.2, "eval/p3/median/hellaswag": 0.3,
             "eval/sni/num_examples": 8.0, "train/loss": 1.0}
    assert readable_eval(earlier, {}) == pytest.approx(readable_eval(today, {VERSION_TAG: VERSION}))
    assert readable_eval(today, {VERSION_TAG: VERSION})["eval/sni/rougeL"] == pytest.approx(47.5)
    assert [sectioned(k) for k in ("loss", "loss/lm", "lr", "grad_norm", "samples_per_s", "memory_mb", "eval/x/y")] == [
        "train/loss", "train/loss/lm", "opt/lr", "opt/grad_norm", "perf/samples_per_s", "perf/memory_mb", "eval/x/y"]


def test_the_eval_axis_names_the_metrics_and_their_scale():
    from hypertrain.compare import eval_axis_label

    assert eval_axis_label(["eval/sni/rougeL", "eval/sni/rougeL/Arithmetic", "eval/sni/exact_match"]) == (
        "ROUGE-L / exact match (0-100)")
    assert eval_axis_label(["eval/p3/accuracy"]) == "accuracy (0-100)"


def test_cli_help_names_each_command_and_imports_no_torch():
    """``hypertrain --help`` and each command's help: a description, the right program name, and no torch import
    (which alone takes seconds)."""
    probe = ("import sys; from hypertrain.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    for args in ([], ["train"], ["params"], ["plan"], ["export"], ["compare"], ["eval"], ["demo"], ["stop"]):
        result = subprocess.run([sys.executable, "-c", probe, *args, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.stdout.rstrip().endswith("NO TORCH"), (args, result.stdout[-500:], result.stderr[-500:])
        usage = result.stdout.splitlines()[0]
        assert usage.startswith(f"usage: hypertrain {args[0] if args else ''}".rstrip()), usage
        assert len([line for line in result.stdout.split("\n\n") if line.strip()]) >= 3, result.stdout  # a description

"""The demonstration tasks (``data_prep.demo``) and ``hypertrain demo`` end to end at its smallest size."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_prep.demo import DEFAULT_TEST_TASKS, FAMILIES, TASKS, DemoTasksConfig, generate, task_name
from data_prep.shards import read_episodes
from data_prep.sni import prepare
from hypertrain.config import SNIPrepConfig
from hypertrain.demo import DemoError, DemoOptions, main_model, run_demo

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_tasks_are_deterministic_varied_and_held_out(tmp_path):
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train, test = generate(DemoTasksConfig(out=str(first), seed=3, instances_per_task=30))
    generate(DemoTasksConfig(out=str(again), seed=3, instances_per_task=30))
    generate(DemoTasksConfig(out=str(other), seed=4, instances_per_task=30))
    assert _tree(first) == _tree(again)
    assert _tree(first) != _tree(other)

    assert len(TASKS) >= 36 and len(train) + len(test) == len(TASKS)
    assert sorted(test) == sorted(task_name(t) for t in DEFAULT_TEST_TASKS) and not set(train) & set(test)
    assert Counter(TASKS[t][0] for t in DEFAULT_TEST_TASKS).keys() == set(FAMILIES)  # every family is held out
    definitions = [TASKS[t][1] for t in TASKS]
    assert len(set(definitions)) == len(definitions)

    records = {p.stem: json.loads(p.read_text()) for p in (first / "tasks").glob("*.json")}
    for name, record in records.items():
        assert len(record["Instances"]) == 30 and len(record["Positive Examples"]) == 2
        assert len({i["id"] for i in record["Instances"]}) == 30
        assert record["Categories"][0] in FAMILIES and record["Input_language"] == ["English"]
        positives = {(e["input"], e["output"]) for e in record["Positive Examples"]}
        assert not positives & {(i["input"], i["output"][0]) for i in record["Instances"]}, name
    # the tasks really differ: the same input gets different answers from different tasks
    by_input: dict[str, set[str]] = {}
    for record in records.values():
        for instance in record["Instances"]:
            by_input.setdefault(instance["input"], set()).add(instance["output"][0])
    assert sum(len(outputs) > 2 for outputs in by_input.values()) > 20
    reverse = {i["input"]: i["output"][0] for i in records["demo_reverse_word"]["Instances"]}
    assert all(out == word[::-1] for word, out in reverse.items())
    adds = records["demo_add_numbers"]["Instances"]
    assert all(int(i["output"][0]) == sum(int(x) for x in i["input"].split(" and ")) for i in adds)

    # the real S-NI prep reads them without skipping anything
    manifest = prepare(SNIPrepConfig(src=str(first), out=str(tmp_path / "train"), split="train"))
    assert manifest["num_samples"] == 30 * len(train) and not manifest["skipped"] and not manifest["dropped_tasks"]
    manifest = prepare(SNIPrepConfig(src=str(first), out=str(tmp_path / "test"), split="test"))
    assert sorted(manifest["tasks"]) == sorted(test)


def test_demo_rejects_bad_options_and_an_existing_demo(tmp_path):
    with pytest.raises(DemoError, match="--methods"):
        DemoOptions(methods=("hart", "lora"))
    with pytest.raises(DemoError, match="--steps"):
        DemoOptions(steps=0)
    with pytest.raises(DemoError, match="--main-steps"):
        DemoOptions(main_steps=0)
    with pytest.raises(DemoError, match="--size"):
        DemoOptions(size="huge")
    (tmp_path / "runs").mkdir()
    with pytest.raises(DemoError, match="already holds a demo"):
        run_demo(DemoOptions(out=str(tmp_path)))


def test_the_main_model_cache_key_follows_what_the_model_depends_on():
    key = DemoOptions().main_model_key()
    assert DemoOptions(out="elsewhere", steps=5, methods=("pha",), eval_examples=3).main_model_key() == key
    assert DemoOptions(main_steps=7).main_model_key() != key
    assert DemoOptions(seed=1).main_model_key() != key
    assert DemoOptions(train_tasks=4).main_model_key() != key


def _demo(out: Path, cache: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hypertrain.cli", "demo", "--out", str(out), "--steps", "8", "--main-steps", "12",
               "--methods", "ft_few_shot,hart,pha", "--train-tasks", "8", "--test-tasks", "2", "--instances", "16",
               "--eval-examples", "4", "--cache", str(cache)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_demo_end_to_end_at_its_smallest_size_and_the_cached_main_model(tmp_path):
    from mlflow.tracking import MlflowClient

    out, cache = tmp_path / "demo", tmp_path / "cache"
    result = _demo(out, cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    stdout = result.stdout
    assert "main model" in stdout and "trained in" in stdout
    table = stdout[stdout.index("run "):].splitlines()
    assert "sni_test rougeL" in table[0] and "sni_seen_tasks rougeL" in table[0] and "train loss (last window)" in table[0]
    assert [line.split()[0] for line in table[2:6]] == ["floor", "ft_few_shot", "hart", "pha"]
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in stdout
    assert "/runs?workflowType=machine_learning" in stdout and "#/compare-runs?runs=" in stdout  # direct links
    assert "hart: 100%" in result.stderr and "8/8" in result.stderr  # the progress bars
    # it ends with the user's loop: an adapter for a held-out task, and answers to two of its inputs
    assert "[6/6] your own task: the hart hypernetwork" in stdout and "$ hypertrain predict --adapter" in stdout
    (adapter_dir,) = [p for p in (out / "adapters").iterdir() if p.is_dir()]
    config = json.loads((adapter_dir / "hypertrain_adapter.json").read_text())
    assert config["method"] == "hart" and config["hypernetwork_input"]["text"].startswith("Definition: ")
    assert stdout.count("(reference ") == 2
    for name in ("loss.png", "eval.png", "throughput.png"):
        assert (out / "compare" / name).read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.reader((out / "compare" / "comparison.csv").open()))
    hart_row = dict(zip(rows[0], next(r for r in rows if r[1] == "hart"), strict=True))
    assert float(hart_row["samples_per_s"]) > 0 and float(hart_row["eval/sni_test/rougeL"]) >= 0  # raw numbers

    models = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(models) == 1 and (models[0] / "config.json").is_file()
    stage = json.loads((models[0] / "demo_stage.json").read_text())
    assert stage["options"]["main_steps"] == 12

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("demo").experiment_id])}
    assert sorted(runs) == ["floor (no PEFT)", "ft_few_shot", "hart", "main model", "pha"]
    for name in ("ft_few_shot", "hart", "pha"):
        run = runs[name]
        assert run.info.status == "FINISHED" and run.data.params["model.name"] == str(models[0])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")][-1] == 8
        assert run.data.metrics["eval/sni_test/num_examples"] == 8  # 2 held-out tasks x 4 examples
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/sni_test/rougeL")] == [4, 8]
        assert 0 < run.data.metrics["eval/sni_seen_tasks/num_examples"] <= 8 * 4  # new instances of training tasks
        assert (out / "runs" / name / "checkpoints" / "latest").is_file()
    assert runs["ft_few_shot"].data.params["data.main_input"] == "few_shot"
    assert runs["floor (no PEFT)"].data.params["data.main_input"] == "query"
    assert "eval/sni_test/rougeL" in runs["floor (no PEFT)"].data.metrics
    # new instances of the training tasks: inputs that no training instance of the task has
    trained = {(e.task, e.input) for e in read_episodes(out / "data" / "train")}
    seen_set = read_episodes(out / "data" / "seen_tasks")
    assert seen_set and not {(e.task, e.input) for e in seen_set} & trained
    # the held-out tasks never entered the main model's training
    train_tasks = set(json.loads((out / "data" / "train" / "manifest.json").read_text())["tasks"])
    test_tasks = set(json.loads((out / "data" / "test" / "manifest.json").read_text())["tasks"])
    assert runs["main model"].data.tags["datasets"] == str(out / "data" / "train") and not train_tasks & test_tasks

    # a second demo with the same main-model options takes the model from the cache and trains nothing for it
    again = DemoOptions(out=str(tmp_path / "demo2"), steps=3, main_steps=12, methods=("pha",), train_tasks=8,
                        test_tasks=2, instances=16, eval_examples=2, cache=str(cache))
    model, origin = main_model(again, out / "data" / "train", [], tmp_path / "demo2", "sqlite:///unused.db")
    assert model == str(models[0]) and "reused from the cache" in origin
    assert not (tmp_path / "demo2").exists()

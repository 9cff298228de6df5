"""The demonstration tasks (``data_prep.demo``) and ``hypertrain demo`` end to end at its smallest size."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_prep.demo import DEFAULT_TEST_TASKS, FAMILIES, TASKS, DemoTasksConfig, generate, task_name
from data_prep.sni import prepare
from hypertrain.config import SNIPrepConfig
from hypertrain.demo import DemoError, DemoOptions, run_demo

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
    with pytest.raises(DemoError, match="--size"):
        DemoOptions(size="huge")
    (tmp_path / "runs").mkdir()
    with pytest.raises(DemoError, match="already holds a demo"):
        run_demo(DemoOptions(out=str(tmp_path)))


def test_demo_end_to_end_at_its_smallest_size(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "demo"
    command = [sys.executable, "-m", "hypertrain.cli", "demo", "--out", str(out), "--steps", "12", "--methods", "hart,pha",
               "--train-tasks", "8", "--test-tasks", "2", "--instances", "16", "--eval-examples", "4"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    stdout = result.stdout
    table = stdout[stdout.index("run "):].splitlines()
    assert "sni rougeL" in table[0] and "train loss" in table[0]
    assert [line.split()[:2] for line in table[2:4]] == [["hart", "hart"], ["pha", "pha"]]
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in stdout
    assert "hart: 100%" in result.stderr and "12/12" in result.stderr  # the progress bars
    for name in ("loss.png", "eval.png", "throughput.png"):
        assert (out / "compare" / name).read_bytes()[:8] == PNG_MAGIC

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["hart", "pha"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")][-1] == 12
        assert run.data.metrics["eval/sni/num_examples"] == 8  # 2 held-out tasks x 4 examples
        assert "eval/sni/rougeL" in run.data.metrics
        assert any(k.startswith("eval/sni/category/") for k in run.data.metrics)
        assert (out / "runs" / run.info.run_name / "checkpoints" / "latest").is_file()

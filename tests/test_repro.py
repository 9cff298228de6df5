"""Reproducing HART's tables: the layouts against an MLflow store, and ``hypertrain repro hart-table3`` for real on
the one-node Slurm cluster at tiny shapes (every row trains, HyperTuning-PT after its C4 pretraining, the table
prints, the LoRA row's export loads in Hugging Face PEFT). The jobs run two at a time and share one sqlite MLflow
store, as a table's jobs on a cluster share one tracking server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_slurm import FINAL_STATES, REPO, job_env, job_info, needs_cluster, tail

from hypertrain import repro_tables
from hypertrain.compare import CompareError, compare_layout
from hypertrain.config import load_config
from hypertrain.repro import plan_jobs


def test_every_row_has_its_experiment_file_and_they_load():
    for table in repro_tables.TABLES.values():
        for row, column in table.cells():
            cfg = load_config(path=repro_tables.config_path(column.folder, row.config))
            assert cfg.run.name == repro_tables.run_name(column.folder, row.config)
            assert ("xl" in cfg.model.name) == column.folder.endswith("t5xl")
            assert cfg.train.total_steps == (20000 if column.folder.endswith("t5xl") else 10000)
            few_shot = row.config in ("ft_few_shot", "prefix_tuning", "lora")
            assert cfg.data.main_input == ("few_shot" if few_shot else "query")
        assert len(table.columns) == len(table.rows[0].paper)


def test_plan_submits_each_run_once_and_pretraining_first(tmp_path):
    jobs = plan_jobs(repro_tables.TABLES["hart-table5"], tmp_path, data_root="/d")
    names = [j.name for j in jobs]
    assert len(names) == len(set(names)) == 11  # 5 rows x 2 benchmarks + the C4 pretraining run
    pretrain = names.index("c4_t5large/pretrain_hypertuning")
    for job in jobs:
        if job.name.endswith("/hypertuning_pt"):
            assert job.after == "c4_t5large/pretrain_hypertuning" and names.index(job.name) > pretrain
            assert f"train.init_from={tmp_path / job.after}" in job.overrides
    assert "data.train=[/d/c4-episodes/train]" in jobs[pretrain].overrides


def _store_with_runs(tmp_path: Path, runs: dict[str, dict[str, float]]) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("hart-repro")
    for name, metrics in runs.items():
        run = client.create_run(experiment, run_name=name)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value, step=10)
        client.set_terminated(run.info.run_id)
    return uri


def test_layouts_put_runs_in_the_papers_rows_beside_its_numbers(tmp_path):
    p3 = {f"eval/p3/dataset/{d}/median": 50.0 + i for i, d in enumerate(
        ["anli_r1", "anli_r2", "anli_r3", "hellaswag", "super_glue_cb", "super_glue_copa", "super_glue_rte",
         "super_glue_wic", "super_glue_wsc.fixed", "winogrande_winogrande_xl"])}
    categories = {"eval/sni/category/Textual_Entailment/exact_match": 61.0,
                  "eval/sni/category/Title_Generation/rougeL": 33.0}
    uri = _store_with_runs(tmp_path, {
        "sni_t5large/hart": {"eval/sni/rougeL": 47.25, **categories},
        "sni_t5xl/lora": {"eval/sni/rougeL": 12.0},
        "p3_t5large/hart": p3,
    })
    table, path = compare_layout("hart-table2", uri, "hart-repro", tmp_path / "out")
    lines = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert lines["HART"][-4:] == ["47.2", "46.8", "-", "50.4"]
    assert lines["LoRA"][-4:] == ["-", "42.9", "12.0", "47.7"]
    assert lines["Tk-Instruct"][-4:] == ["n/a", "48.0", "n/a", "54.3"]
    assert path.read_text().startswith("Table 2")
    table3, _ = compare_layout("hart-table3", uri, "hart-repro", tmp_path / "out")
    hart = next(line for line in table3.splitlines() if line.startswith("HART")).split()
    # ANLI = mean of the three rounds' medians (51.0); Avg. over the eight columns
    expected = [51.0, 53.0, 54.0, 55.0, 56.0, 57.0, 58.0, 59.0]
    assert hart[1:] == [v for pair in zip([f"{x:.1f}" for x in [*expected, sum(expected) / 8]],
                                          ["33.6", "28.4", "70.2", "70.1", "72.2", "50.3", "62.3", "53.0", "55.0"],
                                          strict=True) for v in pair]
    categories_table, _ = compare_layout("sni-categories", uri, "hart-repro", tmp_path / "out")
    row = next(line for line in categories_table.splitlines() if line.startswith("sni_t5large/hart"))
    assert "61.0" in row and "33.0" in row and "47.2" in row
    with pytest.raises(CompareError, match="unknown layout"):
        compare_layout("hart-table9", uri, "hart-repro", tmp_path / "out")


# --------------------------------------------------------------------------------------------------
# On the cluster
# --------------------------------------------------------------------------------------------------

TINY = [
    "model.name=tiny", "train.total_steps=2", "train.global_batch_size=4", "train.micro_batch_size=4",
    "train.warmup_steps=0", "run.log_every=1", "run.checkpoint_every=1000", "data.num_workers=0",
    "data.max_input_tokens=256", "data.max_target_tokens=32", "data.max_hyper_input_tokens=256",
    "hart.prefix_length=4", "hart.hyper_decoder_layers=1", "prefix_tuning.prefix_length=4",
    "prefix_tuning.reparam_hidden=32", "eval.max_examples_per_task=4", "eval.batch_size=4",
]


@pytest.fixture(scope="module")
def repro_data(p3_sample, c4_sample, tmp_path_factory) -> Path:
    from data_prep import c4, p3
    from hypertrain.config import C4PrepConfig, P3PrepConfig

    root = tmp_path_factory.mktemp("repro_data")
    p3.prepare(P3PrepConfig(src=str(p3_sample), out=str(root / "p3" / "train"), split="train", shots=2))
    p3.prepare(P3PrepConfig(src=str(p3_sample), out=str(root / "p3" / "eval"), split="eval", shots=2))
    c4.prepare(C4PrepConfig(src=str(c4_sample), out=str(root / "c4-episodes" / "train"), chunk_words=[20, 20, 10, 20]))
    return root


@needs_cluster
@pytest.mark.slow
def test_repro_table3_on_slurm_every_row_trains_and_the_table_prints(repro_data, tmp_path):
    runs_root = tmp_path / "runs"
    logs = tmp_path / "logs"
    logs.mkdir()
    command = [sys.executable, "-m", "hypertrain.cli", "repro", "hart-table3", "--runs-root", str(runs_root),
               "--data-root", str(repro_data), "--set", *TINY,
               # two jobs at a time on the 2-core node (the scripts ask for whole nodes; --exclusive=user shares)
               "--sbatch-args", f"--gpus-per-node=0 --exclusive=user --time=20 --output={logs}/%x-%j.out"]
    result = subprocess.run(command, cwd=REPO, env=job_env(GPUS_PER_NODE="1"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    jobs = dict(line.split()[1::3][:2] for line in result.stdout.splitlines() if line.startswith("submitted"))
    assert len(jobs) == 8, result.stdout  # 7 rows + the C4 pretraining run
    deadline = time.monotonic() + 900
    states: dict[str, str] = {}
    while time.monotonic() < deadline and len(states) < len(jobs):
        for name, job in jobs.items():
            state = job_info(job)["JobState"]
            if state in FINAL_STATES:
                states[name] = state
        time.sleep(2)
    logs_text = "\n".join(f"--- {p.name}\n{tail(p, 15)}" for p in sorted(logs.iterdir()))
    assert states == dict.fromkeys(jobs, "COMPLETED"), logs_text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hart-repro")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(jobs) and all(r.info.status == "FINISHED" for r in runs.values())
    pretrained = runs["c4_t5large/pretrain_hypertuning"]
    started = runs["p3_t5large/hypertuning_pt"].data.tags
    assert started["hypertrain.init_from_run_id"] == pretrained.info.run_id
    assert started["hypertrain.init_from"].startswith(str(runs_root / "c4_t5large" / "pretrain_hypertuning"))
    assert "hypertrain.init_from" not in runs["p3_t5large/hypertuning"].data.tags

    table = subprocess.run(
        [sys.executable, "-m", "hypertrain.cli", "compare", "--layout", "hart-table3", "--experiment", "hart-repro",
         "--tracking-uri", str(runs_root), "--out", str(tmp_path / "compare")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert table.returncode == 0, table.stderr
    print(table.stdout)
    rows = {line.split("  ")[0]: line.split() for line in table.stdout.splitlines()[3:] if line.strip()}
    for label in ("FT-Zero-Shot", "FT-Few-Shot", "Prefix-Tuning", "LoRA", "HyperTuning-PT", "HyperTuning", "HART"):
        hswag = rows[label][-16]  # measured HSwag: the sample's only held-out dataset
        assert 0.0 <= float(hswag) <= 100.0, table.stdout
    _lora_export_loads_in_peft(runs_root / "p3_t5large" / "lora", tmp_path / "lora_export")


def _lora_export_loads_in_peft(run_dir: Path, out: Path) -> None:
    from peft import PeftModel

    from hypertrain.export import export, load_trained_method
    from hypertrain.models.registry import load_t5

    export(run_dir, out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["base_model_name_or_path"] == "tiny"
    method, cfg, _ = load_trained_method(out)
    ids = torch.randint(3, 250, (2, 9))
    labels = torch.randint(3, 250, (2, 4))
    with torch.no_grad():
        ours = method.main(ids, torch.ones_like(ids), labels=labels).logits
        plain = load_t5("tiny", seed=cfg.train.seed, attn_implementation=cfg.model.attn_implementation)
        theirs = PeftModel.from_pretrained(plain, str(out)).eval()(
            input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

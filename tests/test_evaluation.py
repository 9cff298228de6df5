"""Evaluation end to end on the tiny shape: rank classification, the per-task protocol, 2 ranks = 1 rank, training hook.

The real prep shards of both samples are evaluated by a briefly trained tiny HART / PHA; the 2-rank runs go through
``torchrun`` and ``hypertrain eval`` (gloo on CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from data_prep.p3 import prepare as prepare_p3
from data_prep.shards import read_episodes
from data_prep.sni import prepare as prepare_sni
from hypertrain.checkpoint import TRAINABLE_FILE
from hypertrain.config import Config, P3PrepConfig, SNIPrepConfig, load_config
from hypertrain.data.collate import EpisodeCollator
from hypertrain.episode import Episode
from hypertrain.evaluation import p3, runner
from hypertrain.evaluation.adapters import PhaEval, Tokens, eval_model
from hypertrain.evaluation.data import EvalError, load_eval_set, load_eval_sets
from hypertrain.export import CONFIG_FILE, TASKS_FILE, load_trained_method
from hypertrain.models.build import build_method
from hypertrain.models.registry import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
P3_SUBSETS = ["hellaswag_complete_first_then_score_eval", "openbookqa_main_choices"]
# 4 S-NI tasks x 5 (batch 4: 8 batches); P3 7 + 10 examples (batch 4: 5 batches, so 2 ranks need padding)
EVAL_OPTIONS = ["--batch-size", "4", "--max-examples-per-task", "10", "--max-new-tokens", "12"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_dirs(sni_sample, p3_sample, tmp_path_factory) -> tuple[Path, Path]:
    """The real samples' S-NI test split (5 instances per task) and P3 eval split (2 subsets, 2 shots)."""
    sni = tmp_path_factory.mktemp("sni_test")
    prepare_sni(SNIPrepConfig(src=str(sni_sample), out=str(sni), split="test", max_instances_per_task=5))
    p3_dir = tmp_path_factory.mktemp("p3_eval")
    prepare_p3(P3PrepConfig(src=str(p3_sample), out=str(p3_dir), split="eval", subsets=P3_SUBSETS, shots=2))
    return sni, p3_dir


def train_and_export(method: str, train_dir: Path, out: Path, steps: int = 8) -> Path:
    """A tiny method trained a few steps on real episodes, written as a ``hypertrain export`` directory."""
    cfg = load_config(Config, REPO / "configs" / f"{method}_tiny.yaml", [f"data.train=[{train_dir}]"])
    torch.manual_seed(0)
    model = build_method(cfg, "cpu")
    episodes = read_episodes(train_dir)
    tasks = sorted({e.task for e in episodes})
    collate = EpisodeCollator(load_tokenizer("tiny"), {t: i for i, t in enumerate(tasks)}, cfg.data.max_input_tokens,
                              cfg.data.max_target_tokens, cfg.data.max_hyper_input_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        batch = collate([episodes[(step * 8 + i) % len(episodes)] for i in range(8)])
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, str(out / TRAINABLE_FILE))
    (out / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    (out / TASKS_FILE).write_text(json.dumps(tasks))
    return out


@pytest.fixture(scope="module")
def exports(eval_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {method: train_and_export(method, eval_dirs[0], root / method) for method in ("hart", "pha")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _outputs(directory: Path) -> dict[str, str]:
    """Every output file's text; ``metrics.json`` without the timings."""
    files = {p.name: p.read_text() for p in sorted(directory.iterdir())}
    metrics = json.loads(files.pop("metrics.json"))
    metrics["metrics"] = {k: v for k, v in metrics["metrics"].items() if not k.endswith("/time_s")}
    files["metrics.json"] = json.dumps(metrics, sort_keys=True)
    return files


# --------------------------------------------------------------------------------------------------
# Rank classification
# --------------------------------------------------------------------------------------------------


class RiggedMain(torch.nn.Module):
    """A main model whose decoder gives every position the same log-probabilities ``table`` [V]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(decoder_start_token_id=0, pad_token_id=0)
        self.encodes = 0

    def encode(self, input_ids, attention_mask=None, peft=None):
        self.encodes += 1
        return torch.zeros(*input_ids.shape, 8)

    def forward(self, attention_mask=None, decoder_input_ids=None, peft=None, encoder_states=None, use_cache=None):
        assert encoder_states is not None and encoder_states.shape[0] == decoder_input_ids.shape[0]
        rows, length = decoder_input_ids.shape
        return SimpleNamespace(logits=self.table.expand(rows, length, -1))


def test_t0_protocol_leaves_eos_off_the_inputs_only():
    tokenizer = load_tokenizer("byt5")
    episodes = [Episode("e0", "t", "p3", [], "", "ab", ["c"], choices=["c", "d"], label=0)]
    ours = Tokens(tokenizer, 64, 32, 64, torch.device("cpu"))
    t0 = Tokens(tokenizer, 64, 32, 64, torch.device("cpu"), input_eos=False)
    eos = tokenizer.eos_token_id
    assert ours.main_inputs(episodes)[0].tolist() == [[97 + 3, 98 + 3, eos]]
    assert t0.main_inputs(episodes)[0].tolist() == [[97 + 3, 98 + 3]]
    assert t0.labels(["c"]).tolist() == ours.labels(["c"]).tolist() == [[99 + 3, eos]]


def test_rank_classification_sums_token_log_probs_with_eos_and_picks_the_known_answer():
    tokens = Tokens(load_tokenizer("byt5"), 64, 32, 64, torch.device("cpu"))
    a, b, eos = 97 + 3, 98 + 3, 1  # ByT5: byte + 3
    probs = torch.full((384,), 0.05 / 381)
    probs[a], probs[b], probs[eos] = 0.7, 0.2, 0.05
    main = RiggedMain(probs.log())
    long, short = "a" * 10, "b"
    episodes = [
        Episode("e0", "t", "p3", [], "", "question one", [short], choices=[long, short], label=1),
        Episode("e1", "t", "p3", [], "", "a longer question two", [short], choices=[short, long, "ab"], label=0),
    ]
    scores = p3.score(main, tokens, episodes, peft=None)
    expected = {long: 10 * math.log(0.7) + math.log(0.05), short: math.log(0.2) + math.log(0.05),
                "ab": math.log(0.7) + math.log(0.2) + math.log(0.05)}
    for episode, row in zip(episodes, scores, strict=True):
        assert row == pytest.approx([expected[c] for c in episode.choices], rel=1e-5)
    # the sum picks the short choice; a per-token mean would have picked the long one
    records = [p3.record(i, e, s, "d") for i, (e, s) in enumerate(zip(episodes, scores, strict=True))]
    assert [r["prediction"] for r in records] == [1, 0] and all(r["correct"] for r in records)
    assert main.encodes == 1  # one encoder pass for 2 inputs and 5 choices


def test_shared_encoding_equals_reencoding_per_choice_and_encodes_once(eval_dirs, exports):
    method, cfg, _ = load_trained_method(exports["hart"])
    tokens = Tokens(load_tokenizer("tiny"), cfg.data.max_input_tokens, cfg.data.max_target_tokens,
                    cfg.data.max_hyper_input_tokens, torch.device("cpu"))
    episodes = load_eval_set(eval_dirs[1], 3).episodes[:3]  # inputs of different lengths: padding
    peft = eval_model(method, tokens, 4).task_peft(episodes[0].task, episodes)
    ids, mask = tokens.inputs([e.input for e in episodes])
    labels, owner = p3.choice_rows(tokens, episodes)
    rows_encoded: list[int] = []
    hook = method.main.t5.encoder.register_forward_hook(lambda m, a, kw, out: rows_encoded.append(kw["input_ids"].shape[0]),
                                                        with_kwargs=True)
    try:
        shared = p3.score_choices(method.main, peft, ids, mask, labels, owner)
        naive = p3.score_choices_reencoding(method.main, peft, ids, mask, labels, owner)
    finally:
        hook.remove()
    assert rows_encoded == [3, labels.shape[0]] and labels.shape[0] > 3  # each input once vs once per choice
    torch.testing.assert_close(shared, naive, atol=2e-4, rtol=1e-5)


def test_evaluation_makes_peft_once_per_task_and_encodes_each_input_once(eval_dirs, exports):
    method, cfg, _ = load_trained_method(exports["hart"])
    cfg.eval = dataclasses.replace(cfg.eval, batch_size=4, max_new_tokens=4)
    sets = load_eval_sets(eval_dirs, 10)
    peft_calls: list[int] = []
    original = method.generate_peft
    method.generate_peft = lambda *a, **k: peft_calls.append(1) or original(*a, **k)
    encodes: list[int] = []
    hook = method.main.t5.encoder.register_forward_hook(lambda *_: encodes.append(1))
    try:
        results = runner.evaluate(method, cfg, load_tokenizer("tiny"), "cpu", sets=sets)
    finally:
        hook.remove()
    batches = [len(runner.make_batches(s, 4)) for s in sets]
    tasks = [len(s.task_ranges()) for s in sets]
    assert batches == [8, 5] and tasks == [4, 2]
    assert len(peft_calls) == sum(tasks)  # Def+2Pos / demonstrations read once per task
    assert len(encodes) == sum(batches)  # generation and choice scoring: one encoder pass per batch
    sni_result, p3_result = results
    assert [r["index"] for r in sni_result.rows] == list(range(20))
    assert sni_result.metrics["num_examples"] == 20 and p3_result.metrics["num_examples"] == 17
    assert set(sni_result.metrics["per_category"]) == {
        "overlap_extraction", "word_analogy", "textual_entailment", "cause_effect_classification"}
    assert set(p3_result.metrics["per_dataset"]) == {"hellaswag", "openbookqa/main"}
    assert method.training is False


def test_pha_uses_known_prototypes_and_retrieves_for_new_tasks(eval_dirs, exports):
    method, cfg, tasks = load_trained_method(exports["pha"])
    tokens = Tokens(load_tokenizer("tiny"), 64, 16, 128, torch.device("cpu"))
    model = eval_model(method, tokens, chunk_size=4)
    assert isinstance(model, PhaEval)
    for eval_set in load_eval_sets(eval_dirs, 6):
        for task, indices in eval_set.task_ranges().items():
            model.task_peft(task, eval_set.episodes[indices.start : indices.stop])
    known = [t for t in model.retrieved if t in tasks]
    assert len(known) == 4 and all(model.retrieved[t] == [t] for t in known)
    for subset in P3_SUBSETS:  # unseen: retrieved from the subset's instances
        assert model.retrieved[subset] is not None and model.retrieved[subset][0] in tasks


def _write_set(directory: Path, source: str, episodes: list[Episode]) -> Path:
    from data_prep.shards import EpisodeShardWriter, build_manifest, write_json_atomic

    with EpisodeShardWriter(directory, "test", 100, 1 << 20) as writer:
        for episode in episodes:
            writer.write(episode)
    tasks: dict[str, int] = {}
    for episode in episodes:
        tasks[episode.task] = tasks.get(episode.task, 0) + 1
    write_json_atomic(directory / "manifest.json", build_manifest(
        source=source, split="test", options={}, shards=writer.shards, tasks=tasks, skipped={}))
    return directory


def test_sets_that_cannot_be_scored_correctly_are_rejected(eval_dirs, tmp_path):
    sni = load_eval_set(eval_dirs[0] / "manifest.json", 2)  # a manifest path works too
    assert sni.kind == "generation" and len(sni.episodes) == 8 and sni.name == "sni"
    spanish = Episode("x1", "task171_translation", "sni", ["Translation"], "Def", "hello", ["hola"],
                      extra={"Input_language": ["English"], "Output_language": ["Spanish"]})
    with pytest.raises(EvalError, match="task171_translation is not English"):
        load_eval_set(_write_set(tmp_path / "xlingual", "sni", [spanish]))
    generative = Episode("q/train/0", "adversarial_qa_dbert_based_on", "p3", ["adversarial_qa/dbert"], "demos", "q", ["a"])
    with pytest.raises(EvalError, match="no answer choices"):
        load_eval_set(_write_set(tmp_path / "p3_train", "p3", [generative]))
    with pytest.raises(EvalError, match="distinct names"):
        load_eval_sets([eval_dirs[0], eval_dirs[0]], 1)


# --------------------------------------------------------------------------------------------------
# Distributed: 2 ranks = 1 rank
# --------------------------------------------------------------------------------------------------


def test_rank_share_pads_with_duplicates_and_gather_counts_each_example_once():
    shares = [runner.rank_share(5, r, 2) for r in range(2)]
    assert shares == [[0, 1, 2], [3, 4, 0]]
    rows = [[{"index": i, "v": i} for i in (0, 1, 2)], [{"index": i, "v": i} for i in (3, 4, 0)]]
    merged: list[dict] = []
    for part in rows:
        merged.extend(part)
    assert [r["index"] for r in runner.gather_rows(merged, 5, 1)] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="lost examples"):
        runner.gather_rows(rows[0], 5, 1)
    assert runner.rank_share(1, 1, 4) == [0] and runner.rank_share(0, 0, 2) == []


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_result(eval_dirs, exports, tmp_path):
    """``hypertrain eval`` under torchrun (PHA: retrieval for the P3 subsets) equals the in-process 1-rank run."""
    from hypertrain.cli import main as cli_main

    args = ["eval", "--checkpoint", str(exports["pha"]), "--data", *map(str, eval_dirs), "--device", "cpu", *EVAL_OPTIONS]
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "hypertrain.cli", *args, "--out", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert one == two
    predictions = [json.loads(line) for line in one["p3_predictions.jsonl"].splitlines()]
    assert len(predictions) == 17 and len({p["id"] for p in predictions}) == 17
    assert len(one["sni_predictions.jsonl"].splitlines()) == 20
    assert set(one) == {"metrics.json", "sni_predictions.jsonl", "sni_predictions.csv", "sni_tasks.csv",
                        "p3_predictions.jsonl", "p3_predictions.csv", "p3_tasks.csv", "p3_datasets.csv"}
    row = json.loads(one["sni_predictions.jsonl"].splitlines()[0])
    assert {"task", "id", "prediction", "references", "exact_match", "rougeL"} <= set(row)
    table = list(csv.DictReader(io.StringIO(one["sni_predictions.csv"])))  # the same rows, in columns for the UI
    assert len(table) == 20 and table[0]["prediction"] == row["prediction"]
    assert table[0]["references"] == " | ".join(row["references"])


def test_pha_rank_shares_merge_into_the_one_rank_rows(eval_dirs, exports):
    """PHA's per-rank work (retrieval included) for 2 and 3 ranks, merged, is bitwise the 1-rank work."""
    method, cfg, _ = load_trained_method(exports["pha"])
    cfg.eval = dataclasses.replace(cfg.eval, batch_size=4, max_new_tokens=6)
    tokens = Tokens(load_tokenizer("tiny"), 64, 16, 128, torch.device("cpu"))
    model = eval_model(method, tokens, 4)
    for eval_set in load_eval_sets(eval_dirs, 10):
        n = len(eval_set.episodes)
        with runner.eval_mode(method):
            single = runner.rank_rows(model, tokens, eval_set, cfg, 0, 1)
            for world in (2, 3):
                parts = [runner.rank_rows(model, tokens, eval_set, cfg, r, world) for r in range(world)]
                assert sum(map(len, parts)) >= n
                assert runner.gather_rows([row for part in parts for row in part], n, 1) == single


# --------------------------------------------------------------------------------------------------
# In training
# --------------------------------------------------------------------------------------------------


class FakeTracker:
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []
        self.artifacts: list[tuple[Path, str]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path), artifact_path))


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", pytest.param("zero3.json", marks=pytest.mark.skipif(
    not os.environ.get("HYPERTRAIN_TEST_ZERO3"), reason="ZeRO-3 on CPU is slow (2-4 min); set HYPERTRAIN_TEST_ZERO3=1"))])
def test_training_on_two_ranks_evaluates_like_the_standalone_one_rank_eval(eval_dirs, tmp_path, ds_config):
    """The trainer's hook on 2 DeepSpeed ranks logs eval metrics to MLflow at their steps, and its last evaluation
    equals ``hypertrain eval`` of the final checkpoint on 1 rank (ZeRO-3: partitioned weights, synced generation)."""
    from mlflow.tracking import MlflowClient

    from hypertrain.cli import main as cli_main

    sni, p3_dir = eval_dirs
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
         "hypertrain/main.py", "--config", "configs/hart_tiny.yaml", "--ds_config", f"ds_configs/{ds_config}",
         f"data.train=[{sni}]", f"eval.data=[{sni},{p3_dir}]", "eval.every=1", "eval.batch_size=4",
         "eval.max_examples_per_task=3", "eval.max_new_tokens=5", "train.total_steps=2", f"run.dir={run_dir}",
         "data.num_workers=0", "train.global_batch_size=8", "train.micro_batch_size=4", "train.optimizer=adamw"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step-00000001", "step-00000002"]

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hypertrain").experiment_id])
    for key in ("eval/sni/rougeL", "eval/sni/exact_match/word_analogy", "eval/p3/accuracy",
                "eval/p3/median/hellaswag"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step-00000002")}
    assert "eval/step-00000002/sni_predictions.jsonl" in logged and "eval/step-00000002/p3_tasks.csv" in logged

    standalone = tmp_path / "standalone"
    assert cli_main(["eval", "--checkpoint", str(run_dir), "--out", str(standalone), "--device", "cpu"]) == 0
    assert _outputs(standalone) == _outputs(run_dir / "eval" / "step-00000002")


def test_in_training_hook_keeps_rng_mode_and_consistency_reference(eval_dirs, tmp_path):
    cfg = load_config(Config, REPO / "configs" / "hart_tiny.yaml", [
        f"data.train=[{eval_dirs[0]}]", f"eval.data=[{eval_dirs[0]},{eval_dirs[1]}]", "eval.every=2",
        "eval.max_examples_per_task=3", "eval.max_new_tokens=4", "train.total_steps=5", f"run.dir={tmp_path}"])
    torch.manual_seed(0)
    method = build_method(cfg, "cpu")
    tokenizer = load_tokenizer("tiny")
    episodes = read_episodes(eval_dirs[0])[:4]
    collate = EpisodeCollator(tokenizer, {}, 64, 16, 128)
    method.train()
    method(collate(episodes))  # sets HART's consistency reference
    reference = method.consistency.state_tensors()["previous"].clone()
    rng = torch.get_rng_state()
    tracker = FakeTracker()

    assert runner.evaluate_in_training(method, cfg, tokenizer, 3, tracker, 0, 1, "cpu") is None
    results = runner.evaluate_in_training(method, cfg, tokenizer, 2, tracker, 0, 1, "cpu")
    assert results is not None and method.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(method.consistency.state_tensors()["previous"], reference)
    (metrics, step), = tracker.metrics
    assert step == 2
    assert {"eval/sni/rougeL", "eval/sni/exact_match", "eval/p3/accuracy", "eval/p3/median/hellaswag",
            "eval/sni/rougeL/word_analogy", "eval/p3/mean/openbookqa_main"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.split("/")[2] in ("rougeL", "accuracy", "median"))
    out = tmp_path / "eval" / "step-00000002"
    assert {p.name for p, _ in tracker.artifacts} == {p.name for p in out.iterdir()}
    assert {a for _, a in tracker.artifacts} == {"eval/step-00000002"}
    assert runner.evaluate_in_training(method, cfg, tokenizer, 5, None, 0, 1, "cpu") is not None  # last step
    assert (tmp_path / "eval" / "step-00000005" / "sni_tasks.csv").is_file()

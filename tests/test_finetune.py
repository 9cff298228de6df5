"""Full fine-tuning (FT-Zero-Shot / FT-Few-Shot): the main model's input option, the method, its accounting, the
Hugging Face export that ``model.name`` loads, and a real 2-rank DeepSpeed run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.sni import format_def_pos
from hypertrain.config import Config, load_config
from hypertrain.data.collate import EpisodeCollator
from hypertrain.episode import Episode, main_input
from hypertrain.models.build import build_method
from hypertrain.models.registry import load_tokenizer
from tests.test_trainer import finish, launch, log_tail, metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _episode(source: str = "sni") -> Episode:
    hyper = format_def_pos("Reverse the given word", [{"input": "cat", "output": "tac"}, {"input": "dog", "output": "god"}])
    return Episode(id="t-1", task="t", source=source, categories=["c"], hyper_input=hyper, input="owl", targets=["lwo"])


def test_main_input_is_the_query_or_tk_instructs_few_shot_layout():
    episode = _episode()
    assert main_input(episode, "query") == "owl"
    assert main_input(episode, "few_shot") == (
        "Definition: Reverse the given word.\n\n"
        "Positive Example 1 -\nInput: cat.\nOutput: tac.\n\n"
        "Positive Example 2 -\nInput: dog.\nOutput: god.\n\n"
        "Now complete the following example -\nInput: owl.\nOutput:"
    )
    p3 = _episode("p3")
    assert main_input(p3, "few_shot") == p3.hyper_input + "\n\nowl"
    with pytest.raises(ValueError, match="unknown main input"):
        main_input(episode, "both")


def test_tk_instruct_explanations_are_a_prep_option():
    examples = [{"input": "cat", "output": "tac", "explanation": "Letters in reverse order"}]
    assert "Explanation" not in format_def_pos("Reverse it", examples)
    assert format_def_pos("Reverse it", examples, explanations=True).endswith(
        "Output: tac.\nExplanation: Letters in reverse order."
    )


def test_collator_builds_the_configured_main_input_and_skips_the_hypernetwork_input():
    tokenizer = load_tokenizer("byt5")
    episode = _episode()
    batch = EpisodeCollator(tokenizer, {"t": 0}, 512, 16, 64, main_input_mode="few_shot", with_hyper=False)([episode])
    text = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert text == main_input(episode, "few_shot")
    assert batch["hyper_input_ids"].shape == (1, 0) and batch["hyper_attention_mask"].sum() == 0


def test_finetune_trains_every_weight_and_is_counted_at_t5_xl():
    from hypertrain.params import count_method
    from hypertrain.plan import make_plan

    cfg = load_config(Config, CONFIGS / "ft_few_shot_t5xl.yaml")
    counts = count_method(cfg)
    assert counts["trainable"] == 2_849_757_184 and counts["frozen"] == 0  # T5-XL as released
    assert cfg.data.main_input == "few_shot"
    plan = make_plan(cfg, gpus=8)
    states = plan["states_gib"]
    gib = 2**30
    # ZeRO-2, 8 GPUs: bf16 weights whole; fp32 master, 8-bit Adam state and gradients partitioned 8 ways
    assert states["trainable weights"] == pytest.approx(2 * 2_849_757_184 / gib)
    assert states["fp32 master weights"] == pytest.approx(4 * 2_849_757_184 / 8 / gib)
    assert states["gradients"] == pytest.approx(6 * 2_849_757_184 / 8 / gib)
    assert plan["configured"]["fits"]
    zero_shot = make_plan(load_config(Config, CONFIGS / "ft_zero_shot_t5xl.yaml"), gpus=8)
    assert zero_shot["flops_per_sample"] < plan["flops_per_sample"]  # 384 input tokens instead of 1024

    tiny = load_config(Config, CONFIGS / "hart_tiny.yaml", ["method=finetune"])
    method = build_method(tiny, "cpu")
    assert all(p.requires_grad for p in method.parameters())
    batch = EpisodeCollator(load_tokenizer("tiny"), {"t": 0}, 64, 16, 64, with_hyper=False)([_episode()] * 2)
    out = method(batch)
    out.loss.backward()
    assert method.main.t5.shared.weight.grad is not None and method.main.t5.lm_head.weight.grad is not None


def test_a_two_rank_deepspeed_run_exports_a_model_that_model_name_loads(tiny_data, tmp_path):
    """FT-Few-Shot through the real launcher (ZeRO-2, 8-bit Adam), then ``export --hf``: the directory loads with
    plain transformers, gives the trained model's logits, and serves as HART's frozen main model and as the
    initialisation of its hypernetwork; ``hypertrain eval`` evaluates it as it is (the no-PEFT floor)."""
    run_dir = tmp_path / "run"
    code = finish(launch(run_dir, tiny_data, "method=finetune", "data.main_input=few_shot", "data.max_input_tokens=256",
                         "train.total_steps=12", "run.checkpoint_every=100"), run_dir)
    assert code == 0, log_tail(run_dir)
    rows = metrics(run_dir)
    assert rows[12]["loss"] < rows[1]["loss"] and rows[12]["samples_total"] == 12 * 8

    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "hypertrain.cli", "export", str(run_dir), str(out), "--hf"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["T5ForConditionalGeneration"]

    from transformers import T5ForConditionalGeneration

    from hypertrain.export import load_trained_method

    trained, _, _ = load_trained_method(run_dir)
    plain = T5ForConditionalGeneration.from_pretrained(out).eval()
    ids, labels = torch.randint(3, 250, (2, 20)), torch.randint(3, 250, (2, 6))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids, labels=labels).logits, trained.main(ids, labels=labels).logits)
    assert plain.lm_head.weight is not plain.shared.weight

    hart = build_method(load_config(Config, CONFIGS / "hart_tiny.yaml", [f"model.name={out}"]), "cpu")
    assert torch.equal(hart.main.t5.shared.weight, plain.shared.weight)
    assert not any(p.requires_grad for p in hart.main.parameters())
    assert torch.equal(hart.hyper_encoder.block[0].layer[0].SelfAttention.q.weight,
                       plain.encoder.block[0].layer[0].SelfAttention.q.weight)

    test_data = tiny_data  # the S-NI sample's test split
    floor = tmp_path / "floor"
    result = subprocess.run([sys.executable, "-m", "hypertrain.cli", "eval", "--checkpoint", str(out), "--data",
                             str(test_data), "--main-input", "query", "--out", str(floor), "--max-new-tokens", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((floor / "metrics.json").read_text())["metrics"]["eval/sni/num_examples"] > 0


def test_a_failed_hf_export_leaves_the_earlier_one_as_it_was(tmp_path, monkeypatch):
    from hypertrain.export import write_hf_checkpoint
    from hypertrain.models import registry

    cfg = load_config(Config, CONFIGS / "hart_tiny.yaml", ["method=finetune"])
    method = build_method(cfg, "cpu")
    out = write_hf_checkpoint(method, cfg, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= set(before)

    with torch.no_grad():
        method.main.t5.shared.weight.add_(1.0)  # a different model...

    def broken(name):
        raise OSError("disk full")

    monkeypatch.setattr(registry, "load_tokenizer", broken)  # ...whose export fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        write_hf_checkpoint(method, cfg, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging directory left behind

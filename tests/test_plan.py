"""``hypertrain plan``: the activation model against measured CPU memory, model states under ZeRO, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hypertrain import plan as P
from hypertrain.cli import main as cli
from hypertrain.config import Config, load_config
from hypertrain.engine import enable_activation_checkpointing
from hypertrain.flops import Lengths, T5Dims
from hypertrain.memory_probe import LiveTensorBytes, measure_step
from hypertrain.models.build import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_live_tensor_bytes_counts_allocations_not_views_or_weights():
    weight = torch.randn(256, 256)  # made outside: never counted, even when viewed inside
    with LiveTensorBytes() as tracker:
        a = torch.randn(1000)
        b = a[:10].view(2, 5)  # a view: no new storage
        c = weight.t() @ torch.ones(256)
        assert tracker.current == 4000 + 1024
        del a, b
        assert tracker.current == 1024  # the view kept nothing alive once both are gone
        assert tracker.peak == 4000 + 2 * 1024  # a, the ones vector and c during the matmul
    del c


def _measure(config: str, overrides: list[str], *, dropout: bool, checkpointing: str, b: int, lengths: Lengths):
    cfg = load_config(Config, CONFIGS / config, overrides)
    torch.manual_seed(0)
    method = build_method(cfg, "cpu").train()
    enable_activation_checkpointing(method, checkpointing)
    if not dropout:
        from transformers.models.t5.modeling_t5 import T5Attention

        for module in method.modules():
            if isinstance(module, T5Attention):
                module.dropout = 0.0
            elif isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    g = torch.Generator().manual_seed(0)
    t, tt, h = lengths.input, lengths.target, lengths.hyper
    batch = {
        "input_ids": torch.randint(3, 300, (b, t), generator=g),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "labels": torch.randint(3, 300, (b, tt), generator=g),
        "hyper_input_ids": torch.randint(3, 300, (b, h), generator=g),
        "hyper_attention_mask": torch.ones(b, h, dtype=torch.long),
        "task_ids": torch.arange(b) % 2,
    }
    batch["attention_mask"][0, -5:] = 0  # padding: masks are per example
    batch["hyper_attention_mask"][0, -7:] = 0
    return cfg, measure_step(method, batch)


# (config, overrides, attention model, dropout, checkpointing): CPU runs SDPA with dropout on its math path
# (materialised, like eager) and without dropout on its flash kernel (fused)
CASES = [
    ("hart_tiny.yaml", ["model.attn_implementation=eager"], "materialized", True, "none"),
    ("hart_tiny.yaml", ["model.attn_implementation=eager", "model.dtype=bfloat16"], "materialized", True, "none"),
    ("hart_tiny.yaml", ["model.attn_implementation=sdpa"], "materialized", True, "none"),
    ("hart_tiny.yaml", ["model.attn_implementation=eager", "hart.decode=hf"], "materialized", True, "none"),
    ("hart_tiny.yaml", ["model.attn_implementation=sdpa"], "fused", False, "none"),
    ("hart_tiny.yaml", ["model.attn_implementation=eager"], "materialized", True, "both"),
    ("hart_tiny.yaml", ["model.attn_implementation=sdpa"], "fused", False, "main"),
    ("hart_tiny.yaml", ["method=hypertuning", "hart.generator=parallel"], "materialized", True, "hypernetwork"),
    ("pha_tiny.yaml", ["model.attn_implementation=eager", "pha.tasks=[a,b]"], "materialized", True, "none"),
    ("hart_tiny.yaml", ["method=finetune", "model.attn_implementation=eager"], "materialized", True, "none"),
    ("hart_tiny.yaml", ["method=finetune", "model.attn_implementation=sdpa"], "fused", False, "main"),
]


@pytest.mark.parametrize(("config", "overrides", "attention", "dropout", "checkpointing"), CASES)
def test_activation_model_matches_measured_cpu_memory(config, overrides, attention, dropout, checkpointing):
    """Live tensor bytes at the end of the forward within 15% (~1% without checkpointing) and the step's peak
    within 20% of the model, at tiny shapes where fixed costs weigh most."""
    b, lengths = 4, Lengths(48, 12, 64)
    cfg, measured = _measure(config, overrides, dropout=dropout, checkpointing=checkpointing, b=b, lengths=lengths)
    dtype_bytes = 2 if "model.dtype=bfloat16" in overrides else 4
    settings = P.ActivationSettings(
        dtype_bytes=dtype_bytes, mask_bytes=dtype_bytes, dropout=dropout, attention=attention, padded=True
    )
    model = P.activation_bytes(cfg, b, settings, checkpointing, lengths=lengths)
    kept_tol = 0.03 if checkpointing == "none" else 0.15
    assert measured["kept"] == pytest.approx(model["kept"], rel=kept_tol)
    assert measured["peak"] == pytest.approx(model["peak"], rel=0.2)


@pytest.mark.parametrize(("batch", "memory", "steps", "layers", "dropout"), [(4, 64, 2, 2, True), (2, 32, 6, 2, True),
                                                                       (3, 48, 6, 3, False)])
def test_fused_decode_model_matches_the_measured_decode(batch, memory, steps, layers, dropout):
    """HART's fused decode alone (it is a small part of a step, so the step-level test would hide its errors)."""
    import gc

    from hypertrain.models.hart import HartMethod
    from hypertrain.models.registry import build_t5
    from hypertrain.models.t5_main import FrozenT5

    torch.manual_seed(0)
    t5 = build_t5("tiny", device="cpu", num_layers=steps, num_decoder_layers=steps)
    method = HartMethod(FrozenT5(t5), prefix_length=4, hyper_decoder_layers=layers).train()
    method.hyper_decoder.dropout.p = 0.1 if dropout else 0.0
    demos = torch.randn(batch, memory, t5.config.d_model, requires_grad=True)
    mask = torch.ones(batch, memory, dtype=torch.long)
    mask[0, -3:] = 0
    with LiveTensorBytes() as tracker:
        states = method.autoregressive_states(demos, mask)
        gc.collect()
        kept = tracker.current
    del states
    # CPU SDPA: the math path with dropout (materialised), the flash kernel without (fused)
    settings = P.ActivationSettings(
        dtype_bytes=4, mask_bytes=4, dropout=dropout, attention="materialized" if dropout else "fused"
    )
    model = P.fused_decode_bytes(settings, T5Dims.from_hf_config(t5.config), batch, memory, steps=steps, layers=layers)
    assert kept == pytest.approx(model, rel=0.02)


def test_checkpointing_and_fused_gelu_shrink_activations():
    cfg = load_config(Config, CONFIGS / "hart_t5xl.yaml")
    st = P.ActivationSettings()
    kept = {c: P.activation_bytes(cfg, 8, st, c)["kept"] for c in P.CHECKPOINTING}
    assert kept["both"] < kept["hypernetwork"] < kept["main"] < kept["none"]
    fused = P.activation_bytes(cfg, 8, P.ActivationSettings(fused_gelu=True), "none")["kept"]
    assert fused < 0.9 * kept["none"]
    # activations grow linearly with the micro batch (no per-batch constant beyond the shared biases)
    assert P.activation_bytes(cfg, 16, st, "none")["kept"] == pytest.approx(2 * kept["none"], rel=0.01)


def test_model_states_under_zero():
    t, f = 1_000_000, 3_000_000
    s0 = P.state_bytes(t, f, stage=0, world=8, optimizer="adamw")
    s2 = P.state_bytes(t, f, stage=2, world=8, optimizer="adamw8bit")
    s3 = P.state_bytes(t, f, stage=3, world=8, optimizer="adamw8bit")
    assert s0["fp32 master weights"] == 4 * t and s0["optimizer state"] == 8 * t and s0["gradients"] == 6 * t
    assert s2["fp32 master weights"] == 4 * t / 8 and s2["gradients"] == 6 * t / 8
    assert s2["optimizer state"] == pytest.approx(2.03125 * t / 8)
    assert s2["frozen weights"] == 2 * f and s3["frozen weights"] == 2 * f / 8
    assert s3["trainable weights"] == 2 * t / 8


def test_plan_cli_for_hart_t5_xl(capsys):
    args = ["plan", "--config", str(CONFIGS / "hart_t5xl.yaml"), "--gpus", "8", "--gpu-memory", "80", "--json"]
    assert cli(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["zero_stage"] == 2 and plan["accumulation"] == 4
    trainable = plan["parameters"]["trainable"]
    assert plan["states_gib"]["fp32 master weights"] == pytest.approx(4 * trainable / 8 / 2**30)
    options = plan["checkpointing_options"]
    assert options["both"]["max_micro_batch"] > options["none"]["max_micro_batch"] >= 1
    assert options["none"]["total_gib"] > options["both"]["total_gib"]
    # 12.3 TFLOP x 256 x 20k steps on 8 H100 at 45% MFU
    assert plan["run_flops"] == pytest.approx(plan["flops_per_sample"] * 256 * 20000)
    assert 4.0 < plan["run_hours"] < 6.0
    assert cli(["plan", "--config", str(CONFIGS / "hart_t5xl.yaml"), "--gpus", "8", "--gpu", "NVIDIA A100-SXM4-80GB"]) == 0
    text = capsys.readouterr().out
    assert "312 TFLOP/s peak" in text and "max micro batch" in text


def test_plan_zero3_partitions_the_frozen_model(capsys):
    args = ["plan", "--config", str(CONFIGS / "hart_t5xl.yaml"), "--gpus", "8", "--ds-config",
            str(CONFIGS.parent / "ds_configs" / "zero3.json"), "--json"]
    assert cli(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["zero_stage"] == 3
    assert plan["states_gib"]["frozen weights"] == pytest.approx(2 * plan["parameters"]["frozen"] / 8 / 2**30)

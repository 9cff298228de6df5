"""DeepSpeed config resolution, and the shipped configs run through ``deepspeed.initialize`` on CPU.

The DeepSpeed runs happen in one subprocess (this file, run as a script) so that the test process never
initialises ``torch.distributed``: DeepSpeed's CPU accelerator, the gloo backend, world size 1, a tiny
module with a frozen part and a bitsandbytes ``AdamW8bit`` client optimizer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hypertrain.ds_config import (
    BF16_OVERFLOW_KEY,
    DSConfigError,
    load_ds_config,
    resolve_ds_config,
    zero_stage,
)

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
SHIPPED = ("zero2", "zero3", "zero3_offload")


def _resolve(raw: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        global_batch_size=128, micro_batch_size=4, world_size=8, gradient_clipping=1.0, bf16=True, d_model=2048,
    )
    kwargs.update(overrides)
    return resolve_ds_config(raw, **kwargs)


def _has_auto(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_has_auto(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_auto(v) for v in node)
    return node == "auto"


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_configs_resolve_every_auto(name: str, stage: int) -> None:
    raw = load_ds_config(DS_CONFIGS / f"{name}.json")
    assert _has_auto(raw), "the shipped configs are meant to defer to the hypertrain config"
    cfg = _resolve(raw, source=name)
    assert not _has_auto(cfg)
    assert zero_stage(cfg) == stage
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        128, 4, 4,
    )
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True, BF16_OVERFLOW_KEY: True}
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert cfg["wall_clock_breakdown"] is False and cfg["steps_per_print"] >= 10**6
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 2048 * 2048
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 2048 * 2048)
        assert zero["stage3_param_persistence_threshold"] == 10 * 2048
    if name == "zero3_offload":
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
        assert cfg["zero_force_ds_cpu_optimizer"] is False  # the bnb client optimizer steps on CPU
    assert raw["train_batch_size"] == "auto", "resolve_ds_config must not modify its input"


def test_bf16_off_and_explicit_overflow_choice_kept() -> None:
    cfg = _resolve({"bf16": {"enabled": "auto", BF16_OVERFLOW_KEY: False}}, bf16=False)
    assert cfg["bf16"] == {"enabled": False, BF16_OVERFLOW_KEY: False}
    cfg = _resolve({"bfloat16": {"enabled": True}})  # old spelling is normalised
    assert cfg["bf16"] == {"enabled": True, BF16_OVERFLOW_KEY: True} and "bfloat16" not in cfg


def test_batch_settings_named_in_errors() -> None:
    raw = {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}
    with pytest.raises(DSConfigError, match=r"train_batch_size 256 != micro 4 x accumulation 4 x world 8 \(=128"):
        _resolve(raw, source="my.json")
    with pytest.raises(DSConfigError, match=r"my\.json: train_batch_size 128 != micro 4 x accumulation 2 x world 8"):
        _resolve({"gradient_accumulation_steps": 2}, source="my.json")
    with pytest.raises(DSConfigError, match=r"100 is not a multiple of micro 4 x world 8 \(=32\)"):
        _resolve({}, global_batch_size=100)
    with pytest.raises(DSConfigError, match=r"16 < micro 4 x world 8 \(=32\)"):
        _resolve({}, global_batch_size=16)
    with pytest.raises(DSConfigError, match=r"train_micro_batch_size_per_gpu 2 != train.micro_batch_size 4"):
        _resolve({"train_micro_batch_size_per_gpu": 2})
    with pytest.raises(DSConfigError, match=r"train\.micro_batch_size is not set"):
        _resolve({"train_micro_batch_size_per_gpu": "auto"}, micro_batch_size=None)


def test_batch_from_json_micro_and_real_world_size() -> None:
    cfg = _resolve({"train_micro_batch_size_per_gpu": 2}, micro_batch_size=None, world_size=16)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        128, 2, 4,
    )
    cfg = _resolve({"train_batch_size": 128, "gradient_accumulation_steps": 1}, micro_batch_size=16)
    assert cfg["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"optimizer": {"type": "AdamW"}}, r"remove the \"optimizer\" block"),
        ({"scheduler": {"type": "WarmupLR"}}, r"remove the \"scheduler\" block"),
        ({"gradient_clipping": 0.5}, r"gradient_clipping 0.5 != the hypertrain setting 1.0"),
        ({"bf16": {"enabled": False}}, r"bf16.enabled is false"),
        ({"fp16": {"enabled": True}}, r"fp16 is not supported"),
        ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, r"both \"bf16\" and the old"),
        ({"zero_optimization": {"stage": 5}}, r"stage must be 0, 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, r"\"auto\" at zero_optimization.sub_group_size"),
        ({"zero_allow_untested_optimizer": False}, r"zero_allow_untested_optimizer must be true"),
    ],
)
def test_inconsistent_settings_rejected(raw: dict[str, Any], pattern: str) -> None:
    with pytest.raises(DSConfigError, match=pattern):
        _resolve(raw, source="cfg.json")


def test_explicit_consistent_values_pass() -> None:
    raw = {"gradient_clipping": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": 5}}
    cfg = _resolve(raw)
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_optimization"]["reduce_bucket_size"] == 5


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DSConfigError, match="nope.json"):
        load_ds_config(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": }')
    with pytest.raises(DSConfigError, match=r"bad\.json: not valid JSON \(line 1"):
        load_ds_config(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(DSConfigError, match=r"list\.json: top level must be a JSON object"):
        load_ds_config(listed)
    assert zero_stage({}) == 0


# --------------------------------------------------------------------------------------------------
# Real deepspeed.initialize on CPU (one subprocess for all cases)
# --------------------------------------------------------------------------------------------------

# (case, config file, bf16, overrides of the raw JSON, NaN loss injected at optimizer step 1)
CASES: list[tuple[str, str, bool, dict[str, Any], bool]] = [
    ("zero2", "zero2", False, {}, False),
    ("zero3", "zero3", False, {}, False),
    ("zero3_offload", "zero3_offload", False, {}, False),
    ("zero3_offload_forced_ds_cpu_optimizer", "zero3_offload", False, {"zero_force_ds_cpu_optimizer": True}, False),
    ("zero2_bf16_nan", "zero2", True, {}, True),
    ("zero2_bf16_nan_unchecked", "zero2", True, {"bf16": {"enabled": "auto", BF16_OVERFLOW_KEY: False}}, True),
    ("zero3_bf16_nan", "zero3", True, {}, True),
]
STEPS = 3  # optimizer steps; global batch 4 = micro 2 x accumulation 2 x world 1


def _worker() -> None:  # pragma: no cover - runs in the subprocess
    """Run every case and print one JSON line per case."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import bitsandbytes as bnb
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = torch.nn.Linear(16, 16)  # stands in for the frozen main model
            self.hyper = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.Tanh(), torch.nn.Linear(128, 16))
            self.frozen.requires_grad_(False)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.mse_loss(self.hyper(self.frozen(x)).float(), y)

    def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params):  # a no-op below ZeRO-3
            return {n: p.detach().float().clone() for n, p in module.named_parameters()}

    for case, name, bf16, overrides, inject_nan in CASES:
        result: dict[str, Any] = {"case": case}
        try:
            torch.manual_seed(0)
            model = Tiny()
            raw = load_ds_config(DS_CONFIGS / f"{name}.json")
            raw.update(overrides)
            cfg = resolve_ds_config(
                raw, global_batch_size=4, micro_batch_size=2, world_size=1, gradient_clipping=0.5,
                bf16=bf16, d_model=16, source=name,
            )
            optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
            before = snapshot(engine.module)
            dtype = torch.bfloat16 if bf16 else torch.float32
            losses = []
            for step in range(STEPS):
                for _ in range(engine.gradient_accumulation_steps()):
                    x, y = torch.randn(2, 16, dtype=dtype), torch.randn(2, 16)
                    loss = engine(x, y)
                    if inject_nan and step == 1:
                        loss = loss * float("nan")
                    engine.backward(loss)
                    engine.step()
                    losses.append(loss.item())
            after = snapshot(engine.module)
            result.update(
                ok=True,
                global_steps=engine.global_steps,
                skipped_steps=engine.skipped_steps,
                clipping=engine.gradient_clipping(),
                batch=[engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
                       engine.gradient_accumulation_steps()],
                losses=losses,
                frozen_unchanged=all(torch.equal(before[n], after[n]) for n in before if n.startswith("frozen.")),
                trained_changed=all(not torch.equal(before[n], after[n]) for n in before if n.startswith("hyper.")),
                finite=all(bool(torch.isfinite(t).all()) for t in after.values()),
            )
            engine.destroy()
        except Exception as err:  # reported to the test process
            result.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000])
        print("RESULT " + json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, __file__], cwd=tmp_path_factory.mktemp("ds"), env=env,
        capture_output=True, text=True, timeout=900,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row = json.loads(line[len("RESULT "):])
            results[row["case"]] = row
    if len(results) != len(CASES):
        pytest.fail(f"DeepSpeed worker exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero2", "zero3", "zero3_offload"])
def test_shipped_config_trains_with_bnb_client_optimizer(ds_runs: dict[str, dict[str, Any]], case: str) -> None:
    run = ds_runs[case]
    assert run["ok"], run.get("error")
    assert run["global_steps"] == STEPS and run["skipped_steps"] == 0
    assert run["batch"] == [4, 2, 2]
    assert run["clipping"] == 0.5
    assert run["finite"] and run["frozen_unchanged"] and run["trained_changed"]


@pytest.mark.slow
def test_offload_needs_client_cpu_optimizer_opt_in(ds_runs: dict[str, dict[str, Any]]) -> None:
    run = ds_runs["zero3_offload_forced_ds_cpu_optimizer"]
    assert not run["ok"] and "zero_force_ds_cpu_optimizer" in run["error"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["zero2_bf16_nan", "zero3_bf16_nan"])
def test_bf16_nan_gradients_skip_the_step(ds_runs: dict[str, dict[str, Any]], case: str) -> None:
    run = ds_runs[case]
    assert run["ok"], run.get("error")
    assert run["global_steps"] == STEPS and run["skipped_steps"] == 1
    assert run["finite"] and run["frozen_unchanged"]


@pytest.mark.slow
def test_bf16_overflow_key_is_what_protects_zero2(ds_runs: dict[str, dict[str, Any]]) -> None:
    """With ``check_grad_overflow`` false, DeepSpeed 0.19.8 applies the NaN step under bf16 ZeRO-2."""
    run = ds_runs["zero2_bf16_nan_unchecked"]
    assert run["ok"], run.get("error")
    assert run["skipped_steps"] == 0 and not run["finite"]


if __name__ == "__main__":
    _worker()


def test_auto_buckets_have_a_floor_for_small_models():
    raw = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "allgather_bucket_size": "auto"}}
    cfg = resolve_ds_config(raw, global_batch_size=8, micro_batch_size=4, world_size=2, gradient_clipping=1.0,
                            bf16=False, d_model=64)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 2048 * 2048
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 2048 * 2048

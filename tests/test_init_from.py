"""``train.init_from``: an export's trained parameters start a new run of the same family; mismatches are named.

(The whole path, C4 pretraining then fine-tuning through DeepSpeed with the source recorded in MLflow, runs in
``tests/test_repro.py``.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from hypertrain.checkpoint import write_checksums
from hypertrain.config import Config, ConfigError, from_dict
from hypertrain.init_from import load_initial_weights, resolve_init_source
from hypertrain.models.build import build_method


def _cfg(method: str, **sections) -> Config:
    base = {"method": method, "hart": {"prefix_length": 2, "hyper_decoder_layers": 1}}
    return from_dict(Config, {**base, **sections})


def _export(method: torch.nn.Module, cfg: Config, out: Path) -> Path:
    out.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in method.named_parameters() if p.requires_grad},
              str(out / "trainable.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)), encoding="utf-8")
    (out / "tasks.json").write_text(json.dumps(["c4-train.00000-of-01024"]), encoding="utf-8")
    write_checksums(out)
    return out


@pytest.fixture()
def pretrained(tmp_path) -> Path:
    cfg = _cfg("hypertuning", hart={"prefix_length": 2, "hyper_decoder_layers": 1, "fusion": False})
    torch.manual_seed(1)
    method = build_method(cfg)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # trained weights: unlike any fresh initialisation
    return _export(method, cfg, tmp_path / "pretrained")


def test_trainable_parameters_start_from_the_source(pretrained):
    cfg = _cfg("hypertuning", train={"init_from": str(pretrained)})
    source = resolve_init_source(cfg)
    assert source.method == "hypertuning" and source.tags()["hypertrain.init_from"] == str(pretrained)
    assert len(source.tags()["hypertrain.init_from_sha256"]) == 64
    method = build_method(cfg)
    frozen_before = {n: p.clone() for n, p in method.named_parameters() if not p.requires_grad}
    count = load_initial_weights(method, source)
    from safetensors.torch import load_file

    saved = load_file(str(pretrained / "trainable.safetensors"))
    assert count == len(saved)
    for name, param in method.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0)
        else:
            assert torch.equal(param, frozen_before[name])


def test_another_family_or_model_is_refused(pretrained):
    with pytest.raises(ConfigError, match="holds a hypertuning model, this run trains pha"):
        resolve_init_source(_cfg("pha", train={"init_from": str(pretrained)}))
    with pytest.raises(ConfigError, match="model.name 'tiny', this run uses 'small'"):
        resolve_init_source(_cfg("hart", model={"name": "small"}, train={"init_from": str(pretrained)}))


def test_other_shapes_are_named(pretrained):
    cfg = _cfg("hart", hart={"prefix_length": 3, "hyper_decoder_layers": 1}, train={"init_from": str(pretrained)})
    source = resolve_init_source(cfg)  # same family (HART's settings differ)
    with pytest.raises(ConfigError, match=r"does not fit this model: other shape: .*latent"):
        load_initial_weights(build_method(cfg), source)


def test_a_damaged_source_is_refused(pretrained):
    path = pretrained / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="train.init_from"):
        resolve_init_source(_cfg("hypertuning", train={"init_from": str(pretrained)}))


def test_preflight_names_a_missing_source_unless_the_run_resumes(tmp_path):
    from hypertrain.preflight import path_problems

    cfg = _cfg("hypertuning", train={"init_from": str(tmp_path / "gone")}, run={"dir": str(tmp_path / "run")},
               data={"train": [str(tmp_path)]})
    (tmp_path / "manifest.json").write_text("{}")
    assert any(p.startswith("train.init_from:") for p in path_problems(cfg))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000010\n")
    assert path_problems(cfg) == []  # a resumed run starts from its checkpoint, not from init_from

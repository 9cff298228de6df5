"""``hypertrain params``: meta-device parameter accounting, checked against the HART appendix's shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypertrain.cli import main as cli
from hypertrain.config import Config, ConfigError, load_config
from hypertrain.models.build import build_method
from hypertrain.models.registry import build_t5, count_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _params(capsys, config: str, *extra: str) -> dict:
    assert cli(["params", "--config", str(CONFIGS / config), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _head(layers: int, d: int, first_out: int) -> int:
    """One group of MLPs (appendix 6.1.2): per-layer LayerNorm, a first Linear shared by the group's layers
    (d → first_out), tanh, a per-layer Linear d → d; all with biases."""
    return layers * 2 * d + (d * first_out + first_out) + layers * (d * d + d)


@pytest.mark.parametrize(
    ("config", "generator", "first_out", "latent_rows"),
    [("hart_t5xl.yaml", "autoregressive", 32 * 2048, 2), ("hypertuning_t5xl.yaml", "parallel", 2048, 64)],
)
def test_t5_xl_counts_match_the_appendix(capsys, config, generator, first_out, latent_rows):
    counts = _params(capsys, config)
    parts = counts["components"]
    L, d = 24, 2048
    assert counts["generator"] == generator
    for group in ("encoder key", "encoder value", "decoder key", "decoder value"):
        assert parts[f"heads: {group}"] == {"trainable": _head(L, d, first_out), "frozen": 0}
    assert parts["learnable input"]["trainable"] == latent_rows * d
    main = count_parameters(build_t5("xl"))["total"]
    assert main == 2_849_757_184  # T5-XL v1.1 LM-adapt (untied lm_head)
    assert parts["main model"] == {"trainable": 0, "frozen": main}
    assert parts["hypernetwork embeddings"]["trainable"] == 32128 * d
    # encoder = 24 blocks + final norm; decoder = 8 of the 24 decoder blocks + final norm, no embeddings
    enc_block = 4 * d * d + 3 * d * 5120 + 2 * d
    dec_block = 8 * d * d + 3 * d * 5120 + 3 * d
    assert parts["hypernetwork encoder"]["trainable"] == 24 * enc_block + 32 * 32 + d
    assert parts["hypernetwork decoder"]["trainable"] == 8 * dec_block + 32 * 32 + d
    assert counts["frozen"] == main and counts["total"] == counts["trainable"] + main


def test_head_shapes_follow_the_appendix():
    config = load_config(Config, CONFIGS / "hart_t5large.yaml")
    hart = build_method(config, device="meta")
    head = hart.heads["encoder_key"]
    assert head.shared.weight.shape == (32 * 1024, 1024)  # R^{d_m x p d_m}, shared by the 24 layers
    assert head.weight.shape == (24, 1024, 1024)  # one R^{d_m x d_m} per layer
    assert len(hart.hyper_decoder.block) == 8 and len(hart.main.t5.decoder.block) == 24
    assert all(p.device.type == "meta" for p in hart.parameters())
    config.method, config.hart.generator = "hypertuning", None
    parallel = build_method(config, device="meta")
    assert parallel.heads["decoder_value"].shared.weight.shape == (1024, 1024)


def test_text_output_and_overrides(capsys):
    assert cli(["params", "--config", str(CONFIGS / "hart_tiny.yaml"), "hart.prefix_length=2"]) == 0
    text = capsys.readouterr().out
    for name in (
        "hypernetwork encoder",
        "hypernetwork decoder",
        "learnable input",
        "heads: decoder value",
        "main model",
        "total",
    ):
        assert name in text
    tiny = _params(capsys, "hart_tiny.yaml", "hart.prefix_length=2")
    assert tiny["components"]["heads: encoder key"]["trainable"] == _head(2, 64, 2 * 64)


def test_config_errors():
    with pytest.raises(ConfigError, match="hart.generator"):
        build_method(
            load_config(Config, CONFIGS / "hypertuning_t5xl.yaml", ["hart.generator=autoregressive"]), "meta"
        )
    with pytest.raises(ConfigError, match="hyper_decoder_layers"):
        build_method(load_config(Config, CONFIGS / "hart_tiny.yaml", ["hart.hyper_decoder_layers=3"]), "meta")
    with pytest.raises(ConfigError, match="hart.prefix_length"):
        load_config(Config, CONFIGS / "hart_tiny.yaml", ["hart.prefix_length=0"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(Config, CONFIGS / "hart_t5xl.yaml", ["train.micro_batch_size=12"])

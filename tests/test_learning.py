"""HART learns: on unseen instances of its training tasks it beats the no-PEFT floor, through its prefixes and
through its fusion states, each on its own.

The setting (deterministic on CPU, about two minutes): four demo classification tasks whose inputs look alike two
by two (``even_or_odd`` / ``high_or_low`` read a number, ``starts_with_vowel`` / ``long_or_short`` a word). The tiny
main model is fully fine-tuned on the bare queries (FT-Zero-Shot), so it cannot know which task a query belongs to:
the floor is what it answers alone. HART is then trained over the frozen main model, once with prefixes only
(``hart.fusion: false``) and once with fusion states only (prefix heads fixed at zero), and evaluated on instances
drawn with another seed, minus any input seen in training. Measured (seed 0): floor 20.6 ROUGE-L, prefixes only
52.2 after 300 steps (46.3 after 200, the test's length; 36.8 after 150), fusion states only 42.6 after 300, both
56.6; the tests ask for 15 points over the floor. Breaking either path once
(prefixes or fusion states multiplied by zero where they enter the main model) left its run at 21.3 and 20.6: the
matching test fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from data_prep.shards import read_episodes
from hypertrain import quick
from hypertrain.config import Config, load_config

TASKS = ("even_or_odd", "high_or_low", "starts_with_vowel", "long_or_short")
HART_STEPS = 300
"""At 200 steps the fusion-only margin was 16.2 points: too close to the bar to be a reliable test."""
PREFIX_STEPS = 200
"""Prefixes alone learn faster: margin 25.7 at 200 steps (16.2 at 150, too close to the bar)."""
MARGIN = 15.0
"""ROUGE-L points over the floor that HART must reach (measured: 25.7 with prefixes alone at 200 steps, 22.1 with
fusion alone at 300)."""
BASE = ["model.name=tiny", "model.dtype=float32", "data.max_input_tokens=32", "data.max_target_tokens=24",
        "data.max_hyper_input_tokens=256", "train.optimizer=adamw", "train.seed=0", "eval.max_new_tokens=24",
        "eval.batch_size=64"]


@dataclasses.dataclass
class Setting:
    train: list
    test: quick.EvalSet
    main: Path
    floor: float


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> Setting:
    return build_setting(tmp_path_factory.mktemp("learning"))


def build_setting(root: Path) -> Setting:
    """Tasks, prep, the FT-Zero-Shot main model and its floor on the unseen instances."""
    from data_prep.demo import DemoTasksConfig, generate
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    torch.set_num_threads(2)
    generate(DemoTasksConfig(out=str(root / "src_train"), seed=0, instances_per_task=40, train_names=TASKS))
    generate(DemoTasksConfig(out=str(root / "src_test"), seed=1, instances_per_task=60, test_names=TASKS))
    prepare(SNIPrepConfig(src=str(root / "src_train"), out=str(root / "train"), split="train", max_instances_per_task=40))
    prepare(SNIPrepConfig(src=str(root / "src_test"), out=str(root / "test"), split="test", max_instances_per_task=60))
    train = read_episodes(root / "train")
    seen = {(e.task, e.input) for e in train}
    unseen = [e for e in read_episodes(root / "test") if (e.task, e.input) not in seen]
    assert len(unseen) >= 60, "too few unseen instances to measure anything"
    test = quick.generation_set(unseen)

    cfg = load_config(Config, None, [*BASE, "method=finetune", "train.total_steps=400", "train.lr=3e-3",
                                     "train.warmup_steps=30", "train.global_batch_size=32"])
    main = quick.train(cfg, train)
    floor = quick.rouge_l(main.method, cfg, test)["rougeL"]
    return Setting(train, test, quick.save_main_model(main.method, cfg, root / "main"), floor)


def _hart(setting: Setting, *overrides: str, fusion_only: bool = False, steps: int = HART_STEPS) -> tuple[float, quick.Run]:
    cfg = load_config(Config, None, [*BASE, "method=hart", f"model.name={setting.main}", f"train.total_steps={steps}",
                                     "hart.prefix_length=4", "hart.hyper_decoder_layers=2", "train.lr=1e-3",
                                     "train.warmup_steps=30", "train.global_batch_size=16", *overrides])
    run = quick.train(cfg, setting.train, prepare=zero_prefix_heads if fusion_only else None)
    return quick.rouge_l(run.method, cfg, setting.test)["rougeL"], run


def zero_prefix_heads(method: torch.nn.Module) -> None:
    """Prefixes fixed at zero (keys and values): only the fusion states can carry the task to the main model."""
    for head in method.heads.values():
        for p in head.parameters():
            p.requires_grad_(False)
        head.weight.zero_()
        head.bias.zero_()


def test_the_floor_cannot_tell_the_tasks_apart(setting):
    assert 20.0 < setting.floor < 60.0, setting.floor  # right label set half the time, at best


def test_hart_prefixes_alone_beat_the_floor(setting):
    score, run = _hart(setting, "hart.fusion=false", steps=PREFIX_STEPS)
    assert score > setting.floor + MARGIN, (setting.floor, score)
    assert sum(run.parts["lm"][-20:]) / 20 < 0.5 * sum(run.parts["lm"][:20]) / 20


def test_hart_fusion_states_alone_beat_the_floor(setting):
    score, _ = _hart(setting, "hart.fusion=true", fusion_only=True)
    assert score > setting.floor + MARGIN, (setting.floor, score)

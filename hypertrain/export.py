"""``hypertrain export CHECKPOINT OUT``: the trained hypernetwork alone, loadable without DeepSpeed.

An export directory holds ``trainable.safetensors`` (the trained parameters), ``config.yaml`` (the run's
resolved configuration) and ``tasks.json`` (the training task list, which PHA's prototypes index). The frozen main
model is not copied: :func:`load_trained_method` rebuilds it from ``model.name`` (the pretrained checkpoint or,
for ``tiny``, its seeded random weights) and loads the trained parameters on top. Nothing is unpickled.

``load_trained_method`` accepts an export directory, a checkpoint directory (``.../checkpoints/step-00001000``) or
a run directory (its latest checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from hypertrain.checkpoint import LATEST, STATE_FILE, TRAINABLE_FILE
from hypertrain.config import Config, from_dict

CONFIG_FILE = "config.yaml"
TASKS_FILE = "tasks.json"


def resolve_checkpoint(path: str | Path) -> Path:
    """An export or checkpoint directory, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / TRAINABLE_FILE).is_file():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.is_file():
        return resolve_checkpoint(path / "checkpoints" / pointer.read_text().strip())
    raise FileNotFoundError(f"{path}: neither an export, a checkpoint nor a run directory with checkpoints")


def read_run_info(path: Path) -> tuple[Config, list[str]]:
    """The configuration and task list stored with a checkpoint or an export."""
    if (path / STATE_FILE).is_file():
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        return from_dict(Config, state["config"]), list(state["tasks"])
    config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    tasks = json.loads((path / TASKS_FILE).read_text(encoding="utf-8"))
    return from_dict(Config, config), list(tasks)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``trainable.safetensors``, ``config.yaml`` and ``tasks.json`` of a checkpoint to ``out``."""
    source = resolve_checkpoint(checkpoint)
    cfg, tasks = read_run_info(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / TRAINABLE_FILE, out / TRAINABLE_FILE)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")
    (out / TASKS_FILE).write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
    return out


def load_trained_method(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, list[str]]:
    """Rebuild the method of a checkpoint or export and load its trained parameters (eval mode)."""
    from hypertrain.models.build import build_method

    source = resolve_checkpoint(path)
    cfg, tasks = read_run_info(source)
    if cfg.method == "pha" and not cfg.pha.tasks:
        cfg.pha.tasks = tasks
    method = build_method(cfg, device)
    weights = load_file(str(source / TRAINABLE_FILE), device=str(device))
    trainable = {name for name, param in method.named_parameters() if param.requires_grad}
    missing = sorted(trainable - set(weights))
    unexpected = sorted(set(weights) - trainable)
    if missing or unexpected:
        raise ValueError(
            f"{source / TRAINABLE_FILE} does not fit the configured {cfg.method} model: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
        )
    method.load_state_dict(weights, strict=False)
    method.eval()
    return method, cfg, tasks


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="write a checkpoint's trained hypernetwork as safetensors + config")
    parser.add_argument("checkpoint", help="checkpoint directory (or a run directory: its latest checkpoint)")
    parser.add_argument("out", help="output directory")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.out)
    size = (out / TRAINABLE_FILE).stat().st_size / 2**20
    print(f"exported {resolve_checkpoint(args.checkpoint)} to {out} ({size:.1f} MiB of trained weights)")
    return 0

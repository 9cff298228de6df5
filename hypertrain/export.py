"""``hypertrain export CHECKPOINT OUT``: the trained hypernetwork alone, loadable without DeepSpeed.

An export directory holds ``trainable.safetensors`` (the trained parameters), ``config.yaml`` (the run's
resolved configuration) and ``tasks.json`` (the training task list, which PHA's prototypes index); a LoRA run's
export also holds the adapter in Hugging Face PEFT's format (``adapter_config.json``,
``adapter_model.safetensors``: ``PeftModel.from_pretrained(t5, OUT)``). The frozen main
model is not copied: :func:`load_trained_method` rebuilds it from ``model.name`` (the pretrained checkpoint or,
for ``tiny``, its seeded random weights) and loads the trained parameters on top. Nothing is unpickled.

``load_trained_method`` accepts an export directory, a checkpoint directory (``.../checkpoints/step-00001000``) or
a run directory (its latest checkpoint). Every one is verified against its ``checksums.json`` before it is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from hypertrain.config import Config, from_dict

if TYPE_CHECKING:
    import torch

# hypertrain.checkpoint (torch, safetensors) is imported where it is used, so that `hypertrain export --help` is fast.
log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"
TASKS_FILE = "tasks.json"


def resolve_checkpoint(path: str | Path, verify: str = "sha256") -> Path:
    """An export or checkpoint directory, or a run directory's latest checkpoint, verified against its
    ``checksums.json`` (a run directory whose ``latest`` is lost or bad gives the newest checkpoint that verifies,
    with a warning). Raises :class:`~hypertrain.checkpoint.CheckpointError` naming what is wrong."""
    from hypertrain.checkpoint import CHECKSUM_FILE, STATE_FILE, TRAINABLE_FILE, Checkpoints, require_verified

    path = Path(path)
    if (path / STATE_FILE).is_file() or (path / CHECKSUM_FILE).is_file():  # a checkpoint, or a checksummed export
        if verify != "none":  # "none": the caller verified this directory already
            require_verified(path, verify)
        return path
    if (path / TRAINABLE_FILE).is_file():  # an export written before exports carried checksums
        return path
    if (path / "checkpoints").is_dir():
        found, note = Checkpoints(path, rank=0, keep_last=1, barrier=lambda: None, verify=verify).resume_point()
        if found is not None:
            if note:
                log.warning("%s", note)
            return found
    raise FileNotFoundError(f"{path}: neither an export, a checkpoint nor a run directory with checkpoints")


def read_run_info(path: Path) -> tuple[Config, list[str]]:
    """The configuration and task list stored with a checkpoint or an export."""
    from hypertrain.checkpoint import STATE_FILE, read_state

    if (path / STATE_FILE).is_file():
        state = read_state(path)
        return from_dict(Config, state["config"]), list(state["tasks"])
    config = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    tasks = json.loads((path / TASKS_FILE).read_text(encoding="utf-8"))
    return from_dict(Config, config), list(tasks)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``trainable.safetensors``, ``config.yaml`` and ``tasks.json`` of a checkpoint to ``out``."""
    from hypertrain.checkpoint import TRAINABLE_FILE, write_checksums

    source = resolve_checkpoint(checkpoint)
    cfg, tasks = read_run_info(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / TRAINABLE_FILE, out / TRAINABLE_FILE)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")
    (out / TASKS_FILE).write_text(json.dumps(tasks, indent=1) + "\n", encoding="utf-8")
    if cfg.method == "lora":  # also in PEFT's own format: PeftModel.from_pretrained(t5, out) loads it
        method, _, _ = load_trained_method(source, "cpu", verify="none")
        method.save_adapter(out)
    write_checksums(out)
    return out


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """A full fine-tuning run's T5 as a Hugging Face checkpoint directory (``save_pretrained`` weights and config,
    tokenizer files): ``model.name: <out>`` loads it anywhere, as a frozen main model or a hypernetwork's start."""
    from hypertrain.checkpoint import CheckpointError

    method, cfg, _tasks = load_trained_method(checkpoint, "cpu")
    if cfg.method != "finetune":
        raise CheckpointError(
            f"{checkpoint}: --hf writes a fine-tuned T5, and this is a {cfg.method} run whose main model is frozen "
            f"(it is {cfg.model.name!r} unchanged); export its trained parameters without --hf"
        )
    return write_hf_checkpoint(method, cfg, out)


def write_hf_checkpoint(method: torch.nn.Module, cfg: Config, out: str | Path) -> Path:
    """A full fine-tuning method's T5 (``method.main.t5``) as ``save_pretrained`` files + the tokenizer's.

    Written beside ``out`` and swapped in when complete (:mod:`data_prep.staging`): a failed export leaves an
    earlier one in ``out`` as it was."""
    from data_prep.staging import commit, discard, staging_dir
    from hypertrain.models.registry import load_tokenizer

    staging = staging_dir(out, shared=False)
    discard(staging)
    try:
        staging.mkdir(parents=True)
        method.main.t5.save_pretrained(staging, safe_serialization=True)
        # Plain T5 as far as anyone loading it can tell: the class hypertrain swapped in is not named, and lm_head is
        # declared untied (it is its own matrix, as in T5 v1.1; transformers 5 writes tie_word_embeddings: true).
        config_file = staging / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config.update(architectures=["T5ForConditionalGeneration"], tie_word_embeddings=False)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        load_tokenizer(cfg.model.tokenizer or cfg.model.name).save_pretrained(staging)
        commit(staging, out)
    except BaseException:
        discard(staging)
        raise
    return Path(out)


def load_trained_method(
    path: str | Path, device: str | torch.device = "cpu", verify: str = "sha256"
) -> tuple[torch.nn.Module, Config, list[str]]:
    """Rebuild the method of a checkpoint or export and load its trained parameters (eval mode)."""
    from safetensors.torch import load_file

    from hypertrain.checkpoint import TRAINABLE_FILE, CheckpointError
    from hypertrain.models.build import build_method

    source = resolve_checkpoint(path, verify)
    cfg, tasks = read_run_info(source)
    if cfg.method == "pha" and not cfg.pha.tasks:
        cfg.pha.tasks = tasks
    method = build_method(cfg, device)
    try:
        weights = load_file(str(source / TRAINABLE_FILE), device=str(device))
    except Exception as err:  # safetensors' own messages do not name the file
        raise CheckpointError(f"{source / TRAINABLE_FILE}: unreadable ({err})") from err
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
    parser = subparsers.add_parser(
        "export", help="write a checkpoint's trained parameters as safetensors + config (or, --hf, a fine-tuned T5)",
        description="Write a checkpoint's trained parameters (safetensors, config, task list; loadable without "
        "DeepSpeed), or with --hf a full fine-tuning run's T5 as a Hugging Face checkpoint directory.",
    )
    parser.add_argument("checkpoint", help="checkpoint directory (or a run directory: its latest checkpoint)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--hf", action="store_true",
                        help="method finetune: save_pretrained weights + tokenizer files, loadable as model.name: OUT")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from hypertrain.checkpoint import TRAINABLE_FILE, CheckpointError

    try:
        out = export_hf(args.checkpoint, args.out) if args.hf else export(args.checkpoint, args.out)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 2
    if args.hf:
        print(f"exported {args.checkpoint} to {out} as a Hugging Face checkpoint (use it as model.name: {out})")
        return 0
    size = (out / TRAINABLE_FILE).stat().st_size / 2**20
    print(f"exported {args.checkpoint} to {out} ({size:.1f} MiB of trained weights, verified)")
    return 0

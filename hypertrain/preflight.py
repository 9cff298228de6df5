"""Checks of the paths a training config names, run before any rank joins a process group or DeepSpeed starts.

A missing data directory otherwise surfaces after process-group set-up, DeepSpeed's op builds and the model load
(tens of seconds, as a traceback). Here it is one line naming the key, the path and what to do.
"""

from __future__ import annotations

from pathlib import Path

from hypertrain.config import Config
from hypertrain.models.registry import canonical_name

MANIFEST = "manifest.json"


def _prepared(key: str, value: str, what: str) -> str | None:
    """A problem with one prepared-data entry (a directory holding ``manifest.json``, or that file), or None."""
    path = Path(value).expanduser()
    if path.is_file() and path.name == MANIFEST:
        return None
    if not path.exists():
        return f"{key}: {value} does not exist (prepare {what} first, e.g. python -m data_prep.sni --out {value} ...)"
    if not (path / MANIFEST).is_file():
        return f"{key}: {value} holds no {MANIFEST} (not a prepared directory, or its prep has not finished)"
    return None


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _model(key: str, name: str | None) -> str | None:
    """A local model or tokenizer path that is missing or incomplete; hub names and registry shapes pass."""
    if not name or canonical_name(name) is not None or name == "byt5" or not _looks_local(name):
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return f"{key}: {name} does not exist (a registry name such as tiny or xl, a hub id, or a local checkpoint)"
    if key == "model.name" and not (path / "config.json").is_file():
        return f"{key}: {name} holds no config.json (write one with hypertrain export --hf RUN DIR or save_pretrained)"
    return None


def path_problems(cfg: Config) -> list[str]:
    """Every problem with a path ``cfg`` names for training, one line each (empty: all present)."""
    problems = [_prepared(f"data.train[{i}]", value, "the training data") for i, value in enumerate(cfg.data.train)]
    problems += [_prepared(f"eval.data[{i}]", value, "the evaluation data") for i, value in enumerate(cfg.eval.data)]
    problems += [_model("model.name", cfg.model.name), _model("model.tokenizer", cfg.model.tokenizer)]
    resuming = (Path(cfg.run.dir) / "checkpoints" / "latest").is_file() and cfg.run.resume == "auto"
    if cfg.train.init_from and not resuming and not Path(cfg.train.init_from).expanduser().exists():
        problems.append(f"train.init_from: {cfg.train.init_from} does not exist (a run, checkpoint or export directory)")
    if not cfg.data.train:
        problems.append("data.train: no training data (list prepared directories holding manifest.json)")
    return [p for p in problems if p]

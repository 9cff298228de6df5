"""The ``hypertrain`` command: one sub-command per module, each registering its own arguments.

A sub-command module exposes ``register(subparsers)`` which adds its parser and sets ``func`` to a callable
taking the parsed arguments and returning an exit code. Only the module of the command
being run is imported, so ``hypertrain --help`` and each command's ``--help`` stay fast (none imports torch) and a
broken optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# sub-command → (module that registers it, one-line help for ``hypertrain --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hypertrain.main", "train a method (HART, HyperTuning, PHA, full fine-tuning, Prefix-Tuning, LoRA); see train --help"),
    "stop": ("hypertrain.stop", "ask a running training job to checkpoint and stop"),
    "params": ("hypertrain.params", "trainable and frozen parameter counts of a config (no download, no memory)"),
    "plan": ("hypertrain.plan", "memory per GPU, largest micro batch, accumulation and run time of a config"),
    "export": ("hypertrain.export", "write a checkpoint's trained parameters (or, --hf, a fine-tuned T5)"),
    "generate": ("hypertrain.generate", "write the adapter a trained hypernetwork generates for your own task"),
    "predict": ("hypertrain.predict", "answer inputs with the frozen main model and a generated adapter"),
    "eval": ("hypertrain.evaluation.cli", "evaluate a checkpoint: S-NI ROUGE-L / exact match, P3 accuracy"),
    "demo": ("hypertrain.demo", "the whole pipeline on CPU in minutes: tasks, prep, training, evaluation, comparison"),
    "compare": ("hypertrain.compare", "compare runs from MLflow: a table and PNG plots (or a paper's table layout)"),
    "repro": ("hypertrain.repro", "submit every run of one of HART's tables to Slurm (configs/repro/)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported (the others are listed by their help line)."""
    parser = argparse.ArgumentParser(
        prog="hypertrain", description="Train and evaluate hypernetworks that write PEFT weights for a frozen T5."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_line) in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


# sub-commands that take their own command line whole (``hypertrain train --config ... key=value``)
PASSTHROUGH: dict[str, str] = {"train": "hypertrain.main"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        module = importlib.import_module(PASSTHROUGH[argv[0]])
        return int(module.main(argv[1:], prog=f"hypertrain {argv[0]}") or 0)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):  # only reachable for a command whose module was not loaded
        parser.error(f"cannot run {args.command!r}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

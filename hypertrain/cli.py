"""The ``hypertrain`` command: one sub-command per module, each registering its own arguments.

A sub-command module exposes ``register(subparsers)`` which adds its parser and sets ``func`` to a callable
taking the parsed arguments and returning an exit code. Modules are imported lazily so that ``hypertrain
--help`` stays fast and a broken optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# sub-command → module that registers it
COMMANDS: dict[str, str] = {
    "train": "hypertrain.main",
    "params": "hypertrain.params",
    "plan": "hypertrain.plan",
    "export": "hypertrain.export",
    "demo": "hypertrain.demo",
    "compare": "hypertrain.compare",
    "eval": "hypertrain.evaluation.cli",
    "stop": "hypertrain.stop",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypertrain", description="Train and evaluate hypernetworks that write PEFT weights for a frozen T5."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(subparsers)
    return parser


# sub-commands that take their own command line whole (``hypertrain train --config ... key=value``)
PASSTHROUGH: dict[str, str] = {"train": "hypertrain.main"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return int(importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

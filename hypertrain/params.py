"""``hypertrain params --config FILE [--json] [key=value ...]``: trainable and frozen parameter counts.

The configured method is built on the ``meta`` device: no download, no memory, T5-XL in seconds. Counts are
broken down by the method's ``components()`` (name → parameters) when it has one, else by its direct children.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from hypertrain.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from torch import nn


def component_counts(method: nn.Module) -> dict[str, Any]:
    """``{"components": {name: {"trainable", "frozen"}}, "trainable", "frozen", "total"}`` (each parameter once)."""
    components = getattr(method, "components", None)
    groups = (
        components()
        if callable(components)
        else {n: list(m.parameters()) for n, m in method.named_children()}
    )
    seen: set[int] = set()
    table: dict[str, dict[str, int]] = {}
    for name, params in groups.items():
        row = {"trainable": 0, "frozen": 0}
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            row["trainable" if p.requires_grad else "frozen"] += p.numel()
        table[name] = row
    rest = [p for p in method.parameters() if id(p) not in seen]
    if rest:
        table["other"] = {
            "trainable": sum(p.numel() for p in rest if p.requires_grad),
            "frozen": sum(p.numel() for p in rest if not p.requires_grad),
        }
    trainable = sum(r["trainable"] for r in table.values())
    frozen = sum(r["frozen"] for r in table.values())
    return {"components": table, "trainable": trainable, "frozen": frozen, "total": trainable + frozen}


def count_method(config: Config) -> dict[str, Any]:
    """Build ``config``'s method on ``meta`` and count its parameters."""
    from hypertrain.models.build import build_method

    method = build_method(config, device="meta")
    counts = component_counts(method)
    counts["method"] = config.method
    counts["model"] = config.model.name
    generator = getattr(method, "generator", None)
    if generator is not None:
        counts["generator"] = generator
    # PHA: the paper's closed-form count beside the real one
    if callable(getattr(method, "appendix_b", None)):
        counts["appendix_b"] = method.appendix_b()
    return counts


def format_counts(counts: dict[str, Any]) -> str:
    title = f"method {counts['method']}" + (f" ({counts['generator']})" if "generator" in counts else "")
    lines = [f"{title}, model {counts['model']}", f"{'component':<28}{'trainable':>16}{'frozen':>16}"]
    for name, row in counts["components"].items():
        lines.append(f"{name:<28}{row['trainable']:>16,}{row['frozen']:>16,}")
    lines.append(f"{'total':<28}{counts['trainable']:>16,}{counts['frozen']:>16,}")
    lines.append(
        f"all parameters: {counts['total']:,} ({counts['trainable'] / max(counts['total'], 1):.1%} trainable)"
    )
    if "appendix_b" in counts:
        from hypertrain.models.pha import format_appendix_b

        lines.extend(format_appendix_b(counts["appendix_b"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(Config, args.config, args.overrides)
        counts = count_method(config)
    except ConfigError as err:
        print(f"error: {err}")
        return 2
    print(json.dumps(counts, indent=2) if args.json else format_counts(counts))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "params", help="trainable/frozen parameter counts of the configured method (meta device, no download)",
        description="Build the configured method on the meta device (no download, no memory) and print its trainable "
        "and frozen parameters by component.",
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.set_defaults(func=run)

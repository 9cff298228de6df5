"""DeepSpeed JSON configs: loading, resolving every ``"auto"`` and checking the batch arithmetic.

Plain DeepSpeed never resolves ``"auto"`` (only the HF Trainer and Accelerate do), so hypertrain resolves
each such value itself from the hypertrain config and the real data-parallel world size, before any
process touches a GPU:

* batch: ``train_batch_size == micro x accumulation x world`` (DeepSpeed asserts the same in
  ``DeepSpeedConfig._batch_assertion``); accumulation is derived, never guessed;
* ``gradient_clipping`` and ``bf16.enabled`` from the hypertrain config;
* ``bf16.check_grad_overflow`` set explicitly (see :data:`BF16_OVERFLOW_KEY`);
* ZeRO bucket sizes from the model width ``d_model``.

The optimizer and LR scheduler are created by hypertrain and passed to ``deepspeed.initialize`` as client
objects, so an ``optimizer``/``scheduler`` block in the JSON is an error and
``zero_allow_untested_optimizer`` is forced on.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BF16_OVERFLOW_KEY",
    "DSConfigError",
    "load_ds_config",
    "resolve_ds_config",
    "zero_stage",
]

AUTO = "auto"

# DeepSpeed 0.19.8, deepspeed/runtime/precision_config.py, class DeepSpeedBF16Config:
#     check_grad_overflow: bool = True
#     "Detect gradient overflow/underflow before the optimizer step and skip the step when detected."
# engine.py `_configure_zero_optimizer` hands it to the ZeRO-1/2 optimizer (stage_1_and_2.py: a step whose
# gradients or global norm are inf/NaN is skipped and counted in `engine.skipped_steps`). ZeRO-3
# (stage3.py `step`) skips a step whose global grad norm is inf/NaN regardless of this key.
BF16_OVERFLOW_KEY = "check_grad_overflow"

# DeepSpeed 0.19.8, deepspeed/runtime/constants.py: GRADIENT_CLIPPING_DEFAULT = 1.0 (older releases: 0.0).
# We always write "gradient_clipping" explicitly, so the default never applies.
GRADIENT_CLIPPING_KEY = "gradient_clipping"

# DeepSpeed logs a line every `steps_per_print` steps; hypertrain logs itself.
STEPS_PER_PRINT = 1_000_000_000

_CLIENT_OBJECTS = {
    "optimizer": "the optimizer (train.optimizer: adamw8bit | adamw, train.lr, train.weight_decay)",
    "scheduler": "the LR schedule (train.schedule, train.warmup_steps, train.total_steps)",
}


class DSConfigError(ValueError):
    """A DeepSpeed config is unreadable, inconsistent or cannot be resolved; the message says where."""


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DSConfigError(f"DeepSpeed config not found: {path}") from err
    except OSError as err:
        raise DSConfigError(f"{path}: cannot read DeepSpeed config: {err}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DSConfigError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err
    if not isinstance(data, dict):
        raise DSConfigError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data


def zero_stage(cfg: Mapping[str, Any]) -> int:
    """The ZeRO stage of a (raw or resolved) config; 0 when there is no ``zero_optimization`` block."""
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise DSConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return stage


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DSConfigError(f"{what} must be an integer >= 1 or \"auto\", got {value!r}")
    return value


def _batch_message(train: int, micro: int, accum: int, world: int) -> str:
    return (
        f"train_batch_size {train} != micro {micro} x accumulation {accum} x world {world} "
        f"(={micro * accum * world})"
    )


def _resolve_batch(
    cfg: dict[str, Any], *, global_batch_size: int, micro_batch_size: int | None, world_size: int, source: str
) -> None:
    world = _positive_int(world_size, "world_size")
    global_batch = _positive_int(global_batch_size, "train.global_batch_size")

    # micro batch: the hypertrain argument, or an explicit JSON value; both must agree
    raw_micro = cfg.get("train_micro_batch_size_per_gpu", AUTO)
    if _is_auto(raw_micro):
        if micro_batch_size is None:
            raise DSConfigError(
                f"{source}: train_micro_batch_size_per_gpu is \"auto\" and train.micro_batch_size is not set; "
                "set train.micro_batch_size"
            )
        micro = _positive_int(micro_batch_size, "train.micro_batch_size")
    else:
        micro = _positive_int(raw_micro, f"{source}: train_micro_batch_size_per_gpu")
        if micro_batch_size is not None and micro_batch_size != micro:
            raise DSConfigError(
                f"{source}: train_micro_batch_size_per_gpu {micro} != train.micro_batch_size {micro_batch_size}; "
                "set one of them to the other or use \"auto\" in the JSON"
            )

    # accumulation: derived; an explicit JSON value must match
    per_step = micro * world
    raw_accum = cfg.get("gradient_accumulation_steps", AUTO)
    if not _is_auto(raw_accum):
        accum = _positive_int(raw_accum, f"{source}: gradient_accumulation_steps")
        if micro * accum * world != global_batch:
            raise DSConfigError(f"{source}: {_batch_message(global_batch, micro, accum, world)}")
    else:
        if global_batch < per_step:
            raise DSConfigError(
                f"{source}: train_batch_size {global_batch} < micro {micro} x world {world} (={per_step}): "
                "accumulation would be < 1; lower train.micro_batch_size or raise train.global_batch_size"
            )
        if global_batch % per_step:
            raise DSConfigError(
                f"{source}: train_batch_size {global_batch} is not a multiple of micro {micro} x world {world} "
                f"(={per_step}), so gradient accumulation would not be an integer"
            )
        accum = global_batch // per_step
    if micro * accum * world != global_batch:  # defensive: the three numbers must multiply out
        raise DSConfigError(f"{source}: {_batch_message(global_batch, micro, accum, world)}")

    # train batch: an explicit JSON value must equal the hypertrain global batch
    raw_train = cfg.get("train_batch_size", AUTO)
    if not _is_auto(raw_train):
        train = _positive_int(raw_train, f"{source}: train_batch_size")
        if train != global_batch:
            raise DSConfigError(
                f"{source}: train_batch_size {train} != micro {micro} x accumulation {accum} x world {world} "
                f"(={global_batch}, train.global_batch_size); use \"auto\" in the JSON"
            )

    cfg["train_batch_size"] = global_batch
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum


def _resolve_precision(cfg: dict[str, Any], *, bf16: bool, source: str) -> None:
    if "bfloat16" in cfg:  # DeepSpeed's old spelling
        if "bf16" in cfg:
            raise DSConfigError(f"{source}: both \"bf16\" and the old \"bfloat16\" block are set; keep \"bf16\"")
        cfg["bf16"] = cfg.pop("bfloat16")
    block = cfg.get("bf16")
    block = {} if block is None else block
    if not isinstance(block, dict):
        raise DSConfigError(f"{source}: \"bf16\" must be an object, got {block!r}")
    enabled = block.get("enabled", AUTO)
    if not _is_auto(enabled):
        if not isinstance(enabled, bool):
            raise DSConfigError(f"{source}: bf16.enabled must be true, false or \"auto\", got {enabled!r}")
        if enabled != bf16:
            raise DSConfigError(
                f"{source}: bf16.enabled is {str(enabled).lower()} but the model dtype asks for "
                f"bf16={str(bf16).lower()}; use \"auto\" in the JSON"
            )
    block["enabled"] = bool(bf16)
    check = block.get(BF16_OVERFLOW_KEY, AUTO)
    if _is_auto(check):
        check = True
    if not isinstance(check, bool):
        raise DSConfigError(f"{source}: bf16.{BF16_OVERFLOW_KEY} must be true or false, got {check!r}")
    block[BF16_OVERFLOW_KEY] = check  # skip (and count) steps whose gradients hold inf/NaN
    cfg["bf16"] = block

    fp16 = cfg.get("fp16")
    if fp16 is not None:
        if not isinstance(fp16, dict):
            raise DSConfigError(f"{source}: \"fp16\" must be an object, got {fp16!r}")
        fp16_enabled = fp16.get("enabled", AUTO)
        if fp16_enabled is True:
            raise DSConfigError(
                f"{source}: fp16 is not supported (T5's feed-forward activations overflow in fp16); "
                "use bf16 (model.dtype) instead"
            )
        if not (_is_auto(fp16_enabled) or fp16_enabled is False):
            raise DSConfigError(f"{source}: fp16.enabled must be false or \"auto\", got {fp16_enabled!r}")
        fp16["enabled"] = False


def _resolve_clipping(cfg: dict[str, Any], *, gradient_clipping: float, source: str) -> None:
    if isinstance(gradient_clipping, bool) or not isinstance(gradient_clipping, int | float) or gradient_clipping < 0:
        raise DSConfigError(f"gradient clipping must be a number >= 0 (0 turns it off), got {gradient_clipping!r}")
    raw = cfg.get(GRADIENT_CLIPPING_KEY, AUTO)
    if not _is_auto(raw):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise DSConfigError(f"{source}: gradient_clipping must be a number or \"auto\", got {raw!r}")
        if float(raw) != float(gradient_clipping):
            raise DSConfigError(
                f"{source}: gradient_clipping {raw} != the hypertrain setting {gradient_clipping}; "
                "use \"auto\" in the JSON"
            )
    cfg[GRADIENT_CLIPPING_KEY] = float(gradient_clipping)


# ZeRO keys that may say "auto" and how each is derived from d_model (DeepSpeed also accepts the stage-3
# keys without their "stage3_" prefix, see deepspeed/runtime/zero/config.py aliases).
MIN_BUCKET = 2048 * 2048
"""Floor of the d_model² bucket rule (T5-XL's value): tiny test models would otherwise communicate in
4,096-element buckets, which made a CPU step of the ``tiny`` shape about 20 times slower."""

_BUCKET_RULES = {
    "reduce_bucket_size": lambda d: max(d * d, MIN_BUCKET),
    "allgather_bucket_size": lambda d: max(d * d, MIN_BUCKET),
    "stage3_prefetch_bucket_size": lambda d: int(0.9 * max(d * d, MIN_BUCKET)),
    "prefetch_bucket_size": lambda d: int(0.9 * max(d * d, MIN_BUCKET)),
    "stage3_param_persistence_threshold": lambda d: 10 * d,
    "param_persistence_threshold": lambda d: 10 * d,
}


def _resolve_zero(cfg: dict[str, Any], *, d_model: int, source: str) -> None:
    zero = cfg.get("zero_optimization")
    if zero is None:
        return
    if not isinstance(zero, dict):
        raise DSConfigError(f"{source}: \"zero_optimization\" must be an object, got {zero!r}")
    try:
        zero_stage(cfg)
    except DSConfigError as err:
        raise DSConfigError(f"{source}: {err}") from None
    for key, rule in _BUCKET_RULES.items():
        if _is_auto(zero.get(key)):
            zero[key] = rule(_positive_int(d_model, "d_model"))


def _find_auto(node: Any, path: str = "") -> str | None:
    if _is_auto(node):
        return path or "<root>"
    if isinstance(node, Mapping):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _find_auto(value, f"{path}[{i}]")
            if found:
                return found
    return None


def resolve_ds_config(
    raw: Mapping[str, Any],
    *,
    global_batch_size: int,
    micro_batch_size: int | None,
    world_size: int,
    gradient_clipping: float,
    bf16: bool,
    d_model: int,
    source: str = "<ds_config>",
) -> dict[str, Any]:
    """A copy of ``raw`` with every ``"auto"`` resolved and every explicit value checked.

    ``world_size`` is the data-parallel world size (all ranks in a plain ZeRO run). Raises
    :class:`DSConfigError` naming ``source`` and the offending numbers, e.g.
    ``train_batch_size 256 != micro 4 x accumulation 4 x world 8 (=128)``.
    """
    if not isinstance(raw, Mapping):
        raise DSConfigError(f"{source}: top level must be an object, got {type(raw).__name__}")
    cfg: dict[str, Any] = copy.deepcopy(dict(raw))

    for key, what in _CLIENT_OBJECTS.items():
        if key in cfg:
            raise DSConfigError(
                f"{source}: remove the \"{key}\" block; hypertrain creates {what} itself and passes it to "
                "deepspeed.initialize"
            )

    _resolve_batch(
        cfg, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
        world_size=world_size, source=source,
    )
    _resolve_clipping(cfg, gradient_clipping=gradient_clipping, source=source)
    _resolve_precision(cfg, bf16=bf16, source=source)
    _resolve_zero(cfg, d_model=d_model, source=source)

    if cfg.get("zero_allow_untested_optimizer", True) is not True and not _is_auto(
        cfg.get("zero_allow_untested_optimizer")
    ):
        raise DSConfigError(
            f"{source}: zero_allow_untested_optimizer must be true (the optimizer is a client object)"
        )
    cfg["zero_allow_untested_optimizer"] = True
    if _is_auto(cfg.get("steps_per_print", AUTO)):
        cfg["steps_per_print"] = STEPS_PER_PRINT
    if _is_auto(cfg.get("wall_clock_breakdown", AUTO)):
        cfg["wall_clock_breakdown"] = False

    leftover = _find_auto(cfg)
    if leftover is not None:
        raise DSConfigError(f"{source}: \"auto\" at {leftover} is not resolved by hypertrain; set a value")
    return cfg

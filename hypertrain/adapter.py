"""Generated adapters on disk: what ``hypertrain generate`` writes and ``hypertrain predict`` reads.

An adapter directory holds

- ``adapter.safetensors``: the PEFT parameters one task got from the hypernetwork (batch dimension dropped):
  ``encoder.<i>.prefix.key|value`` [heads, p, d_kv], ``encoder.<i>.lora.<q|k|v|o>.A`` [r, d_in] / ``.B`` [d_out, r],
  ``encoder.<i>.adapter.down_weight|down_bias|up_weight|up_bias`` (PHA), the same under ``decoder.<i>``, and
  ``fusion.states`` [H, d_model] + ``fusion.mask`` [H] when the run used fusion-in-decoder;
- ``hypertrain_adapter.json``: the main model (``model`` section), the method and PEFT type, the hypernetwork
  checkpoint and the sha256 of its weights, the exact hypernetwork input, and the tokenization settings that
  ``predict`` needs to ask the main model exactly as evaluation does;
- ``README.md``: a card saying the same for people;
- for a generated LoRA without fusion, also Hugging Face PEFT's files (``adapter_config.json``,
  ``adapter_model.safetensors``): ``PeftModel.from_pretrained(t5, DIR)`` loads it.

``load(DIR)`` gives a :class:`GeneratedAdapter` (the parameters as :class:`~hypertrain.models.t5_main.PeftParams`,
and the main model when asked), in one call.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from hypertrain.config import Config
    from hypertrain.models.t5_main import FrozenT5, PeftParams

FORMAT = "hypertrain-adapter"
VERSION = 1
TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "hypertrain_adapter.json"
CARD_FILE = "README.md"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_PARTS = ("down_weight", "down_bias", "up_weight", "up_bias")
_NAME = re.compile(r"(encoder|decoder)\.(\d+)\.(prefix\.(key|value)|lora\.([qkvo])\.([AB])|adapter\.(\w+))$")


class AdapterError(ValueError):
    """An adapter directory that cannot be used as asked; the message names the file and what is wrong."""


def jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a user's JSONL file; errors name the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: cannot read ({err})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise AdapterError(f"{path} line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise AdapterError(f"{path} line {number}: not a JSON object")
        records.append((number, record))
    return records


# --------------------------------------------------------------------------------------------------
# PeftParams <-> named tensors
# --------------------------------------------------------------------------------------------------


def _adapter_tensors(adapter: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(down_weight [d, b], down_bias, up_weight [b, d], up_bias) of a PHA adapter: a shared module or one task's
    generated one."""
    if hasattr(adapter, "params"):  # BatchedAdapter of one task
        p = adapter.params
        if p.down_weight.shape[0] != 1:
            raise ValueError("an adapter file holds one task: these adapters have several rows")
        return tuple(t[0] for t in p.tensors())  # type: ignore[return-value]
    return adapter.down.weight.T, adapter.down.bias, adapter.up.weight.T, adapter.up.bias


def _one(t: Tensor, what: str) -> Tensor:
    if t.shape[0] != 1:
        raise ValueError(f"an adapter file holds one task: {what} has batch {t.shape[0]}")
    return t[0]


def peft_tensors(peft: PeftParams) -> dict[str, Tensor]:
    """One task's PEFT parameters (batch 1) as named CPU tensors, contiguous, ready for safetensors."""
    import torch

    out: dict[str, Tensor] = {}
    for stack in ("encoder", "decoder"):
        for i, kv in enumerate(getattr(peft, f"{stack}_prefix") or ()):
            if kv is not None:
                out[f"{stack}.{i}.prefix.key"] = _one(kv[0], "a prefix")
                out[f"{stack}.{i}.prefix.value"] = _one(kv[1], "a prefix")
        for i, pairs in enumerate(getattr(peft, f"{stack}_lora") or ()):
            for name, (a, b) in (pairs or {}).items():
                out[f"{stack}.{i}.lora.{name}.A"] = _one(a, "a LoRA pair")
                out[f"{stack}.{i}.lora.{name}.B"] = _one(b, "a LoRA pair")
        for i, adapter in enumerate(getattr(peft, f"{stack}_adapters") or ()):
            if adapter is not None:
                for part, t in zip(ADAPTER_PARTS, _adapter_tensors(adapter), strict=True):
                    out[f"{stack}.{i}.adapter.{part}"] = t
    if peft.fusion_states is not None:
        out["fusion.states"] = _one(peft.fusion_states, "the fusion states")
        mask = peft.fusion_mask
        out["fusion.mask"] = (_one(mask, "the fusion mask") if mask is not None
                              else torch.ones(out["fusion.states"].shape[0], dtype=torch.long))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def peft_from_tensors(tensors: dict[str, Tensor], lora_scaling: float = 1.0, where: str = "adapter") -> PeftParams:
    """The inverse of :func:`peft_tensors` (batch 1 restored)."""
    from hypertrain.models.pha import AdapterParams, BatchedAdapter
    from hypertrain.models.t5_main import PeftParams

    layers: dict[str, dict[int, dict[str, Any]]] = {"encoder": {}, "decoder": {}}
    for key, value in tensors.items():
        if key.startswith("fusion."):
            continue
        match = _NAME.match(key)
        if match is None:
            raise AdapterError(f"{where}: unknown tensor {key!r}")
        stack, index = match.group(1), int(match.group(2))
        layers[stack].setdefault(index, {})[match.group(3)] = value.unsqueeze(0)

    def per_layer(stack: str, build: Any) -> list[Any] | None:
        found = layers[stack]
        if not found:
            return None
        count = max(found) + 1
        return [build(found.get(i, {})) for i in range(count)]

    def prefix(parts: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        return (parts["prefix.key"], parts["prefix.value"]) if "prefix.key" in parts else None

    def lora(parts: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]] | None:
        names = sorted({k.split(".")[1] for k in parts if k.startswith("lora.")})
        return {n: (parts[f"lora.{n}.A"], parts[f"lora.{n}.B"]) for n in names} or None

    def adapter(parts: dict[str, Tensor]) -> BatchedAdapter | None:
        if "adapter.down_weight" not in parts:
            return None
        return BatchedAdapter(AdapterParams(*(parts[f"adapter.{p}"] for p in ADAPTER_PARTS)))

    def kind(stack: str, suffix: str, build: Any) -> list[Any] | None:
        if not any(k.startswith(suffix) for parts in layers[stack].values() for k in parts):
            return None
        return per_layer(stack, build)

    fusion = tensors.get("fusion.states")
    return PeftParams(
        encoder_prefix=kind("encoder", "prefix.", prefix),
        decoder_prefix=kind("decoder", "prefix.", prefix),
        encoder_lora=kind("encoder", "lora.", lora),
        decoder_lora=kind("decoder", "lora.", lora),
        encoder_adapters=kind("encoder", "adapter.", adapter),
        decoder_adapters=kind("decoder", "adapter.", adapter),
        fusion_states=None if fusion is None else fusion.unsqueeze(0),
        fusion_mask=None if fusion is None else tensors["fusion.mask"].unsqueeze(0),
        lora_scaling=lora_scaling,
    )


# --------------------------------------------------------------------------------------------------
# Hugging Face PEFT (generated LoRA)
# --------------------------------------------------------------------------------------------------


def peft_lora_files(tensors: dict[str, Tensor], rank: int, alpha: float, targets: Sequence[str],
                    base_model: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``adapter_config.json`` and ``adapter_model.safetensors`` contents for a generated LoRA.

    The pairs sit on the self-attention projections only, so ``target_modules`` is a regular expression (PEFT
    matches a string in full) that leaves the decoder's cross-attention ``q``/``v`` alone.
    """
    weights = {}
    for key, value in tensors.items():
        match = _NAME.match(key)
        if match is None or match.group(5) is None:
            raise AdapterError(f"{key!r}: only LoRA pairs go into a PEFT adapter")
        stack, index, name, factor = match.group(1), match.group(2), match.group(5), match.group(6)
        weights[f"base_model.model.{stack}.block.{index}.layer.0.SelfAttention.{name}.lora_{factor}.weight"] = value
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": rf".*(encoder|decoder)\.block\.\d+\.layer\.0\.SelfAttention\.({'|'.join(targets)})",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return config, weights


# --------------------------------------------------------------------------------------------------
# The directory
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GeneratedAdapter:
    """One task's generated PEFT parameters and what is needed to use them."""

    directory: Path
    config: dict[str, Any]
    """``hypertrain_adapter.json``."""
    peft: PeftParams

    @property
    def run_config(self) -> Config:
        """The sections of the hypernetwork's run configuration that the main model and its inputs depend on."""
        from hypertrain.config import Config, from_dict

        return from_dict(Config, {k: self.config["run"][k] for k in ("model", "data", "eval", "train")})

    def main_model(self, device: str | torch.device = "cpu", name: str | None = None) -> FrozenT5:
        """The frozen main model the adapter was made for (``name``: another path to the same checkpoint),
        checked against the adapter's shapes."""
        from hypertrain.models.build import build_main

        cfg = self.run_config
        if name is not None:
            cfg.model.name = name
        main = build_main(cfg, device)
        check_fits(self, main, cfg.model.name)
        return main.eval()


def check_fits(adapter: GeneratedAdapter, main: FrozenT5, name: str) -> None:
    """Raise :class:`AdapterError` unless the adapter's tensors fit ``main``'s layers and widths."""
    shape = adapter.config["main_model_shape"]
    actual = main_model_shape(main)
    if actual != shape:
        diff = ", ".join(f"{k} {actual[k]} (adapter: {shape.get(k)})" for k in actual if actual[k] != shape.get(k))
        raise AdapterError(f"{adapter.directory / CONFIG_FILE}: main model {name!r} does not match the adapter: {diff}")


def main_model_shape(main: FrozenT5) -> dict[str, int]:
    return {"encoder_layers": main.num_encoder_layers, "decoder_layers": main.num_decoder_layers,
            "d_model": main.d_model, "num_heads": main.num_heads, "d_kv": main.d_kv}


def write(out: str | Path, peft: PeftParams, config: dict[str, Any], card: str) -> Path:
    """Write an adapter directory (staged beside ``out`` and swapped in whole: an earlier one survives a failure)."""
    from safetensors.torch import save_file

    from data_prep.staging import commit, discard, staging_dir

    out = Path(out)
    tensors = peft_tensors(peft)
    staging = staging_dir(out, shared=False)
    discard(staging)
    try:
        staging.mkdir(parents=True)
        save_file(tensors, str(staging / TENSORS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        lora = config.get("lora")
        if lora and "fusion.states" not in tensors:
            peft_config, weights = peft_lora_files(tensors, lora["rank"], lora["alpha"], lora["targets"],
                                                   config["run"]["model"]["name"])
            (staging / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=1) + "\n", encoding="utf-8")
            save_file(weights, str(staging / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        commit(staging, out)
    except BaseException:
        discard(staging)
        raise
    return out


def load(directory: str | Path, device: str | torch.device = "cpu") -> GeneratedAdapter:
    """Read an adapter directory written by ``hypertrain generate``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no {CONFIG_FILE} (not an adapter written by `hypertrain generate`)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from err
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise AdapterError(f"{config_path}: field 'format'/'version' is {config.get('format')!r}/"
                           f"{config.get('version')!r}, expected {FORMAT!r}/{VERSION}")
    try:
        tensors = load_file(str(directory / TENSORS_FILE), device=str(device))
    except Exception as err:  # safetensors' messages do not name the file
        raise AdapterError(f"{directory / TENSORS_FILE}: unreadable ({err})") from err
    scaling = (config["lora"]["alpha"] / config["lora"]["rank"]) if config.get("lora") else 1.0
    return GeneratedAdapter(directory, config, peft_from_tensors(tensors, scaling, str(directory / TENSORS_FILE)))

"""``hypertrain generate``: a trained hypernetwork writes the adapter for a user's own task.

The task is an S-NI-layout task file (``Definition``, ``Positive Examples``) or a definition and a JSONL file of
input/output pairs. It is formatted exactly as the run's training data was:

- S-NI (and the demo) runs read **Def+2Pos** (Tk-Instruct's layout, the first ``num_pos_examples`` examples);
- P3 runs read **K demonstrations** (``Input: x`` / ``Output: y`` blocks, the first K examples);
- PHA reads no text: the examples' inputs **retrieve** the nearest prototype (``--top-k`` mixes the k nearest),
  optionally tuned on the examples (``--tune-steps``), as the paper does for a new task.

The format comes from the run's training manifests (``--format``/``--shots`` when they are not on this machine).
``hypertrain predict`` (:mod:`hypertrain.predict`) then answers with the frozen main model and those parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypertrain.adapter import AdapterError, jsonl_records

if TYPE_CHECKING:

    from hypertrain.config import Config

HYPERNETWORK_METHODS = ("hart", "hypertuning", "pha")
FORMATS = ("def_pos", "demonstrations")


@dataclasses.dataclass
class UserTask:
    """A task given by a user: a name, a definition (or none) and input/output examples."""

    name: str
    definition: str | None
    examples: list[dict[str, str]]
    where: str
    """The file the examples came from (for messages)."""


@dataclasses.dataclass(frozen=True)
class InputFormat:
    """How the run's hypernetwork read a task: ``def_pos`` (``shots`` positive examples) or ``demonstrations``."""

    kind: str
    shots: int
    explanations: bool = False

    def describe(self) -> str:
        return f"Def+{self.shots}Pos" if self.kind == "def_pos" else f"{self.shots} demonstrations"


# --------------------------------------------------------------------------------------------------
# Reading the task
# --------------------------------------------------------------------------------------------------


def read_examples(path: Path) -> list[dict[str, str]]:
    """Input/output pairs from a JSONL file, one ``{"input": ..., "output": ...}`` object per line."""
    for number, record in (records := jsonl_records(path)):
        for key in ("input", "output"):
            if not isinstance(record.get(key), str):
                raise AdapterError(f"{path} line {number}: field '{key}' is missing or not a string")
    return [record for _, record in records]


def read_task(task_file: str | None, definition: str | None, examples_file: str | None) -> UserTask:
    """The task from ``--task FILE`` or from ``--definition`` + ``--examples``."""
    from data_prep.sni import read_task_file

    if task_file:
        path = Path(task_file)
        if not path.is_file():
            raise AdapterError(f"{path}: no such task file")
        try:
            text, examples, _ = read_task_file(path)
        except ValueError as err:
            raise AdapterError(str(err)) from None
        return UserTask(path.stem, text, examples, str(path))
    if not examples_file:
        raise AdapterError("give --task FILE, or --examples FILE.jsonl (with --definition for Def+2Pos runs)")
    path = Path(examples_file)
    if not path.is_file():
        raise AdapterError(f"{path}: no such examples file")
    return UserTask(path.stem, definition, read_examples(path), str(path))


def run_input_format(cfg: Config, kind: str | None = None, shots: int | None = None) -> InputFormat:
    """The hypernetwork input format of a run: from its training manifests, or as given."""
    from data_prep.shards import ShardError, read_manifest
    from hypertrain.demonstrations import drawn_shots

    if kind is not None:
        if kind not in FORMATS:
            raise AdapterError(f"--format: {kind!r} is not one of {', '.join(FORMATS)}")
        return InputFormat(kind, shots if shots is not None else 2)
    for directory in cfg.data.train:
        try:
            manifest = read_manifest(directory)
        except (OSError, ValueError, ShardError):  # not on this machine (or not readable): try the next one
            continue
        options = manifest.get("options", {})
        source = manifest.get("source")
        if source in ("sni", "demo"):
            found = InputFormat("def_pos", int(options.get("num_pos_examples", 2)),
                                bool(options.get("pos_explanations", False)))
        elif source == "p3":
            found = InputFormat("demonstrations", drawn_shots(manifest) or int(options.get("shots", 0)))
        else:
            raise AdapterError(f"{directory}: a {source} run's hypernetwork does not read task descriptions "
                               "(HyperTuning-PT pretraining); generate with the run fine-tuned from it")
        return dataclasses.replace(found, shots=shots) if shots is not None else found
    raise AdapterError(f"cannot read the run's training manifests ({', '.join(cfg.data.train) or 'none'}) to tell how "
                       "it formatted tasks: pass --format def_pos|demonstrations and --shots K")


def hypernetwork_text(task: UserTask, fmt: InputFormat) -> str:
    """The exact text the hypernetwork reads for ``task``, as the run's training episodes were written."""
    from data_prep.sni import format_def_pos
    from hypertrain.demonstrations import render

    if len(task.examples) < fmt.shots:
        raise AdapterError(f"{task.where}: {len(task.examples)} example(s), the hypernetwork was trained with "
                           f"{fmt.describe()}: give at least {fmt.shots}")
    chosen = task.examples[: fmt.shots]
    if fmt.kind == "def_pos":
        if not task.definition:
            raise AdapterError(f"{task.where}: field 'Definition' is missing (the run reads {fmt.describe()}; "
                               "give --definition)")
        return format_def_pos(task.definition, chosen, fmt.explanations)
    return render([(e["input"], e["output"]) for e in chosen])


# --------------------------------------------------------------------------------------------------
# Generating
# --------------------------------------------------------------------------------------------------


def _episodes(task: UserTask) -> list[Any]:
    from hypertrain.episode import Episode

    return [Episode(id=f"{task.name}-{i}", task=task.name, source="user", categories=[], hyper_input="",
                    input=e["input"], targets=[e["output"]]) for i, e in enumerate(task.examples)]


def tune_prototype(method: Any, tokens: Any, episodes: list[Any], steps: int, lr: float) -> list[float]:
    """PHA's few-shot adaptation: the new-task embedding alone trains on the examples (full batch, Adam)."""
    import torch

    ids, mask = tokens.main_inputs(episodes)
    labels = tokens.labels([e.targets[0] for e in episodes])
    optimizer = torch.optim.Adam([method.new_task_embedding], lr=lr)
    losses = []
    method.train()
    try:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = method({"input_ids": ids, "attention_mask": mask, "labels": labels}).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        method.eval()
    return losses


def pha_peft(method: Any, tokens: Any, task: UserTask, top_k: int | None, tune_steps: int, tune_lr: float
             ) -> tuple[Any, dict[str, Any]]:
    """The retrieved (and optionally tuned) prototype's adapters for ``task``, and what was retrieved."""
    import torch

    from hypertrain.evaluation.adapters import PhaEval

    episodes = _episodes(task)
    ids, mask = tokens.main_inputs(episodes)
    retrieved = method.start_new_task(ids, mask, tune=tune_steps > 0, top_k=top_k)
    info: dict[str, Any] = {"prototypes": retrieved.tasks, "top_k": top_k or method.config.top_k,
                            "mode": method.config.retrieval, "instances": len(episodes)}
    if tune_steps > 0:
        losses = tune_prototype(method, tokens, episodes, tune_steps, tune_lr)
        info["tuning"] = {"steps": tune_steps, "lr": tune_lr, "first_loss": losses[0], "last_loss": losses[-1]}
    with torch.no_grad():
        peft = PhaEval(method, tokens, chunk_size=len(episodes)).task_peft(task.name, episodes)
    return peft, info


def _hypernetwork_sha256(source: Path) -> str:
    from data_prep.shards import sha256_file
    from hypertrain.checkpoint import CHECKSUM_FILE, TRAINABLE_FILE

    recorded = source / CHECKSUM_FILE
    if recorded.is_file():
        entry = json.loads(recorded.read_text(encoding="utf-8"))["files"].get(TRAINABLE_FILE)
        if entry:
            return entry["sha256"]
    return sha256_file(source / TRAINABLE_FILE)


def generate(checkpoint: str | Path, task: UserTask, out: str | Path, *, device: str = "cpu",
             input_format: str | None = None, shots: int | None = None, top_k: int | None = None,
             tune_steps: int = 0, tune_lr: float = 1e-3) -> tuple[Path, dict[str, Any]]:
    """Write the adapter the hypernetwork of ``checkpoint`` generates for ``task``; returns (dir, its config)."""
    import torch

    from hypertrain import adapter
    from hypertrain.evaluation.adapters import Tokens
    from hypertrain.export import load_trained_method, read_run_info, resolve_checkpoint
    from hypertrain.models.registry import load_tokenizer

    source = resolve_checkpoint(checkpoint)
    cfg, _ = read_run_info(source)
    if cfg.method not in HYPERNETWORK_METHODS:
        raise AdapterError(f"{checkpoint}: a {cfg.method} run has no hypernetwork to generate from "
                           f"(generate needs {', '.join(HYPERNETWORK_METHODS)})")
    if tune_steps and cfg.method != "pha":
        raise AdapterError(f"--tune-steps: only PHA tunes a retrieved prototype; {checkpoint} is a {cfg.method} run")
    if not task.examples:
        raise AdapterError(f"{task.where}: no examples")
    started = time.perf_counter()
    method, cfg, _tasks = load_trained_method(source, device, verify="none")  # resolve_checkpoint verified it
    tokens = Tokens.for_config(cfg, load_tokenizer(cfg.model.tokenizer or cfg.model.name), device)
    loaded = time.perf_counter()
    config: dict[str, Any] = {"format": adapter.FORMAT, "version": adapter.VERSION, "task": task.name}
    if cfg.method == "pha":
        peft, config["retrieval"] = pha_peft(method, tokens, task, top_k, tune_steps, tune_lr)
        config["peft"] = "adapter"
        config["hypernetwork_input"] = {"retrieval_inputs": [e["input"] for e in task.examples]}
    else:
        fmt = run_input_format(cfg, input_format, shots)
        text = hypernetwork_text(task, fmt)
        ids, mask = tokens.hyper([text])
        with torch.no_grad():
            peft = method.generate_peft(ids, mask)
        config["peft"] = cfg.hart.peft
        config["hypernetwork_input"] = {"format": fmt.kind, "shots": fmt.shots, "text": text,
                                        "tokens": int(mask.sum()), "truncated_at": cfg.data.max_hyper_input_tokens}
        if cfg.hart.peft == "lora":
            config["lora"] = {"rank": cfg.hart.lora_rank, "alpha": cfg.hart.lora_alpha, "targets": cfg.hart.lora_targets}
    config.update(
        method=cfg.method,
        fusion=peft.fusion_states is not None,
        hypernetwork={"checkpoint": str(Path(checkpoint).resolve()), "resolved": str(source.resolve()),
                      "sha256": _hypernetwork_sha256(source)},
        main_model_shape=adapter.main_model_shape(method.main),
        run={"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
             "eval": dataclasses.asdict(cfg.eval), "train": {"seed": cfg.train.seed}},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seconds={"load": round(loaded - started, 3), "generate": round(time.perf_counter() - loaded, 3)},
    )
    config["run"]["data"]["train"] = []  # where the run's data lived says nothing about this adapter
    config["run"]["eval"]["data"] = []
    written = adapter.write(out, peft, config, card(config))
    return written, config


def card(config: dict[str, Any]) -> str:
    """The adapter directory's README."""
    model = config["run"]["model"]["name"]
    lines = [
        f"# Adapter for `{config['task']}`",
        "",
        f"Generated by a **{config['method']}** hypernetwork (`hypertrain generate`) for the frozen main model "
        f"`{model}`; PEFT type: {config['peft']}.",
        "",
        f"- hypernetwork checkpoint: `{config['hypernetwork']['resolved']}` (weights sha256 "
        f"`{config['hypernetwork']['sha256'][:16]}…`)",
    ]
    hyper = config["hypernetwork_input"]
    if "text" in hyper:
        lines += [f"- hypernetwork input ({hyper['format']}, {hyper['shots']} examples, {hyper['tokens']} tokens):",
                  "", "```text", hyper["text"], "```", ""]
    else:
        retrieval = config["retrieval"]
        lines.append(f"- retrieved prototype(s): {', '.join(retrieval['prototypes'])} (from {retrieval['instances']} "
                     f"example inputs, {retrieval['mode']}, top-k {retrieval['top_k']})")
        if "tuning" in retrieval:
            tuning = retrieval["tuning"]
            lines.append(f"- prototype tuned {tuning['steps']} steps (lr {tuning['lr']}): loss {tuning['first_loss']:.4f} "
                         f"→ {tuning['last_loss']:.4f}")
    if config["fusion"]:
        lines += ["- **fusion-in-decoder**: the main decoder also reads `fusion.states` (the hypernetwork encoder's "
                  "output for the input above), stored here; a plain T5 cannot use them, so this adapter works "
                  "through `hypertrain predict` or `hypertrain.adapter.load` only."]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "hypertrain predict --adapter DIR --input \"...\"        # or --inputs FILE.jsonl",
        "```",
        "",
        "```python",
        "from hypertrain import adapter",
        "generated = adapter.load(DIR)          # PeftParams + this config",
        "main = generated.main_model()         # the frozen T5 it was made for",
        "```",
    ]
    if config.get("lora") and not config["fusion"]:
        lines += ["", "Also a Hugging Face PEFT adapter: `PeftModel.from_pretrained(T5ForConditionalGeneration"
                  f".from_pretrained(\"{model}\"), DIR)`."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="write the adapter a trained hypernetwork generates for your task",
        description="Format your task as the run's training data (Def+2Pos or K demonstrations; PHA: retrieval) and "
        "write the PEFT parameters the hypernetwork generates for it: safetensors, a JSON config, a README card "
        "(and, for a generated LoRA without fusion, a Hugging Face PEFT adapter).",
    )
    parser.add_argument("--checkpoint", required=True, help="a run directory, checkpoint or export of hart, "
                        "hypertuning or pha")
    parser.add_argument("--task", help="an S-NI-layout task file (Definition, Positive Examples)")
    parser.add_argument("--definition", help="the task definition (with --examples)")
    parser.add_argument("--examples", help="JSONL of {\"input\": ..., \"output\": ...} pairs")
    parser.add_argument("--out", required=True, help="the adapter directory to write")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="how the run formatted tasks (default: read from its training manifests)")
    parser.add_argument("--shots", type=int, default=None, help="examples the hypernetwork reads (default: the run's)")
    parser.add_argument("--top-k", type=int, default=None, help="PHA: mix the k nearest prototypes (default: the run's)")
    parser.add_argument("--tune-steps", type=int, default=0, help="PHA: tune the retrieved prototype on the examples")
    parser.add_argument("--tune-lr", type=float, default=1e-3, help="PHA: Adam learning rate of --tune-steps")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from hypertrain.checkpoint import CheckpointError

    try:
        task = read_task(args.task, args.definition, args.examples)
        out, config = generate(args.checkpoint, task, args.out, device=args.device, input_format=args.format,
                               shots=args.shots, top_k=args.top_k, tune_steps=args.tune_steps, tune_lr=args.tune_lr)
    except (AdapterError, CheckpointError, FileNotFoundError) as err:
        print(f"generate: {err}", file=sys.stderr)
        return 2
    what = config["hypernetwork_input"]
    read = (f"{what['format']}, {what['tokens']} tokens" if "text" in what
            else f"retrieved {', '.join(config['retrieval']['prototypes'])}")
    seconds = config["seconds"]
    print(f"wrote {out} ({config['method']}, {config['peft']}; {read}; loaded in {seconds['load']:.2f} s, generated in "
          f"{seconds['generate']:.3f} s)")
    print(f"  hypertrain predict --adapter {out} --input \"...\"")
    return 0

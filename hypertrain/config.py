"""Typed configuration: dataclasses, YAML files and ``key.sub=value`` command-line overrides.

Every option lives in a dataclass with a type and a default. :func:`load_config` reads a YAML file,
applies overrides and converts the result into the dataclass tree, rejecting unknown keys and values of
the wrong type with a :class:`ConfigError` that names the offending key (``prep.max_instances_per_task:
expected int, got 'many'``). Validation happens here, before any process starts.

Later subsystems add their own sections to :class:`Config`; the machinery below is generic.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


def _at_least(section: Any, prefix: str, names: tuple[str, ...], minimum: int, note: str = "") -> None:
    """Raise a ConfigError naming ``prefix.name`` for the first of ``names`` below ``minimum``."""
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ConfigError(f"{prefix}.{name}: must be >= {minimum}{' ' + note if note else ''}, got {value}")


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SNIPrepConfig:
    """Options of ``python -m data_prep.sni`` (Super-NaturalInstructions → episode shards)."""

    src: str = ""
    """Checkout of the S-NI repository (holds ``tasks/`` and ``splits/``)."""
    out: str = ""
    """Output directory for shards and ``manifest.json``."""
    split: Literal["train", "test"] = "train"
    splits_name: str = "default"
    """Folder under ``splits/`` that holds ``{train,test,excluded}_tasks.txt``."""
    max_instances_per_task: int = 100
    """Instances kept per task (Tk-Instruct / HINT use 100; the test split keeps the first N in file order)."""
    num_pos_examples: int = 2
    """Positive examples in the hypernetwork input (Def+2Pos)."""
    pos_explanations: bool = False
    """Add each positive example's explanation (Tk-Instruct's input; HART's FT-Few-Shot and hypernetworks: without)."""
    seed: int = 42
    shard_max_samples: int = 10000
    shard_max_bytes: int = 256 * 1024**2
    workers: int = 1
    num_jobs: int = 1
    job_index: int = 0
    skip_bad: bool = False
    """Skip and count bad tasks/instances instead of stopping with an error."""
    verify: bool = True
    """Check the output's files (presence, size, sha256) before it replaces ``out``."""
    allow_missing_tasks: bool = True
    """Task names listed in the split files but absent from ``tasks/`` are dropped and counted."""

    def __post_init__(self) -> None:
        _at_least(self, "sni_prep", ("num_pos_examples", "shard_max_samples", "shard_max_bytes", "workers", "num_jobs"), 1)
        _at_least(self, "sni_prep", ("max_instances_per_task",), 0, note="(0 keeps all)")
        if not 0 <= self.job_index < self.num_jobs:
            raise ConfigError(f"sni_prep.job_index: must be in [0, num_jobs={self.num_jobs}), got {self.job_index}")


@dataclasses.dataclass
class P3PrepConfig:
    """Options of ``python -m data_prep.p3`` (P3 → few-shot episode shards; see ``docs/p3.md``)."""

    src: str = ""
    """P3 copy: the repository layout (``data/<subset>/<split>.tfrecord-*``) or its parquet export."""
    out: str = ""
    """Output directory for shards and ``manifest.json``."""
    split: Literal["train", "eval"] = "train"
    """``train``: the T0 training mixture; ``eval``: held-out multiple-choice episodes."""
    subsets: list[str] = dataclasses.field(default_factory=list)
    """Subset folder names or globs; empty → T0's training mixture (train) or held-out ``_score_eval`` subsets (eval)."""
    shots: int = 16
    """K: demonstrations in the hypernetwork input."""
    max_avg_input_tokens: int = 320
    """Drop training subsets whose average input length (``stats.train.json``) exceeds this; 0 keeps all."""
    mixing_cap: int = 500000
    """Each training subset keeps at most ``mixing_cap // templates of its dataset`` rows (T0); 0 keeps all."""
    eval_split: str = "validation"
    """P3 split evaluated with ``--split eval``."""
    demo_split: str = "train"
    """Split the fixed evaluation demonstrations come from (falls back to another split if a subset lacks it)."""
    eval_set: Literal["hart", "t0"] = "hart"
    """Held-out datasets of ``--split eval``: ``hart`` (HART's Tables 3-4: ANLI R1-R3, HellaSwag, CB, COPA, RTE,
    WiC, WSC, Winogrande; StoryCloze left out on purpose) or ``t0`` (T0's, with StoryCloze where present)."""
    token_ids: bool | None = None
    """Keep P3's T5 token ids (``input_ids``, ``target_ids``, ``choice_ids``) beside the text; ``None``: the eval
    split keeps them, the train split does not (the collator tokenizes the text; the ids would double the shards)."""
    rows_per_unit: int = 50000
    """Training subsets are prepared in blocks of at most this many kept rows, one unit of work each (workers and
    job-array pieces share a large subset; memory per worker stays bounded)."""
    seed: int = 42
    shard_max_samples: int = 10000
    shard_max_bytes: int = 256 * 1024**2
    workers: int = 1
    num_jobs: int = 1
    job_index: int = 0
    skip_bad: bool = False
    """Skip and count bad subsets/examples instead of stopping with an error."""
    verify: bool = True
    """Check the output's files (presence, size, sha256) before it replaces ``out``."""

    def __post_init__(self) -> None:
        _at_least(self, "p3_prep", ("shots", "shard_max_samples", "shard_max_bytes", "workers", "num_jobs"), 1)
        for key in ("rows_per_unit", "shard_max_samples"):
            if getattr(self, key) <= 2 * self.shots:
                raise ConfigError(f"p3_prep.{key}: must exceed 2 x shots ({2 * self.shots}) so that every pool of "
                                  f"rows can supply the demonstrations, got {getattr(self, key)}")
        _at_least(self, "p3_prep", ("max_avg_input_tokens", "mixing_cap"), 0, note="(0 turns it off)")
        if not 0 <= self.job_index < self.num_jobs:
            raise ConfigError(f"p3_prep.job_index: must be in [0, num_jobs={self.num_jobs}), got {self.job_index}")
        if self.eval_split == self.demo_split:
            raise ConfigError(f"p3_prep.demo_split: must differ from eval_split ({self.eval_split!r})")


@dataclasses.dataclass
class C4PrepConfig:
    """Options of ``python -m data_prep.c4`` (C4 → HyperTuning-PT pretraining episodes; see ``docs/training.md``)."""

    src: str = ""
    """C4 as released: the folder holding ``en/c4-<split>.NNNNN-of-NNNNN.json.gz`` (or ``en/`` itself)."""
    out: str = ""
    """Output directory for shards and ``manifest.json``."""
    split: Literal["train", "validation"] = "train"
    chunk_words: list[int] = dataclasses.field(default_factory=lambda: [96, 64, 32, 96])
    """Lengths of the four chunks, in whitespace-separated words: the hypernetwork reads chunks 1 and 4, the main
    model reads chunk 2 and predicts chunk 3. A document with fewer words than their sum is skipped and counted."""
    max_files: int = 0
    """Read only the first N files of the split (in name order); 0 reads all."""
    max_documents_per_file: int = 0
    """Episodes kept per file (the first N documents long enough); 0 keeps all."""
    shard_max_samples: int = 10000
    shard_max_bytes: int = 256 * 1024**2
    workers: int = 1
    num_jobs: int = 1
    job_index: int = 0
    skip_bad: bool = False
    """Skip and count bad records (JSON, UTF-8, no text) and the unreadable rest of a damaged gzip file."""
    verify: bool = True
    """Check the output's files (presence, size, sha256) before it replaces ``out``."""

    def __post_init__(self) -> None:
        _at_least(self, "c4_prep", ("shard_max_samples", "shard_max_bytes", "workers", "num_jobs"), 1)
        _at_least(self, "c4_prep", ("max_files", "max_documents_per_file"), 0, note="(0 keeps all)")
        if len(self.chunk_words) != 4 or min(self.chunk_words) < 1:
            raise ConfigError(f"c4_prep.chunk_words: four lengths >= 1, got {self.chunk_words}")
        if not 0 <= self.job_index < self.num_jobs:
            raise ConfigError(f"c4_prep.job_index: must be in [0, num_jobs={self.num_jobs}), got {self.job_index}")


@dataclasses.dataclass
class ModelConfig:
    """Which T5 the pipeline builds: a registry name, a hub name or a local checkpoint path."""

    name: str = "tiny"
    """``tiny``/``small``/``base``/``large``/``xl``/``xxl``, ``google/t5-xl-lm-adapt``, or a local path."""
    tokenizer: str | None = None
    """Tokenizer name or path; ``None`` uses the model's own (ByT5's byte tokenizer for ``tiny``)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"


@dataclasses.dataclass
class HartConfig:
    """HART / HyperTuning prefix generator (``method: hart | hypertuning``); ``docs/models.md`` explains each."""

    generator: Literal["autoregressive", "parallel"] | None = None
    """``autoregressive`` (HART) or ``parallel`` (HyperTuning); ``None``: follows ``method``."""
    peft: Literal["prefix", "lora"] = "prefix"
    """What the heads write: key/value ``prefix``es (the papers) or ``lora`` pairs for self-attention projections
    (HyperTuning's other PEFT type; exports as a Hugging Face PEFT adapter). ``docs/models.md``."""
    prefix_length: int = 32
    """p: prefix key/value vectors per head and layer."""
    lora_rank: int = 8
    """r of each generated LoRA pair (``peft: lora``)."""
    lora_alpha: float = 16.0
    """LoRA's scaling numerator: the update is ``(lora_alpha / lora_rank) · B A`` (``peft: lora``)."""
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    """Self-attention projections, encoder and decoder, that get a generated pair: any of q, k, v, o."""
    hyper_decoder_layers: int = 8
    """Hypernetwork decoder depth: the first layers of the checkpoint's decoder."""
    alpha: float | None = None
    """Weight of the local consistency loss; ``None``: 1.0 autoregressive, 0.0 parallel (paper: 1, 10 or 20)."""
    consistency: Literal["batch_mean", "per_example", "per_task"] = "batch_mean"
    """What is compared between consecutive steps: the batch mean of the states (default), row i with row i, or
    per-task means of the tasks in both batches. ``docs/models.md`` has the evidence: ``per_example`` erased the
    task from the prefixes in a measured setting; ``batch_mean`` helped and never goes silent."""
    fusion: bool = True
    """Fusion-in-decoder: the main decoder also attends to the hypernetwork encoder's output."""
    share_head_layernorm: bool = False
    """One LayerNorm per head group instead of one per layer (the appendix shares only the first Linear)."""
    decode: Literal["fused", "hf"] = "fused"
    """HART's L-step decode: ``fused`` (fused projections, work shared across steps done once; the same math) or
    ``hf`` (the HF decoder stack once per step with its KV cache: the reference). ZeRO-3 always uses ``hf``."""
    compile_decode: Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "none"
    )
    """``torch.compile`` mode for the fused decode (``reduce-overhead`` adds CUDA graphs on GPU); pair it with
    ``data.pad_to_max: true`` so shapes stay fixed and nothing recompiles."""

    def __post_init__(self) -> None:
        _at_least(self, "hart", ("prefix_length", "hyper_decoder_layers", "lora_rank"), 1)
        bad = sorted(set(self.lora_targets) - {"q", "k", "v", "o"})
        if bad or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            raise ConfigError(f"hart.lora_targets: distinct names among q, k, v, o, got {self.lora_targets}")
        if self.alpha is not None and self.alpha < 0:
            raise ConfigError(f"hart.alpha: must be >= 0, got {self.alpha}")


@dataclasses.dataclass
class PrefixTuningConfig:
    """Prefix-Tuning (Li & Liang), ``method: prefix_tuning``: one learned prefix per self-attention layer, shared by
    every task (HART's baseline, trained on FT-Few-Shot's input); ``docs/models.md`` explains each."""

    prefix_length: int = 32
    """p: prefix key/value vectors per head and layer (HART's hypernetworks use 32)."""
    reparam: bool = True
    """Li & Liang's reparametrisation: the prefixes are an MLP of a smaller learned matrix (per stack), which they
    found trains more stably; ``false`` learns the key/value tensors directly."""
    reparam_hidden: int = 512
    """Hidden width of the reparametrisation MLP (Li & Liang: 512 and 800)."""

    def __post_init__(self) -> None:
        _at_least(self, "prefix_tuning", ("prefix_length", "reparam_hidden"), 1)


@dataclasses.dataclass
class LoraConfig:
    """LoRA (Hu et al.) through Hugging Face ``peft``, ``method: lora``: one adapter shared by every task (HART's
    baseline, trained on FT-Few-Shot's input); saved in PEFT's format by ``hypertrain export``."""

    rank: int = 8
    """r of every low-rank pair (Hu et al.'s GPT-3 experiments: 1-8 on q and v)."""
    alpha: float = 16.0
    """Scaling numerator: the update is ``(alpha / rank) * B A``."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])
    """Names of the T5 projections that get LoRA (``q``, ``k``, ``v``, ``o`` of every self- and cross-attention;
    ``wi``, ``wi_0``, ``wi_1``, ``wo`` of the FFN). Default: query and value, as Hu et al."""

    def __post_init__(self) -> None:
        _at_least(self, "lora", ("rank",), 1)
        if not self.target_modules:
            raise ConfigError("lora.target_modules: name at least one projection (e.g. [q, v])")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class DataConfig:
    """Token budgets of the collator (paper: main input 384, target 128, hypernetwork input 1024)."""

    max_input_tokens: int = 384
    max_target_tokens: int = 128
    max_hyper_input_tokens: int = 1024
    main_input: Literal["query", "few_shot"] = "query"
    """What the main model reads, in training and evaluation: ``query`` (the instance alone: FT-Zero-Shot, and the
    hypernetwork methods, whose hypernetwork reads the demonstrations) or ``few_shot`` (S-NI: Def+2Pos and the query
    in Tk-Instruct's layout; P3: the K demonstrations and the query; FT-Few-Shot). ``docs/models.md``."""
    train: list[str] = dataclasses.field(default_factory=list)
    """Prepared training directories (each holds a ``manifest.json``), mixed per sample by ``weights``."""
    weights: list[float] = dataclasses.field(default_factory=list)
    """Mixing weights of ``train`` (empty: all 1.0)."""
    num_workers: int = 2
    """Data-loader processes per rank (each streams its own shards)."""
    shuffle_buffer: int = 1000
    """Episodes held by each worker's shuffle buffer (shards are written task by task; the buffer mixes them)."""
    pad_to_max: bool = False
    """Pad every batch to the maximum lengths (static shapes) instead of the longest sequence in the batch."""
    verify_shards: Literal["sha256", "size", "none"] = "sha256"
    """Before training, compare every shard with its manifest (the ranks share the work): size and sha256, size
    only (for very large datasets), or nothing."""

    def __post_init__(self) -> None:
        _at_least(self, "data", ("max_input_tokens", "max_target_tokens", "max_hyper_input_tokens", "shuffle_buffer"), 1)
        _at_least(self, "data", ("num_workers",), 0)
        if self.weights and len(self.weights) != len(self.train):
            raise ConfigError(f"data.weights: {len(self.weights)} weights for {len(self.train)} data.train entries")
        if any(w <= 0 for w in self.weights):
            raise ConfigError(f"data.weights: must all be > 0, got {self.weights}")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation (paper: Adam-8bit, lr 5e-5 with linear decay, batch 256, 10k steps Large / 20k XL)."""

    lr: float = 5e-5
    schedule: Literal["linear", "constant"] = "linear"
    """``linear``: warm up for ``warmup_steps``, then decay linearly to 0 at ``total_steps``."""
    warmup_steps: int = 0
    total_steps: int = 10000
    global_batch_size: int = 256
    """Examples per optimizer step over all ranks = micro batch × accumulation × world size."""
    micro_batch_size: int = 8
    """Examples per rank per forward pass."""
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"
    """bitsandbytes 8-bit AdamW or torch AdamW (with ``weight_decay: 0`` both are Adam)."""
    weight_decay: float = 0.0
    seed: int = 42
    grad_clip: float = 1.0
    """Gradient-norm clipping (DeepSpeed's ``gradient_clipping``; 0 turns it off)."""
    activation_checkpointing: Literal["none", "main", "hypernetwork", "both"] = "none"
    """Recompute activations in the backward pass: of the frozen main model, the hypernetwork encoder, or both."""
    init_from: str | None = None
    """Start the trainable parameters from an earlier run, checkpoint or export of the same method family and main
    model (HyperTuning-PT: the C4-pretrained hypernetwork); the optimizer, schedule and step start fresh, and the
    MLflow run records the source (tags ``hypertrain.init_from*``). Ignored when the run resumes."""
    max_nonfinite_in_row: int = 10
    """A NaN/inf loss skips its step (counted); this many in a row stops the run with a checkpoint."""

    def __post_init__(self) -> None:
        _at_least(self, "train", ("total_steps", "global_batch_size", "micro_batch_size", "max_nonfinite_in_row"), 1)
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(f"train.warmup_steps: must be in [0, total_steps], got {self.warmup_steps}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )


@dataclasses.dataclass
class PhaConfig:
    """PHA (prototype-based HyperAdapter). Defaults follow the paper; ``docs/pha.md`` lists the reference
    code's choices (offered here as options) and why each default was picked."""

    adapter_bottleneck: int = 64
    """b: adapter bottleneck, encoder (task-shared) and decoder (generated) alike."""
    retriever_hidden: int = 128
    """Hidden width of the retriever G = Linear(d, ·) → ReLU → Linear(·, d')."""
    retrieval_dim: int = 128
    """d': retrieval vectors, prototypes and layer embeddings (paper 128; reference code 64)."""
    mixed_dim: int = 32
    """d_h: mixed embedding from the project network (paper: 32 multi-task, 64 other experiments)."""
    project_network: Literal["linear", "mlp"] = "linear"
    """``linear``: Linear(2d', d_h) (paper, appendix B); ``mlp``: Linear → ReLU → Linear → LayerNorm (reference)."""
    project_hidden: int = 128
    """Hidden width of the ``mlp`` project network."""
    encoder_adapters: bool = True
    """Task-shared adapters in the encoder's FFN sublayers."""
    hyper_init_scale: float = 1e-3
    """Scale of the hyper-fan-in init of the hypernetwork heads (generated adapters start near zero)."""
    loss_weight: float = 0.1
    """λ in L = L_PLM + λ (L_IR + L_Pro)."""
    temperature: float = 0.1
    """Temperature of both contrastive losses (paper silent; reference 0.1)."""
    ir_denominator: Literal["negatives", "all"] = "negatives"
    """L_IR denominator: negatives only (paper Eq. 3) or every other instance (reference code, SupCon)."""
    pro_denominator: Literal["negatives", "all"] = "negatives"
    """L_Pro denominator: other prototypes only (paper Eq. 5 and reference code) or all (standard InfoNCE)."""
    loss_reduction: Literal["task", "anchor"] = "task"
    """Per-task mean then mean over tasks (paper Eq. 4/6) or one mean over anchors (reference code)."""
    retrieval: Literal["mean", "vote"] = "mean"
    """New task → prototype: cosine to the mean retrieval vector, or a per-instance majority vote."""
    top_k: int = 1
    """Mix the k nearest prototypes with softmax weights (1 = the paper's argmax)."""
    top_k_temperature: float = 0.1
    """Temperature of the softmax over the top-k cosine similarities."""
    new_task: Literal["zero_shot", "tune_prototype"] = "tune_prototype"
    """For a new task: use the retrieved embedding as is, or tune it (all else frozen) on the few shots."""
    eval_task_source: Literal["task_id", "retrieve"] = "task_id"
    """Known tasks at evaluation: the batch's ``task_ids`` (paper) or per-instance retrieval."""
    tasks: list[str] = dataclasses.field(default_factory=list)
    """Training task names; empty → the sorted union of the ``data.train`` manifests. Always used sorted."""
    num_tasks: int = 0
    """τ for parameter counts when no task list is known yet (``hypertrain params`` on ``meta`` before prep)."""

    def __post_init__(self) -> None:
        positive = ("adapter_bottleneck", "retriever_hidden", "retrieval_dim", "mixed_dim", "project_hidden")
        _at_least(self, "pha", (*positive, "top_k"), 1)
        if self.loss_weight < 0:
            raise ConfigError(f"pha.loss_weight: must be >= 0, got {self.loss_weight}")
        for name in ("temperature", "top_k_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"pha.{name}: must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass
class RunConfig:
    """Where a run lives and how it checkpoints and logs."""

    dir: str = "runs/default"
    """Run directory: checkpoints, the sqlite MLflow store (if no tracking URI is set), logs."""
    experiment: str = "hypertrain"
    """MLflow experiment name."""
    name: str | None = None
    """MLflow run name (default: the run directory's name)."""
    resume: Literal["auto", "never", "restart"] = "auto"
    """``auto``: continue from the latest checkpoint in ``dir`` (the newest that verifies if ``latest`` is lost or
    bad) and the same MLflow run; ``never``: start at step 0, and refuse if ``dir`` already holds checkpoints;
    ``restart``: move earlier checkpoints, metrics and MLflow run id to ``dir/previous/<time>/``, then start at 0."""
    checkpoint_verify: Literal["sha256", "size"] = "sha256"
    """How resume, export and eval check a checkpoint against its ``checksums.json``: every file's sha256, or only
    that every file is there with its size (fast; misses flipped bytes)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (one is also written at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Checkpoints kept in ``dir/checkpoints`` (older ones are deleted after a new one is complete)."""
    log_every: int = 10
    """Steps between metric rows sent to MLflow (and printed)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for the logged MFU (default: looked up from the GPU's name; none on CPU)."""
    tracking_flush_timeout: float = 30.0
    """Seconds the end of a run waits for unsent MLflow rows (a down server never blocks training itself)."""
    system_metrics_interval: float = 10.0
    """Seconds between system-metric samples (MLflow's CPU, memory, disk, network and GPU monitors) on rank 0; 0: none."""

    def __post_init__(self) -> None:
        _at_least(self, "run", ("checkpoint_every", "keep_last", "log_every"), 1)
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"run.peak_flops: must be > 0, got {self.peak_flops}")
        if self.tracking_flush_timeout < 0:
            raise ConfigError(f"run.tracking_flush_timeout: must be >= 0, got {self.tracking_flush_timeout}")


@dataclasses.dataclass
class EvalConfig:
    """Evaluation in training and ``hypertrain eval`` (``docs/evaluation.md``): S-NI ROUGE-L, P3 rank classification."""

    data: list[str] = dataclasses.field(default_factory=list)
    """Prepared evaluation directories (S-NI ``--split test``, P3 ``--split eval``); empty: no evaluation in training."""
    every: int = 0
    """Steps between evaluations in training; 0: only at the end of training (which is always evaluated)."""
    batch_size: int = 16
    """Examples per rank per forward pass (one task per batch)."""
    max_new_tokens: int = 128
    """S-NI generation length."""
    num_beams: int = 1
    """1: greedy decoding (the protocol); > 1: beam search."""
    max_examples_per_task: int = 0
    """Keep each task's first N examples (quick evaluations); 0 keeps all."""
    retrieval_instances: int = 0
    """PHA: a new task's prototype is retrieved from its first N instances; 0: all of them."""
    input_eos: bool = True
    """End the main model's evaluation inputs with EOS, as training does (default). ``false`` is T0's protocol
    (its evaluation tokenizes inputs without special tokens; answer choices keep their EOS): use it to compare with
    T0-style numbers. ``docs/evaluation.md`` has the difference."""

    def __post_init__(self) -> None:
        _at_least(self, "eval", ("batch_size", "max_new_tokens", "num_beams"), 1)
        _at_least(self, "eval", ("every", "max_examples_per_task", "retrieval_instances"), 0)


@dataclasses.dataclass
class Config:
    """Top-level experiment configuration (``configs/*.yaml``)."""

    method: Literal["hart", "hypertuning", "pha", "finetune", "prefix_tuning", "lora"] = "hart"
    """Which method ``build_method`` builds; ``hypertuning`` is ``hart`` with ``hart.generator: parallel``;
    ``finetune`` trains every weight of the T5 itself (FT-Zero-Shot / FT-Few-Shot, by ``data.main_input``);
    ``prefix_tuning`` and ``lora`` train one PEFT module shared by all tasks (HART's PEFT baselines)."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    hart: HartConfig = dataclasses.field(default_factory=HartConfig)
    prefix_tuning: PrefixTuningConfig = dataclasses.field(default_factory=PrefixTuningConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    sni_prep: SNIPrepConfig = dataclasses.field(default_factory=SNIPrepConfig)
    p3_prep: P3PrepConfig = dataclasses.field(default_factory=P3PrepConfig)
    pha: PhaConfig = dataclasses.field(default_factory=PhaConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (parsed YAML) to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        for arg in candidates:
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                if len(candidates) == 1:  # ``X | None``: X's own message is the precise one
                    raise err from None
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = args or (Any,)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = args or (Any, Any)
        return {_convert(k, key_tp, key): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected float, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan pass YAML and float() but poison a run much later
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def unknown_key_message(prefix: str, name: str, valid: Sequence[str]) -> str:
    """``unknown config key hart.alpah; did you mean hart.alpha? (valid keys here: ...)``."""
    where = f"{prefix}." if prefix else ""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {where}{close[0]}?" if close else ""
    return f"unknown config key {where}{name}{hint} (valid keys here: {', '.join(sorted(valid))})"


def check_override_keys(cls: type, overrides: Sequence[str]) -> None:
    """Every ``key.sub=value`` override names an existing option of ``cls``; the error names the override."""
    for text in overrides:
        path, _ = parse_override(text)
        node: Any = cls
        for depth, part in enumerate(path):
            if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
                break  # a value below a plain field (a mapping): checked with the value
            fields = {f.name: f for f in dataclasses.fields(node)}
            if part not in fields:
                message = unknown_key_message(".".join(path[:depth]), part, fields)
                raise ConfigError(f"command-line override {text!r}: {message}")
            node = typing.get_type_hints(node)[part]


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(unknown_key_message(prefix, str(unknown[0]), fields))
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass tree as plain dicts/lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for MLflow params and printing)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, full))
        else:
            flat[full] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` → (["a", "b"], 3); the value is parsed as YAML (``true``, ``1e-4``, ``[1, 2]``, ``null``)."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a nested dict (in place; also returned)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


EXTENDS = "extends"
"""A config file's key naming other config files (a path or a list, relative to it) whose values it starts from."""


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's values on top of those of the files its ``extends:`` names (merged in order, recursively,
    relative paths from the extending file); sections merge key by key, lists and scalars replace."""
    path = Path(path)
    data = read_yaml(path)
    parents = data.pop(EXTENDS, None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: {EXTENDS} must be a path or a list of paths, got {parents!r}")
    merged: dict[str, Any] = {}
    seen = (*_seen, path.resolve())
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if parent_path in seen:
            raise ConfigError(f"{path}: {EXTENDS} {parent} makes a cycle")
        if not parent_path.is_file():
            raise ConfigError(f"{path}: {EXTENDS} {parent} not found ({parent_path})")
        merged = _deep_merge(merged, read_config_file(parent_path, seen))
    return _deep_merge(merged, data)


def load_config(
    cls: type[T] = Config,  # type: ignore[assignment]
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Defaults ← YAML file ← overrides, converted and validated into ``cls``."""
    data: dict[str, Any] = copy.deepcopy(dict(defaults or {}))
    if path is not None:
        data = _deep_merge(data, read_config_file(path))
    check_override_keys(cls, overrides)  # so that a typo on the command line is not reported as the file's
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from err


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base

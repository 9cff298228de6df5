"""PHA: Prototype-based HyperAdapter (Zhao et al., 2023) on the frozen main T5.

Parts (paper §3; defaults and the reference code's alternatives in ``docs/pha.md``):

- **encoder adapters**: task-shared parallel adapters ``A(x) = Up(ReLU(Down(x)))`` in every encoder FFN sublayer,
  ``y = x + FFN(LN(x)) + A(LN(x))`` (ordinary trainable weights, Up zero-initialised);
- **retriever** G: masked mean-pool of the encoder's last hidden state → Linear(d, d'') → ReLU → Linear(d'', d');
- **prototypes** k_i ∈ R^{d'}, one per training task, indexed by the run's *sorted* task list, which is saved
  in the state dict (``PrototypeBank``);
- **adapter generator**: layer embeddings e_m ∈ R^{d'} per decoder layer, project network
  C(concat(k, e_m)) → I ∈ R^{d_h}, and hypernetwork heads H(I) → Down (d×b), Up (b×d) and both biases: one
  adapter per decoder layer *per example*, applied with batched matmuls (``BatchedAdapter``);
- **retrieve** for new tasks: nearest prototype by cosine (mean of the few-shot retrieval vectors, or a
  per-instance vote), optionally a softmax mix of the top-k.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hypertrain.config import ConfigError, PhaConfig
from hypertrain.losses import prototype_info_nce, supervised_info_nce
from hypertrain.models.base import Batch, MethodOutput
from hypertrain.models.t5_main import FrozenT5, PeftParams

# --------------------------------------------------------------------------------------------------
# Task identity
# --------------------------------------------------------------------------------------------------


def sorted_task_list(names: Iterable[str]) -> list[str]:
    """The canonical task order: unique names, sorted (never a set's iteration order)."""
    tasks = sorted(set(names))
    if not tasks:
        raise ValueError("PHA needs at least one training task")
    return tasks


def task_list_from_manifests(paths: Iterable[str | Path]) -> list[str]:
    """Sorted union of the task names in shard manifests (a ``manifest.json`` or the directory holding it)."""
    names: list[str] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        names.extend(json.loads(path.read_text(encoding="utf-8"))["tasks"])
    return sorted_task_list(names)


def resolve_tasks(config: Any, device: torch.device | str = "cpu") -> list[str]:
    """The run's sorted task list for ``config`` (a :class:`~hypertrain.config.Config`).

    ``pha.tasks`` if given (checked against the ``data.train`` manifests when they are readable, since the
    collator's ``task_ids`` index the data's sorted task list), else the manifests' union; on ``meta`` with
    neither, ``pha.num_tasks`` placeholder names (parameter counts only).
    """
    train = [Path(p) for p in config.data.train]
    readable = bool(train) and all((p / "manifest.json").is_file() for p in train)
    from_data = task_list_from_manifests(train) if readable else None
    if config.pha.tasks:
        tasks = sorted_task_list(config.pha.tasks)
        if from_data is not None and tasks != from_data:
            raise ConfigError(
                f"pha.tasks ({len(tasks)} tasks) differs from the data.train manifests ({len(from_data)} tasks); "
                "task ids index the data's sorted task list: leave pha.tasks empty or make them equal"
            )
        return tasks
    if from_data is not None:
        return from_data
    if torch.device(device).type == "meta" and config.pha.num_tasks > 0:
        return [f"task_{i:05d}" for i in range(config.pha.num_tasks)]
    raise ConfigError("pha.tasks: no task list; set data.train (prepared directories) or pha.tasks")


def build_pha_method(config: Any, main: FrozenT5, device: torch.device | str = "cpu") -> PhaMethod:
    """PHA for ``config`` over an already built frozen main model."""
    return PhaMethod(main, resolve_tasks(config, device), config.pha)


class PrototypeBank(nn.Module):
    """One learnable vector per training task, rows in sorted task-name order.

    The task list travels in the state dict (``_extra_state``); loading a checkpoint whose list is the same set in
    another order permutes the rows back into sorted order, and a different set is an error.
    """

    def __init__(self, tasks: Iterable[str], dim: int) -> None:
        super().__init__()
        self.tasks: list[str] = sorted_task_list(tasks)
        self.weight = nn.Parameter(torch.randn(len(self.tasks), dim))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise KeyError(f"unknown task {task!r}; PHA was trained on {len(self.tasks)} tasks") from None

    def ids(self, tasks: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Task names → row indices (LongTensor)."""
        return torch.tensor([self.index(t) for t in tasks], dtype=torch.long, device=device)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[task_ids]

    def get_extra_state(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = list(state["tasks"])
        if saved == self.tasks:
            return
        if sorted(saved) != self.tasks or len(set(saved)) != len(saved):
            missing, extra = sorted(set(self.tasks) - set(saved)), sorted(set(saved) - set(self.tasks))
            raise ValueError(
                f"checkpoint prototypes belong to other tasks: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        # Same tasks, saved in another order (e.g. by code that used a set's order): re-sort the rows.
        order = torch.tensor([saved.index(t) for t in self.tasks], device=self.weight.device)
        with torch.no_grad():
            self.weight.copy_(self.weight[order])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, dim={self.weight.shape[1]}"


# --------------------------------------------------------------------------------------------------
# Retriever
# --------------------------------------------------------------------------------------------------


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, d] over the positions where ``mask`` [B, T] is non-zero (padding excluded)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class Retriever(nn.Module):
    """Instance-dense retriever G: pooled encoder state [B, d] → retrieval vector [B, d']."""

    def __init__(self, d_model: int, hidden: int = 128, out: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(masked_mean_pool(hidden_states, attention_mask))


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------


class SharedAdapter(nn.Module):
    """Task-shared parallel adapter Up(ReLU(Down(x))); Up starts at zero so the model starts as the frozen T5."""

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x)))


@dataclasses.dataclass
class AdapterParams:
    """Generated weights of one adapter layer for N rows (tasks or examples)."""

    down_weight: torch.Tensor  # [N, d, b]
    down_bias: torch.Tensor  # [N, b]
    up_weight: torch.Tensor  # [N, b, d]
    up_bias: torch.Tensor  # [N, d]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.down_weight, self.down_bias, self.up_weight, self.up_bias

    def select(self, rows: torch.Tensor) -> AdapterParams:
        """The rows ``rows`` (e.g. per-example task indices) of every tensor."""
        return AdapterParams(*(t.index_select(0, rows) for t in self.tensors()))


class BatchedAdapter:
    """A per-example adapter callable for the main model's FFN hook: ``x`` [B, T, d] → delta [B, T, d].

    Example i uses its own Down/Up: ``ReLU(x_i D_i + c_i) U_i + u_i`` in two batched matmuls. One row serves the
    whole batch; a batch that is a multiple of the rows (beam search repeats each example) reuses each row for
    its copies.
    """

    def __init__(self, params: AdapterParams) -> None:
        self.params = params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        rows = p.down_weight.shape[0]
        tensors = p.tensors()
        if rows == 1:  # one task for the whole batch (e.g. a new task's embedding): plain matmuls
            down_w, down_b, up_w, up_b = (t[0].to(x.dtype) for t in tensors)
            return F.relu(x @ down_w + down_b) @ up_w + up_b
        if x.shape[0] != rows:
            if x.shape[0] % rows:
                raise ValueError(f"adapter has {rows} rows but the batch has {x.shape[0]} examples")
            tensors = tuple(t.repeat_interleave(x.shape[0] // rows, dim=0) for t in tensors)
        down_w, down_b, up_w, up_b = (t.to(x.dtype) for t in tensors)
        h = torch.baddbmm(down_b.unsqueeze(1), x, down_w).relu()
        return torch.baddbmm(up_b.unsqueeze(1), h, up_w)


# --------------------------------------------------------------------------------------------------
# Prototypical hypernetwork
# --------------------------------------------------------------------------------------------------


class ProjectNetwork(nn.Module):
    """C: concat(task embedding, layer embedding) [.., 2d'] → mixed embedding [.., d_h].

    ``linear`` is one Linear (the paper's 2d'd_h count, plus a bias); ``mlp`` is the reference code's
    Linear → ReLU → Linear → LayerNorm.
    """

    def __init__(
        self, in_dim: int, out_dim: int, kind: Literal["linear", "mlp"] = "linear", hidden: int = 128
    ):
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, out_dim),
                nn.LayerNorm(out_dim, eps=1e-6),
            )
        else:
            raise ValueError(f"unknown project network {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AdapterHyperNetwork(nn.Module):
    """H: mixed embedding [N, d_h] → one adapter's Down [N, d, b], Up [N, b, d] and biases.

    A single Linear(d_h, 2db + b + d) (the appendix-B count d_h(2db+b+d), plus its bias). Initialised
    hyper-fan-in style, scaled by ``init_scale``: weight slices uniform in ±scale·sqrt(3 / (d_h · fan_in of the
    generated matrix)), head bias zero, so generated adapters start near zero.
    """

    def __init__(self, d_model: int, bottleneck: int, mixed_dim: int, init_scale: float = 1e-3) -> None:
        super().__init__()
        self.d_model, self.bottleneck, self.mixed_dim = d_model, bottleneck, mixed_dim
        d, b = d_model, bottleneck
        self.sizes = (d * b, b, b * d, d)  # down weight, down bias, up weight, up bias
        self.heads = nn.Linear(mixed_dim, sum(self.sizes))
        self.reset_parameters(init_scale)

    def reset_parameters(self, init_scale: float) -> None:
        fan_ins = (self.d_model, 1, self.bottleneck, 1)  # generated matrix fan-in (biases: 1)
        with torch.no_grad():
            nn.init.zeros_(self.heads.bias)
            start = 0
            for size, fan_in in zip(self.sizes, fan_ins, strict=True):
                bound = init_scale * math.sqrt(3.0 / (self.mixed_dim * fan_in))
                self.heads.weight[start : start + size].uniform_(-bound, bound)
                start += size

    def forward(self, mixed: torch.Tensor) -> AdapterParams:
        n = mixed.shape[0]
        d, b = self.d_model, self.bottleneck
        down_w, down_b, up_w, up_b = self.heads(mixed).split(self.sizes, dim=-1)
        return AdapterParams(down_w.reshape(n, d, b), down_b, up_w.reshape(n, b, d), up_b)


class AdapterGenerator(nn.Module):
    """Layer embeddings + project network + hypernetwork: task embeddings [N, d'] → per-layer AdapterParams."""

    def __init__(
        self,
        d_model: int,
        num_layers: int,
        embed_dim: int = 128,
        mixed_dim: int = 32,
        bottleneck: int = 64,
        project_network: Literal["linear", "mlp"] = "linear",
        project_hidden: int = 128,
        init_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.layer_embeddings = nn.Parameter(torch.randn(num_layers, embed_dim))
        self.project = ProjectNetwork(2 * embed_dim, mixed_dim, project_network, project_hidden)
        self.hypernet = AdapterHyperNetwork(d_model, bottleneck, mixed_dim, init_scale)

    def mixed_embeddings(self, task_embeddings: torch.Tensor) -> torch.Tensor:
        """I[n, m] = C(concat(k_n, e_m)): [N, d'] → [N, L, d_h]."""
        n, dim = task_embeddings.shape
        k = task_embeddings.unsqueeze(1).expand(n, self.num_layers, dim)
        e = self.layer_embeddings.unsqueeze(0).expand(n, -1, -1)
        return self.project(torch.cat([k, e], dim=-1))

    def forward(self, task_embeddings: torch.Tensor) -> list[AdapterParams]:
        """One AdapterParams (N rows) per layer."""
        n = task_embeddings.shape[0]
        mixed = self.mixed_embeddings(task_embeddings)  # [N, L, d_h]
        flat = self.hypernet(mixed.reshape(n * self.num_layers, -1))
        per_layer = [t.reshape(n, self.num_layers, *t.shape[1:]) for t in flat.tensors()]
        return [AdapterParams(*(t[:, m] for t in per_layer)) for m in range(self.num_layers)]


# --------------------------------------------------------------------------------------------------
# Retrieval for new tasks
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Retrieval:
    """Which prototypes a set of instances retrieves, and the embedding they mix into."""

    indices: torch.Tensor  # [k] prototype rows, best first
    weights: torch.Tensor  # [k] mixing weights (sum 1; one-hot for top_k=1)
    scores: torch.Tensor  # [τ] ranking score per prototype (cosine, or vote share for "vote")
    similarities: torch.Tensor  # [τ] cosine similarity per prototype (to the mean, or mean per instance)
    embedding: torch.Tensor  # [d'] sum_i w_i k_i
    tasks: list[str] | None = None  # names of ``indices`` when the task list was given


def cosine_matrix(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(z_n, k_i): [n, d'] × [τ, d'] → [n, τ]."""
    return F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T


def nearest_prototypes(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Per-instance argmax_i cos(k_i, z_n): [n] prototype rows."""
    return cosine_matrix(z, prototypes).argmax(dim=-1)


def topk_mixture(z: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Per instance, the softmax(cos / temperature)-weighted mix of its ``top_k`` nearest prototypes: [n, d']."""
    top = cosine_matrix(z, prototypes).topk(top_k, dim=-1)
    weights = torch.softmax(top.values / temperature, dim=-1).to(prototypes.dtype)
    return (weights.unsqueeze(-1) * prototypes[top.indices]).sum(dim=1)


def retrieve(
    z: torch.Tensor,
    prototypes: torch.Tensor,
    mode: Literal["mean", "vote"] = "mean",
    top_k: int = 1,
    temperature: float = 0.1,
    tasks: Sequence[str] | None = None,
) -> Retrieval:
    """Map a new task's instances ``z`` [n, d'] to prototypes (paper Eq. 10, k_a = argmax_i cos(k_i, z)).

    ``mean``: rank prototypes by cosine to the mean retrieval vector. ``vote``: each instance votes for its
    nearest prototype; rank by vote share, ties broken by mean per-instance cosine. ``top_k`` > 1 (beyond the
    paper) mixes the k best with ``softmax(cos / temperature)`` over their similarities.
    """
    if z.dim() == 1:
        z = z.unsqueeze(0)
    num = prototypes.shape[0]
    if not 1 <= top_k <= num:
        raise ValueError(f"top_k must be in [1, {num}], got {top_k}")
    if mode == "mean":
        sims = cosine_matrix(z.mean(dim=0, keepdim=True), prototypes).squeeze(0)
        scores = sims
    elif mode == "vote":
        per_instance = cosine_matrix(z, prototypes)
        sims = per_instance.mean(dim=0)
        votes = torch.bincount(per_instance.argmax(dim=-1), minlength=num).to(sims.dtype)
        scores = votes / z.shape[0]
    else:
        raise ValueError(f"unknown retrieval mode {mode!r}; expected 'mean' or 'vote'")
    # votes first, ties by similarity: one vote (weight 3) outweighs any cosine difference (at most 2)
    key = votes * 3.0 + sims if mode == "vote" else scores
    indices = key.topk(top_k).indices
    if top_k == 1:
        weights = torch.ones(1, dtype=prototypes.dtype, device=prototypes.device)
    else:
        weights = torch.softmax(sims[indices] / temperature, dim=0).to(prototypes.dtype)
    embedding = (weights.unsqueeze(-1) * prototypes[indices]).sum(dim=0)
    names = [tasks[i] for i in indices.tolist()] if tasks is not None else None
    return Retrieval(indices, weights, scores, sims, embedding, names)


# --------------------------------------------------------------------------------------------------
# Parameter accounting
# --------------------------------------------------------------------------------------------------


def appendix_b_formula(d: int, d_prime: int, tau: int, num_layers: int, d_h: int, b: int) -> int:
    """The paper's appendix-B count: dd' + d'^2 + τd' + Ld' + 2d'd_h + d_h(2db+b+d) + L(2db+b+d)."""
    adapter = 2 * d * b + b + d
    return (
        d * d_prime
        + d_prime**2
        + tau * d_prime
        + num_layers * d_prime
        + 2 * d_prime * d_h
        + d_h * adapter
        + (num_layers * adapter)
    )


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


class PhaMethod(nn.Module):
    """PHA over a frozen :class:`~hypertrain.models.t5_main.FrozenT5`.

    ``forward(batch) -> MethodOutput`` with ``loss = lm + λ (ir + pro)`` and ``parts = {"lm", "ir", "pro"}``.
    The decoder adapters of an example come from (first that applies):

    1. the new-task embedding, while one is set (:meth:`start_new_task`; then ``loss = lm``);
    2. its task's prototype, for ``task_ids >= 0`` (training always; evaluation with
       ``eval_task_source="task_id"``);
    3. retrieval from its own retrieval vector: the nearest prototype, or the top-k mix.
    """

    def __init__(self, main: FrozenT5, tasks: Sequence[str], config: PhaConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else PhaConfig()
        self.config = cfg
        self.main = main
        d, b = main.d_model, cfg.adapter_bottleneck
        ref = main.t5.get_input_embeddings().weight
        with torch.device(ref.device):  # meta stays meta: T5-XL shapes cost no memory
            self.encoder_adapters = nn.ModuleList(
                [SharedAdapter(d, b) for _ in range(main.num_encoder_layers)] if cfg.encoder_adapters else []
            )
            self.retriever = Retriever(d, cfg.retriever_hidden, cfg.retrieval_dim)
            self.prototypes = PrototypeBank(tasks, cfg.retrieval_dim)
            self.hypernetwork = AdapterGenerator(
                d,
                main.num_decoder_layers,
                embed_dim=cfg.retrieval_dim,
                mixed_dim=cfg.mixed_dim,
                bottleneck=b,
                project_network=cfg.project_network,
                project_hidden=cfg.project_hidden,
                init_scale=cfg.hyper_init_scale,
            )
        for part in (self.encoder_adapters, self.retriever, self.prototypes, self.hypernetwork):
            part.to(dtype=ref.dtype)
        self.register_parameter("new_task_embedding", None)
        self._trainable_before_new_task: list[nn.Parameter] | None = None

    @property
    def tasks(self) -> list[str]:
        return self.prototypes.tasks

    # pieces -------------------------------------------------------------------------------------
    def encoder_peft(self) -> PeftParams | None:
        return (
            PeftParams(encoder_adapters=list(self.encoder_adapters)) if len(self.encoder_adapters) else None
        )

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Main-encoder states (task-shared adapters applied) and the retrieval vectors z [B, d']."""
        states = self.main.encode(input_ids, attention_mask, self.encoder_peft())
        return states, self.retriever(states, attention_mask)

    def task_embeddings(
        self, batch_size: int, task_ids: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding rows [N, d'] and each example's row [B] (deduplicated: one row per task in the batch).

        Examples without a known task (no ``task_ids`` or ``-1``) retrieve from their retrieval vector ``z``.
        """
        protos = self.prototypes.weight
        device = protos.device
        if self.new_task_embedding is not None:
            return self.new_task_embedding.unsqueeze(0), torch.zeros(
                batch_size, dtype=torch.long, device=device
            )
        ids = (
            task_ids
            if task_ids is not None
            else torch.full((batch_size,), -1, dtype=torch.long, device=device)
        )
        unknown = ids < 0
        if bool(unknown.any()):
            if z is None:
                raise ValueError("examples without a known task need their retrieval vectors z")
            if self.config.top_k > 1:
                mixed = topk_mixture(z[unknown], protos, self.config.top_k, self.config.top_k_temperature)
                uniq, known_rows = torch.unique(ids[~unknown], return_inverse=True)
                inverse = torch.empty(batch_size, dtype=torch.long, device=device)
                inverse[~unknown] = known_rows
                inverse[unknown] = len(uniq) + torch.arange(mixed.shape[0], device=device)
                return torch.cat([protos[uniq], mixed]), inverse
            ids = torch.where(unknown, nearest_prototypes(z, protos), ids)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return protos[uniq], inverse

    def decoder_adapters(self, embeddings: torch.Tensor, rows: torch.Tensor) -> list[BatchedAdapter]:
        """Per decoder layer, the adapter generated from ``embeddings`` [N, d'], row ``rows[i]`` for example i."""
        per_layer = self.hypernetwork(embeddings)
        if embeddings.shape[0] == 1:
            return [BatchedAdapter(p) for p in per_layer]
        return [BatchedAdapter(p.select(rows)) for p in per_layer]

    def _task_ids_for(self, batch: Batch) -> torch.Tensor | None:
        if self.training or self.config.eval_task_source == "task_id":
            return batch.get("task_ids")
        return None

    def peft_for(self, batch: Batch) -> PeftParams:
        """The main model's PEFT parameters (encoder and decoder adapters) for a batch, e.g. for evaluation."""
        batch_size = batch["input_ids"].shape[0]
        task_ids = self._task_ids_for(batch)
        z = None
        if self.new_task_embedding is None and (task_ids is None or bool((task_ids < 0).any())):
            z = self.encode(batch["input_ids"], self._mask(batch))[1]
        enc = self.encoder_peft()
        return PeftParams(
            encoder_adapters=enc.encoder_adapters if enc is not None else None,
            decoder_adapters=self.decoder_adapters(*self.task_embeddings(batch_size, task_ids, z)),
        )

    @staticmethod
    def _mask(batch: Batch) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return torch.ones_like(batch["input_ids"]) if mask is None else mask

    # training -----------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> MethodOutput:
        """Main-model cross-entropy + λ (L_IR + L_Pro) over the examples of known tasks."""
        mask = self._mask(batch)
        states, z = self.encode(batch["input_ids"], mask)
        embeddings, rows = self.task_embeddings(z.shape[0], self._task_ids_for(batch), z)
        peft = PeftParams(decoder_adapters=self.decoder_adapters(embeddings, rows))
        out = self.main(attention_mask=mask, labels=batch["labels"], peft=peft, encoder_states=states)
        lm = out.loss
        ir = pro = lm.new_zeros(())
        known = batch.get("task_ids")
        if self.new_task_embedding is None and known is not None and bool((known >= 0).any()):
            cfg = self.config
            keep = known >= 0
            zk, labels = z[keep].float(), known[keep]
            ir = supervised_info_nce(zk, labels, cfg.temperature, cfg.ir_denominator, cfg.loss_reduction)
            protos = self.prototypes.weight.float()
            pro = prototype_info_nce(
                zk, protos, labels, cfg.temperature, cfg.pro_denominator, cfg.loss_reduction
            )
            ir, pro = ir.to(lm.dtype), pro.to(lm.dtype)
        loss = lm + self.config.loss_weight * (ir + pro) if self.new_task_embedding is None else lm
        parts = {"lm": lm.detach(), "ir": ir.detach(), "pro": pro.detach()}
        return MethodOutput(loss=loss, parts=parts, logits=out.logits)

    @torch.no_grad()
    def generate(self, batch: Batch, **kwargs: Any) -> torch.Tensor:
        """HF generation with the batch's adapters (``kwargs``: ``max_new_tokens``, ``num_beams``, …)."""
        peft = self.peft_for(batch)
        return self.main.generate(batch["input_ids"], self._mask(batch), peft=peft, **kwargs)

    # new tasks ----------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mode: Literal["mean", "vote"] | None = None,
        top_k: int | None = None,
    ) -> Retrieval:
        """The prototype(s) a new task's few-shot instances retrieve (defaults from the config)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        z = self.encode(input_ids, attention_mask)[1]
        cfg = self.config
        return retrieve(
            z.float(),
            self.prototypes.weight.float(),
            mode=mode or cfg.retrieval,
            top_k=top_k or cfg.top_k,
            temperature=cfg.top_k_temperature,
            tasks=self.tasks,
        )

    def start_new_task(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        tune: bool | None = None,
        **retrieve_kwargs: Any,
    ) -> Retrieval:
        """Retrieve k_a for a new task from its few-shot instances and use it for every example from now on.

        ``tune`` (default: ``new_task == "tune_prototype"``) makes k_a the only trainable parameter (paper's
        few-shot adaptation); otherwise it is used as is (zero-shot). :meth:`end_new_task` undoes this.
        """
        if self.new_task_embedding is not None:
            self.end_new_task()
        result = self.retrieve(input_ids, attention_mask, **retrieve_kwargs)
        tune = self.config.new_task == "tune_prototype" if tune is None else tune
        self._trainable_before_new_task = [p for p in self.parameters() if p.requires_grad]
        embedding = result.embedding.to(self.prototypes.weight.dtype).clone()
        self.new_task_embedding = nn.Parameter(embedding, requires_grad=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.new_task_embedding.requires_grad_(tune)
        return result

    def end_new_task(self) -> None:
        """Back to the known tasks: drop the new-task embedding and restore which parameters train."""
        self.new_task_embedding = None
        for p in self._trainable_before_new_task or []:
            p.requires_grad_(True)
        self._trainable_before_new_task = None

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = prefix + "new_task_embedding"
        if key in state_dict and self.new_task_embedding is None:  # a checkpoint taken after start_new_task
            self.new_task_embedding = nn.Parameter(torch.empty_like(state_dict[key]), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # accounting ---------------------------------------------------------------------------------
    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for ``hypertrain params`` (each parameter in exactly one)."""
        parts = {
            "retriever": list(self.retriever.parameters()),
            "prototypes": list(self.prototypes.parameters()),
            "layer embeddings": [self.hypernetwork.layer_embeddings],
            "project network": list(self.hypernetwork.project.parameters()),
            "hypernetwork heads": list(self.hypernetwork.hypernet.parameters()),
            "encoder adapters": list(self.encoder_adapters.parameters()),
        }
        if self.new_task_embedding is not None:
            parts["new-task embedding"] = [self.new_task_embedding]
        parts["main model"] = list(self.main.parameters())
        return parts

    def appendix_b(self) -> dict[str, Any]:
        """The paper's appendix-B count for these dims, the actual trainable count, and what tells them apart."""
        cfg, main = self.config, self.main
        d, dp, dh, b = main.d_model, cfg.retrieval_dim, cfg.mixed_dim, cfg.adapter_bottleneck
        n_enc, n_dec, tau = main.num_encoder_layers, main.num_decoder_layers, self.prototypes.num_tasks
        formula = appendix_b_formula(d, dp, tau, n_dec, dh, b)
        counts = {
            name: sum(p.numel() for p in ps) for name, ps in self.components().items() if name != "main model"
        }
        actual = sum(counts.values())
        adapter = 2 * d * b + b + d
        notes: dict[str, int] = {
            "retriever biases and hidden width (formula: dd' + d'^2)": counts["retriever"]
            - (d * dp + dp * dp),
            "project network (formula: 2d'd_h, no bias)": counts["project network"] - 2 * dp * dh,
            "hypernetwork head biases (formula: d_h(2db+b+d), no bias)": counts["hypernetwork heads"]
            - dh * adapter,
            "encoder adapters (formula: L(2db+b+d))": counts["encoder adapters"] - n_enc * adapter,
            "layer embeddings (formula: Ld')": counts["layer embeddings"] - n_dec * dp,
        }
        if "new-task embedding" in counts:
            notes["new-task embedding (not in the formula)"] = counts["new-task embedding"]
        return {
            "formula": formula,
            "actual": actual,
            "difference": actual - formula,
            "explained": {k: v for k, v in notes.items() if v},
            "dims": {"d": d, "d'": dp, "d_h": dh, "b": b, "tau": tau, "L": n_dec},
        }


def format_appendix_b(acc: dict[str, Any]) -> list[str]:
    """Lines for ``hypertrain params``: the appendix-B formula, the actual count, and the difference explained."""
    dims = ", ".join(f"{k}={v}" for k, v in acc["dims"].items())
    lines = [
        f"PHA appendix-B formula ({dims}): {acc['formula']:,}",
        f"  actual trainable: {acc['actual']:,} (difference {acc['difference']:+,})",
    ]
    lines += [f"  {n:+,}  {why}" for why, n in acc["explained"].items()]
    lines.append("  (the paper's Table 1 figure of 616K does not follow from the formula; see docs/pha.md)")
    return lines

"""Contrastive losses on tensors: PHA's instance-instance (L_IR) and instance-prototype (L_Pro) InfoNCE.

Both are pure functions of a batch of vectors and their integer task labels; similarities are cosine
similarities divided by a temperature. Two choices are open where the PHA paper and its reference code
differ (see ``docs/pha.md``):

``denominator``
    ``"negatives"`` (the paper: Eq. 3 sums over S(i) and Eq. 5 over V(i), both called sets of *negatives*;
    the reference code does this for L_Pro) or ``"all"`` (standard InfoNCE / SupCon: every candidate but the
    anchor itself, positives included; the reference code does this for L_IR).
``reduction``
    ``"task"`` (the paper, Eq. 4 and 6: average the anchors of each task, then average over the tasks present)
    or ``"anchor"`` (the reference code: one mean over all anchors). They agree when tasks are balanced.

Anchors whose loss is undefined are skipped: in L_IR those without a positive (no other instance of their
task in the batch) or, with ``denominator="negatives"``, without a negative; in L_Pro every anchor when only
one prototype exists and the denominator excludes it. With nothing left the loss is a zero that keeps the
graph (so ``backward`` still works).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Denominator = Literal["negatives", "all"]
Reduction = Literal["task", "anchor"]


def _masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp over the entries where ``mask`` is True; rows with no True entry give 0.

    Empty rows are computed over the full row and then replaced, so no inf/NaN reaches the gradient.
    """
    nonempty = mask.any(dim=-1, keepdim=True)
    safe_mask = mask | ~nonempty
    lse = logits.masked_fill(~safe_mask, float("-inf")).logsumexp(dim=-1)
    return torch.where(nonempty.squeeze(-1), lse, torch.zeros_like(lse))


def _reduce(
    per_anchor: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, reduction: Reduction
) -> torch.Tensor:
    """Average ``per_anchor`` over the valid anchors, per ``reduction``; a graph-keeping zero if none is valid."""
    if not bool(valid.any()):
        return per_anchor.sum() * 0.0
    losses = per_anchor[valid]
    if reduction == "anchor":
        return losses.mean()
    if reduction != "task":
        raise ValueError(f"unknown reduction {reduction!r}; expected 'task' or 'anchor'")
    tasks, inverse = torch.unique(labels[valid], return_inverse=True)
    sums = torch.zeros(len(tasks), dtype=losses.dtype, device=losses.device).index_add(0, inverse, losses)
    counts = torch.bincount(inverse, minlength=len(tasks)).to(losses.dtype)
    return (sums / counts).mean()


def supervised_info_nce(
    z: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    denominator: Denominator = "negatives",
    reduction: Reduction = "task",
) -> torch.Tensor:
    """PHA's L_IR: supervised InfoNCE over a batch of vectors ``z`` [N, D] with task ``labels`` [N].

    For an anchor a with positives P(a) (other instances of its task) the anchor's loss is
    ``mean_{p in P(a)} -(s_ap - log sum_{m in M(a)} exp s_am)`` with ``s = cos / temperature`` and
    M(a) the negatives (``"negatives"``) or every other instance (``"all"``). Anchors without a positive
    are skipped.
    """
    if z.dim() != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"expected z [N, D] and labels [N], got {tuple(z.shape)} and {tuple(labels.shape)}")
    n = z.shape[0]
    zn = F.normalize(z, dim=-1)
    logits = zn @ zn.T / temperature
    same = labels[:, None] == labels[None, :]
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    positives = same & not_self
    negatives = ~same
    if denominator == "negatives":
        candidates = negatives
    elif denominator == "all":
        candidates = not_self
    else:
        raise ValueError(f"unknown denominator {denominator!r}; expected 'negatives' or 'all'")
    log_denominator = _masked_logsumexp(logits, candidates)  # [N]
    num_pos = positives.sum(dim=1)
    valid = (num_pos > 0) & candidates.any(dim=1)
    log_prob = logits - log_denominator[:, None]
    per_anchor = -(log_prob * positives).sum(dim=1) / num_pos.clamp(min=1)
    return _reduce(per_anchor, valid, labels, reduction)


def prototype_info_nce(
    z: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    denominator: Denominator = "negatives",
    reduction: Reduction = "task",
) -> torch.Tensor:
    """PHA's L_Pro: each vector of ``z`` [N, D] against all ``prototypes`` [K, D]; its task's one is positive.

    The anchor's loss is ``-(s_{a,y_a} - log sum_{m in M(a)} exp s_am)`` with ``s = cos / temperature`` and
    M(a) the other prototypes (``"negatives"``: paper and reference code) or all K (``"all"``: standard
    InfoNCE, a softmax cross-entropy over prototypes).
    """
    if z.dim() != 2 or prototypes.dim() != 2 or labels.shape != z.shape[:1]:
        raise ValueError(
            f"expected z [N, D], prototypes [K, D], labels [N]; got {tuple(z.shape)}, "
            f"{tuple(prototypes.shape)}, {tuple(labels.shape)}"
        )
    k = prototypes.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(
            f"labels must index the {k} prototypes, got range [{int(labels.min())}, {int(labels.max())}]"
        )
    logits = F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T / temperature  # [N, K]
    own = F.one_hot(labels, k).bool()
    if denominator == "negatives":
        candidates = ~own
    elif denominator == "all":
        candidates = torch.ones_like(own)
    else:
        raise ValueError(f"unknown denominator {denominator!r}; expected 'negatives' or 'all'")
    positive = logits.gather(1, labels[:, None]).squeeze(1)
    per_anchor = -(positive - _masked_logsumexp(logits, candidates))
    valid = candidates.any(dim=1)
    return _reduce(per_anchor, valid, labels, reduction)

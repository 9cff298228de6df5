"""PHA's contrastive losses against values computed by hand / with plain-Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from hypertrain.losses import prototype_info_nce, supervised_info_nce

E = math.e
# cos = 1 to the positive, 0 and -1 to the others, temperature 1:
NEG_ONLY = -(1.0 - math.log(1.0 + math.exp(-1.0)))  # -0.68674...
WITH_POS = -(1.0 - math.log(E + 1.0 + math.exp(-1.0)))  # 0.40760...


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _ref_ir(z, labels, t, denominator, reduction):
    """Plain-Python L_IR (Eq. 3-4 of the PHA paper, with the options of hypertrain.losses)."""
    per_task: dict[int, list[float]] = {}
    for a in range(len(z)):
        pos = [j for j in range(len(z)) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(len(z)) if labels[j] != labels[a]]
        cands = neg if denominator == "negatives" else [j for j in range(len(z)) if j != a]
        if not pos or not cands:
            continue
        log_den = math.log(sum(math.exp(_cos(z[a], z[m]) / t) for m in cands))
        loss = sum(-(_cos(z[a], z[p]) / t - log_den) for p in pos) / len(pos)
        per_task.setdefault(labels[a], []).append(loss)
    if reduction == "anchor":
        flat = [x for v in per_task.values() for x in v]
        return sum(flat) / len(flat)
    return sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)


def _ref_pro(z, protos, labels, t, denominator, reduction):
    per_task: dict[int, list[float]] = {}
    for a in range(len(z)):
        y = labels[a]
        cands = (
            [m for m in range(len(protos)) if m != y] if denominator == "negatives" else range(len(protos))
        )
        log_den = math.log(sum(math.exp(_cos(z[a], protos[m]) / t) for m in cands))
        per_task.setdefault(y, []).append(-(_cos(z[a], protos[y]) / t - log_den))
    if reduction == "anchor":
        flat = [x for v in per_task.values() for x in v]
        return sum(flat) / len(flat)
    return sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)


def test_ir_hand_values_and_skip_anchors_without_positives():
    # anchors 0 and 1 (task 0) are each other's positive; anchors 2 and 3 have no positive and are skipped.
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    neg = supervised_info_nce(z, labels, temperature=1.0, denominator="negatives")
    allc = supervised_info_nce(z, labels, temperature=1.0, denominator="all")
    assert neg.item() == pytest.approx(NEG_ONLY, abs=1e-6)
    assert allc.item() == pytest.approx(WITH_POS, abs=1e-6)
    # the hand values hold only if anchors 2 and 3 are left out of the mean, under either reduction
    assert supervised_info_nce(z, labels, 1.0, "all", "anchor").item() == pytest.approx(WITH_POS, abs=1e-6)


def test_ir_no_valid_anchor_is_zero_with_graph():
    z = torch.randn(3, 4, requires_grad=True)
    loss = supervised_info_nce(z, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all()
    # one task only: positives but no negatives -> skipped under "negatives", defined under "all"
    same = torch.tensor([5, 5, 5])
    assert supervised_info_nce(z, same, denominator="negatives").item() == 0.0
    assert supervised_info_nce(z, same, denominator="all").item() != 0.0


@pytest.mark.parametrize("denominator", ["negatives", "all"])
@pytest.mark.parametrize("reduction", ["task", "anchor"])
def test_ir_matches_python_loops(denominator, reduction):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, generator=g)
    labels = [0, 0, 0, 1, 1, 2, 3]  # unbalanced: task and anchor reductions differ; tasks 2, 3 skipped
    got = supervised_info_nce(z, torch.tensor(labels), 0.3, denominator, reduction)
    want = _ref_ir(z.tolist(), labels, 0.3, denominator, reduction)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ir_reductions_differ_on_unbalanced_batches():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 3, generator=g)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    assert supervised_info_nce(z, labels, reduction="task").item() != pytest.approx(
        supervised_info_nce(z, labels, reduction="anchor").item(), rel=1e-4
    )


def test_ir_is_cosine_based_and_uses_temperature():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    base = supervised_info_nce(z, labels, 0.1)
    scaled = supervised_info_nce(z * torch.rand(6, 1, generator=g).add(0.5), labels, 0.1)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-5)
    assert supervised_info_nce(z, labels, 1.0).item() != pytest.approx(base.item(), rel=1e-3)


def test_pro_hand_values():
    z = torch.tensor([[3.0, 0.0]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    labels = torch.tensor([0])
    assert prototype_info_nce(z, protos, labels, 1.0, "negatives").item() == pytest.approx(NEG_ONLY, abs=1e-6)
    assert prototype_info_nce(z, protos, labels, 1.0, "all").item() == pytest.approx(WITH_POS, abs=1e-6)


@pytest.mark.parametrize("denominator", ["negatives", "all"])
@pytest.mark.parametrize("reduction", ["task", "anchor"])
def test_pro_matches_python_loops(denominator, reduction):
    g = torch.Generator().manual_seed(3)
    z, protos = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    labels = [0, 0, 0, 0, 1, 2]
    got = prototype_info_nce(z, protos, torch.tensor(labels), 0.2, denominator, reduction)
    want = _ref_pro(z.tolist(), protos.tolist(), labels, 0.2, denominator, reduction)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_pro_gradients_reach_vectors_and_prototypes():
    z = torch.randn(4, 3, requires_grad=True)
    protos = torch.randn(2, 3, requires_grad=True)
    prototype_info_nce(z, protos, torch.tensor([0, 1, 0, 1])).backward()
    assert z.grad.abs().sum() > 0 and protos.grad.abs().sum() > 0
    one = torch.randn(1, 3, requires_grad=True)
    loss = prototype_info_nce(z, one, torch.zeros(4, dtype=torch.long), denominator="negatives")
    assert loss.item() == 0.0  # a single prototype has no negatives
    with pytest.raises(ValueError):
        prototype_info_nce(z, protos, torch.tensor([0, 1, 2, 0]))

"""Measured activation memory on any device: what ``hypertrain plan``'s activation model is checked against.

:class:`LiveTensorBytes` is the CPU analogue of ``torch.cuda.max_memory_allocated``; :func:`measure_step` measures
one training step with it (``tests/test_plan.py``, ``benchmarks/throughput.py``).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the context while they are alive, and their peak.

    Every op's output storage is counted once when it first appears and uncounted when it is freed (a weakref
    finaliser on the storage), so ``peak`` is the high-water mark of memory held by tensors made inside the
    context, i.e. what ``torch.cuda.max_memory_allocated`` reports on a GPU minus the pre-existing weights and
    without the caching allocator's rounding. CPU autograd runs the backward on the calling thread, so the
    backward's allocations are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place ops return an input's storage: not an allocation (weights made before the
        # context stay uncounted even when an op views them)
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _storage_key(t) not in inputs:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)


def measure_step(method: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Activation memory of one training step (forward + backward) on CPU: ``kept`` (live bytes at the end of
    the forward) and ``peak``. Gradient buffers are allocated beforehand, so only activations are measured."""
    import gc

    for p in method.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    with LiveTensorBytes() as tracker:
        out = method(batch)
        gc.collect()
        kept = tracker.current
        out.loss.backward()
        del out
    return {"kept": float(kept), "peak": float(tracker.peak)}

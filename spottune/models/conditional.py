"""Conditional execution: each image runs only the branch it chose, for forwards with no decision gradient.

Used in evaluation and inference. The images of a block are cut into a frozen-routed and a
tuned-routed sub-batch from one sort of the decisions (`RoutingPlan`), each padded to a multiple of
`bucket` images (few distinct shapes for cuDNN); a block whose images all agree runs one branch on
the whole batch. SpotTuneNet (spottune/models/spottune.py) makes the plan and calls
`conditional_block` per block.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn


class RoutingPlan:
    """Per block: how many images take the tuned copy (host ints, the one sync) and the order that groups them."""

    def __init__(self, decisions: torch.Tensor, bucket: int) -> None:
        self.chosen = decisions.detach() > 0.5  # (B, L)
        self.batch = self.chosen.shape[0]
        self.bucket = bucket
        counts = self.chosen.sum(0)
        self._ready: torch.cuda.Event | None = None
        if counts.is_cuda:  # start the copy now; work queued after it (the stem) runs while the host waits
            self._host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self._host.copy_(counts, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(counts.device))
        else:
            self._host = counts

    @cached_property
    def tuned_counts(self) -> list[int]:
        """Tuned images per block, on the host: the one synchronisation, which waits for the copy alone."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()

    @cached_property
    def order(self) -> torch.Tensor:
        """(L, B) stable sort per block: frozen-routed images first, then tuned-routed, each in batch order."""
        return torch.argsort(self.chosen.T.to(torch.uint8), dim=1, stable=True)

    @cached_property
    def inverse(self) -> torch.Tensor:
        return torch.argsort(self.order, dim=1)

    def groups(self, block: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(frozen indices, tuned indices, n_frozen, n_tuned); index tensors padded to a bucket multiple."""
        n_t = self.tuned_counts[block]
        n_f = self.batch - n_t
        order = self.order[block]
        return self._pad(order[:n_f]), self._pad(order[n_f:]), n_f, n_t

    def _pad(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.numel()
        size = -(-n // self.bucket) * self.bucket if n else 0
        return idx if size == n else torch.cat([idx, idx[:1].expand(size - n)])



def conditional_block(frozen: nn.Module, tuned: nn.Module, x: torch.Tensor, plan: RoutingPlan, l: int) -> torch.Tensor:
    """Each image through the branch it chose only; the whole batch through one branch when all agree."""
    idx_f, idx_t, n_f, n_t = plan.groups(l)
    if n_t == 0:
        return frozen(x)
    if n_f == 0:
        return tuned(x)
    # Indexing, not index_select: index_select returns NCHW for a channels_last batch, and every
    # block after the first mixed one would then run its convolutions in the slow layout.
    y_f = frozen(x[idx_f])[:n_f]
    y_t = tuned(x[idx_t])[:n_t]
    return torch.cat([y_f, y_t.to(y_f.dtype)])[plan.inverse[l]]

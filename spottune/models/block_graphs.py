"""Split training's blocks, neck and head replayed as CUDA graphs, one routing pattern at a time.

Why: with per-image routing every block runs both branches, twice the kernels of a fine-tuning
block, and in the backward pass through the deeper blocks (small feature maps, short kernels) the
GPU waits for the host to queue them (a trace in docs/performance.md). A CUDA graph queues a whole
forward or backward pass with one call.

What a step runs depends on the routing only through its pattern: per block, whether no image,
every image or some images took the tuned copy (the per-image choices themselves are data the
kernels read). So a graph captured for one pattern replays every later step with that pattern,
the same kernels on the same buffers: the function of running the blocks eagerly (inside a graph
the frozen copy's units also run fused under autograd, fold.py: equal to rounding). At
per-image routing every step has one pattern; a trained policy's routing settles on one. A pattern
is captured once it has come twice in a row (capturing costs a few eager steps, which run as the
graph will, keeping as little: _Stack.forward), and one graph is kept at a time: its activations
live in a memory pool of their own.

Capturing runs the blocks a few times eagerly first (cuDNN and Triton pick their kernels); the
BatchNorm statistics those runs move are put back, so training sees one update per step as without
graphs. Not used under torch.distributed (DDP hooks each gradient as autograd makes it; a graph
hands all of them over at its end) nor with `policy.recompute_frozen`.

A capture needs the previous step's autograd graph gone (its gradient accumulators belong to the
default stream, which a capture must not wait on), and a failed capture leaves CUDA's random number
generator unusable. The gradients a replay hands over live in the graph's own buffers, which the
next replay rewrites: they must be used within the step (no accumulation over several backward
passes). So the graphs are off unless the caller turns them on (`graph_blocks`): training does
(spottune.training), whose `train_step` zeroes the gradients, steps the optimiser and returns
detached values only. Dropout in the head draws its random numbers inside the graph, from another
place in the generator's stream than eager execution would: the same distribution, other masks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from spottune.models.fold import FrozenConvReLU


class _Stack(nn.Module):
    """The blocks for one routing pattern, then neck and head: (stem output, decisions) -> logits."""

    def __init__(self, run: Callable[..., torch.Tensor], modules: list[nn.Module], counts: list[int]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)  # the model's own modules: their parameters are the graph's
        self._run = weakref.WeakMethod(run)  # the model holds its graphs, not the other way round
        self._counts = counts

    def forward(self, x: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
        """Runs for the eager steps before a capture, while warming up and capturing (a replay does not
        call it), so Python that would cost host time every step is paid a few times only: the frozen
        copy's fused units run under autograd, their backward recorded into the graph and keeping a mask
        rather than their output (fold.py), and mixed blocks' outputs are kept as recipes (spottune.py's
        _RemadeRoutes). The eager steps keep what the graph will, so they need no more memory than it."""
        units = [m for m in self.parts.modules() if isinstance(m, FrozenConvReLU)]
        for u in units:
            u.fused_under_autograd = True
        try:
            return self._run()(x, decisions, self._counts, remake=True)
        finally:
            for u in units:
                u.fused_under_autograd = False


class BlockGraphs:
    """The graph for the routing pattern that came twice in a row; run eagerly as the graph would until then."""

    def __init__(self) -> None:
        self._last: tuple | None = None  # the pattern of the previous step
        self._key: tuple | None = None  # the captured pattern
        self._graphed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def reset(self) -> None:
        self._last = self._key = self._graphed = None

    def __call__(self, x: torch.Tensor, decisions: torch.Tensor, counts: list[int],
                 run: Callable[..., torch.Tensor], modules: list[nn.Module]) -> torch.Tensor:
        """Logits: replayed from the graph of this step's pattern, or run eagerly as it would run."""
        batch = x.shape[0]
        pattern = [0 if n == 0 else batch if n == batch else 1 for n in counts]  # as the blocks branch on it
        autocast = torch.is_autocast_enabled("cuda")
        key = (tuple(pattern), x.shape, x.stride(), x.dtype, x.requires_grad, decisions.shape, decisions.dtype,
               x.device, autocast, torch.get_autocast_dtype("cuda") if autocast else None)
        if key != self._key:
            repeated, self._last = key == self._last, key
            stack = _Stack(run, modules, pattern)
            if not repeated:
                return stack(x, decisions)
            self._graphed = None  # one graph at a time: free the old pattern's pool before capturing
            try:
                self._graphed, self._key = self._capture(x, decisions, stack), key
            except RuntimeError as e:
                raise RuntimeError(
                    "capturing SpotTune's blocks as a CUDA graph failed; is an earlier step's output still held with "
                    "its autograd graph (keep detached values, as the engine's train_step returns), or set "
                    "model.graph_blocks = False") from e
        return self._graphed(x, decisions).clone()  # the graph's output buffer is rewritten by the next replay

    @staticmethod
    def _capture(x: torch.Tensor, decisions: torch.Tensor, stack: _Stack):
        buffers = [(b, b.clone()) for b in stack.buffers()]
        sample = (x.detach().clone().requires_grad_(x.requires_grad),
                  decisions.detach().clone().requires_grad_(decisions.requires_grad))
        try:
            # allow_unused_input: a tuned copy that no image takes gets no gradient (the engine fills zeros)
            graphed = torch.cuda.make_graphed_callables(stack, sample, allow_unused_input=True)
            replay = graphed.forward  # set on the module, referring to it: kept alone, no reference cycle
            del graphed.forward
            # The eager steps' and warm-up's memory, cached by the allocator, goes back to the driver:
            # from now on the graph's own pool holds this pattern's activations.
            torch.cuda.empty_cache()
            return replay
        finally:
            with torch.no_grad():  # the warm-up runs moved BatchNorm statistics: put them back
                for b, saved in buffers:
                    b.copy_(saved)

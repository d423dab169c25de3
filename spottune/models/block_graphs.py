"""A training step's trainable part replayed as CUDA graphs, one execution pattern at a time.

Why: a step queues hundreds of kernels, and where they are short (SpotTune's deeper blocks, which
run both branches: a trace in docs/performance.md) or where the host has other work (DDP's gradient
hooks, the loader's threads) the GPU waits for the host to queue them. A CUDA graph queues a whole
forward or backward pass with one call. SpotTune replays its blocks, neck and head; the baselines
their whole network (spottune/models/baselines.py).

What a step runs depends on its inputs' shapes and, for SpotTune, on the routing only through its
pattern: per block, whether no image, every image or some images took the tuned copy (the
per-image choices themselves are data the kernels read). So a graph captured for one pattern
replays every later step with that pattern, the same kernels on the same buffers: the function of
running eagerly (inside SpotTune's graph the frozen copy's units also run fused under autograd,
fold.py: equal to rounding). At per-image routing every step has one pattern; a trained policy's
routing settles on one. A pattern is captured once it has come twice in a row (capturing costs a
few eager steps, which run as the graph will, keeping as little), and one graph is
kept at a time: its activations live in a memory pool of their own.

Capturing runs the step a few times eagerly first (cuDNN and Triton pick their kernels); the
BatchNorm statistics those runs move are put back, so training sees one update per step as without
graphs. Under DistributedDataParallel the replayed backward hands every gradient to autograd at its
end, and DDP's hooks then all-reduce them in a few buckets (on NVLink that takes under a
millisecond; overlapping it with the backward would save little and costs host time every step).
Not used with `policy.recompute_frozen`.

A capture needs the previous step's autograd graph gone (its gradient accumulators belong to the
default stream, which a capture must not wait on). A failed capture is tried again, twice (under DDP
one failed at random); CUDA's random number generator is put back as it was before each attempt (a
failed capture leaves it refusing every eager draw: "Offset increment outside graph capture").
After the third failed attempt the graphs are an optional speed-up that did not work: one warning,
and the rest of training runs eagerly, as with the graphs off (`failure` says why). The gradients a replay
hands over live in the graph's own buffers, which the next replay rewrites: they must be used within
the step (no accumulation over several backward passes). So the graphs are off unless the caller
turns them on (`graph_blocks`): training does (spottune.training; SPOTTUNE_CUDA_GRAPHS=false leaves
them off), whose `train_step` zeroes the gradients, steps the optimiser and returns detached values
only. Dropout in the head draws its random numbers inside the graph, from another place in the
generator's stream than eager execution would: the same distribution, other masks.
"""

from __future__ import annotations

import gc
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Other threads make CUDA calls while a step is captured: the loader's pin-memory thread, NCCL's
# watchdog. In CUDA's default ("global") capture mode such a call invalidates the capture and fails
# in that thread too (measured with torch 2.11: "operation not permitted when stream is capturing" in
# the pin-memory thread, which ends the run); in "thread_local" mode only the capturing thread's own
# are refused. torch >= 2.14 lets make_graphed_callables choose; older versions get the mode through
# the torch.cuda.graph they capture with (_thread_local_capture).
_CHOOSES_MODE = "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters
_CAPTURE_ATTEMPTS = 3  # a capture that fails this often: no more graphs for this model


class _Stack(nn.Module):
    """The step's trainable part for one pattern: inputs -> logits, computed by `run(*inputs, *args)`."""

    def __init__(self, run: Callable[..., torch.Tensor], modules: list[nn.Module], args: tuple = ()) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)  # the model's own modules: their parameters are the graph's
        self._run = weakref.WeakMethod(run)  # the model holds its graphs, not the other way round
        self._args = args

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Runs for the eager steps before a capture, while warming up and capturing (a replay does not
        call it), so Python in `run` costs host time a few times only (SpotTune's `_lean_blocks` spends
        it on keeping less memory)."""
        return self._run()(*inputs, *self._args)


class BlockGraphs:
    """The graph for the routing pattern that came twice in a row; run eagerly as the graph would until then."""

    def __init__(self) -> None:
        self._last: tuple | None = None  # the pattern of the previous step
        self._key: tuple | None = None  # the captured pattern
        self._graphed: Callable[..., torch.Tensor] | None = None
        self.failure: str | None = None  # why capturing was given up: every later step runs eagerly

    def reset(self) -> None:
        self._last = self._key = self._graphed = None

    def __deepcopy__(self, memo: dict) -> BlockGraphs:
        return BlockGraphs()  # a copied model captures its own: a graph replays its own model's buffers

    def __call__(self, inputs: tuple[torch.Tensor, ...], run: Callable[..., torch.Tensor], modules: list[nn.Module],
                 pattern: tuple[int, ...] | None = None) -> torch.Tensor:
        """Logits: replayed from the graph of this step's pattern, or run eagerly as it would run.

        run(*inputs) computes them (run(*inputs, pattern) when a pattern is given: SpotTune's blocks
        branch on it) from the parameters of `modules`, which are all the graph may train.
        """
        if self.failure is not None:
            return run(*inputs) if pattern is None else run(*inputs, list(pattern))
        autocast = torch.is_autocast_enabled("cuda")
        key = (pattern, tuple((t.shape, t.stride(), t.dtype, t.requires_grad, t.device) for t in inputs),
               autocast, torch.get_autocast_dtype("cuda") if autocast else None)
        if key != self._key:
            repeated, self._last = key == self._last, key
            stack = _Stack(run, modules, () if pattern is None else (list(pattern),))
            if not repeated:
                return stack(*inputs)
            self._graphed = None  # one graph at a time: free the old pattern's pool before capturing
            try:
                self._graphed, self._key = self._capture(inputs, stack), key
            except RuntimeError as e:
                self.failure = f"capture failed {_CAPTURE_ATTEMPTS} times: {str(e).splitlines()[0]}"
                warnings.warn(f"capturing a training step as a CUDA graph failed {_CAPTURE_ATTEMPTS} times; training "
                              f"goes on without CUDA graphs (slower, same results): {str(e).splitlines()[0]}. Is an "
                              "earlier step's output still held with its autograd graph? SPOTTUNE_CUDA_GRAPHS=false "
                              "skips the attempts", RuntimeWarning, stacklevel=2)
                return stack(*inputs)
        return self._graphed(*inputs).clone()  # the graph's output buffer is rewritten by the next replay

    @staticmethod
    def _capture(inputs: tuple[torch.Tensor, ...], stack: _Stack) -> Callable[..., torch.Tensor]:
        """The graphed stack, called with the step's inputs.

        It is captured over aliases of the trainable parameters (same storage, new autograd leaves), and
        replayed with the parameters themselves as inputs. Why: DistributedDataParallel holds each
        parameter's gradient accumulator from its construction, tied to the stream it was built on, and a
        capture that reached those accumulators would make that stream wait on the capturing one, which
        CUDA refuses. Over aliases the capture never meets them; a replay hands its gradients to them.
        """
        buffers = [(b, b.clone()) for b in stack.buffers()]
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        names = [n for n, q in stack.named_parameters() if q.requires_grad]
        params = tuple(stack.get_parameter(n) for n in names)
        aliases = tuple(q.detach().requires_grad_() for q in params)
        n = len(inputs)

        def step(*args: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(stack, dict(zip(names, args[n:])), args[:n])

        rng = torch.cuda.default_generators[inputs[0].device.index or 0]
        before = rng.clone_state()
        for attempt in range(1, _CAPTURE_ATTEMPTS + 1):
            try:
                graphed = _capture_once(step, (*sample, *aliases), buffers)
                break
            except RuntimeError as e:
                # A failed capture leaves the generator's state marked as capturing; a copy of the state
                # before the attempt replaces it (warm-up draws undone too, as the BatchNorm statistics).
                rng.graphsafe_set_state(before.clone_state())
                if attempt == _CAPTURE_ATTEMPTS:
                    raise
                warnings.warn(f"capturing a training step as a CUDA graph failed (attempt {attempt} of "
                              f"{_CAPTURE_ATTEMPTS}), capturing again: {str(e).splitlines()[0]}", RuntimeWarning,
                              stacklevel=2)
        # The eager steps' and warm-up's memory, cached by the allocator, goes back to the driver:
        # from now on the graph's own pool holds this pattern's activations.
        torch.cuda.empty_cache()
        return lambda *xs: graphed(*xs, *params)


def _capture_once(step: Callable[..., torch.Tensor], sample: tuple[torch.Tensor, ...],
                  buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., torch.Tensor]:
    """One attempt at the graphed step; whatever its outcome, the stream, the collector and the BatchNorm
    statistics are as before it, so a failed attempt can be followed by another.

    Why attempts: under DDP the first capture failed at random on one rank ("operation failed due to a
    previous error during capture", docs/performance.md; cause not found). CUDA ends an invalidated
    capture and torch raises; the graph's pool of that attempt stays with the allocator, a retry's
    capture starts afresh (its random number generator state included). No collective runs inside a
    capture, so one rank's retry keeps the ranks in step.
    """
    collecting = gc.isenabled()
    gc.disable()  # no collection mid-capture: an object it frees may release CUDA resources
    # make_graphed_callables warms up and captures on a side stream of its own, by design: torch's
    # "AccumulateGrad node's stream does not match" warning fired there (on an H200, at the capture
    # step and never in a replay), so it is off for the attempt alone.
    _warn_on_stream_mismatch(False)
    try:
        # A capture that fails leaves its capture stream current (torch.cuda.graph's exit stops at the error)
        with torch.cuda.stream(torch.cuda.current_stream()):
            # allow_unused_input: an input the step does not train gets no gradient, as eagerly (a frozen prefix's)
            if _CHOOSES_MODE:
                return torch.cuda.make_graphed_callables(step, sample, allow_unused_input=True,
                                                         capture_error_mode="thread_local")
            with _thread_local_capture():
                return torch.cuda.make_graphed_callables(step, sample, allow_unused_input=True)
    finally:
        _warn_on_stream_mismatch(True)
        if collecting:
            gc.enable()
        with torch.no_grad():  # the warm-up runs moved BatchNorm statistics: put them back
            for b, saved in buffers:
                b.copy_(saved)


def _warn_on_stream_mismatch(on: bool) -> None:
    """torch's switch for that warning, where torch has it (on by default)."""
    switch = getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", None)
    if switch is not None:
        switch(on)


@contextmanager
def _thread_local_capture() -> Iterator[None]:
    """torch.cuda.graph capturing in "thread_local" mode, for a make_graphed_callables that cannot ask for it."""
    original = torch.cuda.graph

    class graph(original):
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode: str = "thread_local") -> None:
            super().__init__(cuda_graph, pool=pool, stream=stream, capture_error_mode=capture_error_mode)

    torch.cuda.graph = graph
    try:
        yield
    finally:
        torch.cuda.graph = original

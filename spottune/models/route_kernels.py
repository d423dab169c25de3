"""A block's per-image routing, forward and backward, each in one pass over the block output (Triton on CUDA).

With per-image routing every block mixes two branch outputs F (frozen) and F~ (tuned) by decisions
d in {0, 1}:

    forward    y = F where d = 0, F~ where d = 1            (read the chosen one, write y)
    backward   g_F = g (1 - d),  g_F~ = g d,  g_d = <g, F~ - F> per image

In eager torch that is a lerp, a saved difference F~ - F, two masked products and a product then a
reduction: about 14 passes over each block output per training step, and a block output sized tensor
kept per block for the backward. These kernels take 7 passes and keep nothing: F and F~ are the
outputs of the blocks' last activation, which autograd keeps anyway (split_training.py's `_Route`
decides what to save). Elsewhere (CPU, layouts the kernels do not take, no Triton) the same
arithmetic runs in torch.

The decision gradient is accumulated in float32 (float64 for float64 tensors) from F~ - F computed at
that precision, in a fixed order: the same bits every run.
"""

from __future__ import annotations

import functools

import torch

_BLOCK = 4096  # elements per program: a multiple of the widest vector load for every dtype


@functools.cache
def _kernels():
    """The compiled kernels, or None without Triton (CPU-only installs)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def select(f_ptr, t_ptr, w_ptr, out_ptr, n, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        base = b.to(tl.int64) * n
        tuned = (tl.load(w_ptr + b) != 0).to(tl.int32)
        # Each image reads its chosen branch only: the other's lanes are all masked off (offs < 0).
        x_t = tl.load(t_ptr + base + offs, mask=offs < n * tuned, other=0.0)
        x_f = tl.load(f_ptr + base + offs, mask=offs < n * (1 - tuned), other=0.0)
        tl.store(out_ptr + base + offs, tl.where(tuned != 0, x_t, x_f), mask=inside)

    @triton.jit
    def backward(g_ptr, t_ptr, f_ptr, w_ptr, gf_ptr, gt_ptr, part_ptr, n, parts,
                 HAS_F: tl.constexpr, NEED_F: tl.constexpr, NEED_T: tl.constexpr, NEED_D: tl.constexpr,
                 FP64: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)
        offs = j * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        base = b.to(tl.int64) * n
        g = tl.load(g_ptr + base + offs, mask=inside, other=0.0)
        tuned = tl.load(w_ptr + b) != 0
        zero = tl.zeros_like(g)
        if NEED_T:
            tl.store(gt_ptr + base + offs, tl.where(tuned, g, zero), mask=inside)
        if NEED_F:
            tl.store(gf_ptr + base + offs, tl.where(tuned, zero, g), mask=inside)
        if NEED_D:
            acc = tl.float64 if FP64 else tl.float32
            diff = tl.load(t_ptr + base + offs, mask=inside, other=0.0).to(acc)
            if HAS_F:  # else t_ptr holds F~ - F already
                diff = diff - tl.load(f_ptr + base + offs, mask=inside, other=0.0).to(acc)
            tl.store(part_ptr + b * parts + j, tl.sum(g.to(acc) * diff, axis=0))

    return select, backward


def _fusable(*tensors: torch.Tensor) -> bool:
    """CUDA tensors of one dtype, shape and dense layout in which each image is one contiguous slab."""
    first = tensors[0]
    if not first.is_cuda or first.dim() < 2 or first.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                                      torch.float64):
        return False
    dense = first.is_contiguous() or (first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last))
    return dense and all(t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype
                         and t.device == first.device for t in tensors[1:]) and _kernels() is not None


def per_image(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) per-image values shaped to broadcast over a (B, ...) block output."""
    return w.view(-1, *([1] * (like.dim() - 1)))


def route_forward(f: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per image, F~ where w is 1 and F where it is 0 (w: (B,) of exact 0/1 in the tensors' dtype)."""
    if not _fusable(f, t):
        return torch.where(per_image(w != 0, t), t, f)
    select, _ = _kernels()
    out = torch.empty_like(t)
    n = t[0].numel()
    select[(t.shape[0], -(-n // _BLOCK))](f, t, w.contiguous(), out, n, BLOCK=_BLOCK)
    return out


def route_backward(g: torch.Tensor, t: torch.Tensor | None, f: torch.Tensor | None, w: torch.Tensor,
                   need_f: bool, need_t: bool, need_d: bool):
    """(g where w is 0, g where w is 1, <g, t - f> per image); f None means t already holds the difference
    (t None: no decision gradient is asked for).

    The decision gradient comes back in the accumulation dtype (float32, or float64 for float64).
    """
    acc = torch.promote_types(g.dtype, torch.float32)
    if t is None:  # fixed decisions (no gradient): nothing was kept, and only g and w are read
        t = g
    if not _fusable(g, t, *([f] if f is not None else [])):
        tuned = per_image(w != 0, g)
        grad_f = torch.where(tuned, 0, g) if need_f else None
        grad_t = torch.where(tuned, g, 0) if need_t else None
        grad_d = None
        if need_d:
            diff = t - f if f is not None else t
            grad_d = (g * diff).sum(dim=tuple(range(1, g.dim())), dtype=acc)
        return grad_f, grad_t, grad_d
    _, backward = _kernels()
    b, n = g.shape[0], g[0].numel()
    parts = -(-n // _BLOCK)
    grad_f = torch.empty_like(g) if need_f else None
    grad_t = torch.empty_like(g) if need_t else None
    part = torch.empty((b, parts), dtype=acc, device=g.device) if need_d else None
    backward[(b, parts)](g, t, f if f is not None else t, w.contiguous(), grad_f if need_f else g,
                         grad_t if need_t else g, part if need_d else g, n, parts,
                         HAS_F=f is not None, NEED_F=need_f, NEED_T=need_t, NEED_D=need_d,
                         FP64=acc == torch.float64, BLOCK=_BLOCK, num_warps=8)
    return grad_f, grad_t, part.sum(1) if need_d else None

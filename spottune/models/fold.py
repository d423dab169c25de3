"""Fold inference-mode BatchNorm into the convolution before it: the frozen branch's cheaper twin.

A frozen block's BatchNorm is an affine map with constant statistics, so conv -> BN equals one
convolution with rescaled weights and a bias. The folded block computes the same function with
one elementwise pass less per convolution in the forward and none in the backward: BatchNorm's
inference-mode backward is a broadcast elementwise kernel per layer, which made the frozen
branch's input gradients cost as much as its convolutions (docs/performance.md).

Then each conv -> ReLU and conv -> add -> ReLU of the folded block becomes one `FrozenConvReLU`:
where autograd records nothing (inference; the frozen branch no image chose in training), and
under autograd where SpotTune's blocks run as CUDA graphs (block_graphs.py), on CUDA one cuDNN kernel
(convolution, bias, residual and ReLU fused), where eager torch runs a
convolution, a broadcast bias add (slow in channels_last), the residual add and the ReLU: 2.5x
less GPU time for those layers in bf16 (measured per layer, docs/performance.md). The weights are
frozen, so their cast to the compute dtype is made once.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import nn


class _LeafConvNorm(torch.fx.Tracer):
    """Traces a block with every convolution and BatchNorm kept as a module call, subclasses included
    (EfficientNet-Lite's 'same'-padding convolutions subclass nn.Conv2d)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(m, qualname)


def fold_batchnorm(block: nn.Module) -> nn.Module:
    """A frozen copy of `block` (eval mode) with each BatchNorm2d that only follows a Conv2d folded into it.

    Blocks that torch.fx cannot trace are returned as an unfolded copy: same function, no saving.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    block = copy.deepcopy(block).eval()
    try:
        graph = _LeafConvNorm().trace(block)
    except Exception:  # noqa: BLE001 - data-dependent control flow: keep the block as it is
        return block.requires_grad_(False)
    folded = torch.fx.GraphModule(block, graph)
    modules = dict(folded.named_modules())
    for node in list(folded.graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(src.users) != 1:
            continue
        parent, _, name = src.target.rpartition(".")
        setattr(folded.get_submodule(parent), name, fuse_conv_bn_eval(conv, norm))
        node.replace_all_uses_with(src)
        folded.graph.erase_node(node)
    _fuse_relu(folded)
    folded.graph.lint()
    folded.recompile()
    return folded.requires_grad_(False)


def _fuse_relu(folded: torch.fx.GraphModule) -> None:
    """Rewrite conv -> ReLU and conv -> add(z) -> ReLU chains (each link its only user) as FrozenConvReLU calls."""
    modules = dict(folded.named_modules())

    def relu(n: torch.fx.Node) -> bool:
        if n.op == "call_module":
            return type(modules.get(n.target)) is nn.ReLU
        return n.op == "call_function" and n.target in (F.relu, torch.relu, torch.relu_) and len(n.args) == 1

    def add(n: torch.fx.Node) -> bool:
        return n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add) and not n.kwargs

    for node in list(folded.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if (type(conv) is not nn.Conv2d or conv.bias is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or len(node.users) != 1):
            continue
        chain, z = [next(iter(node.users))], None
        if add(chain[0]) and len(chain[0].users) == 1 and len(chain[0].args) == 2:
            z = chain[0].args[1] if chain[0].args[0] is node else chain[0].args[0]
            chain.append(next(iter(chain[0].users)))
            if not isinstance(z, torch.fx.Node) or z is node:
                continue
        if not relu(chain[-1]):
            continue
        # A residual that is itself a folded convolution (the downsampling shortcut): its bias joins the
        # fused unit's, so that convolution runs without a bias add of its own.
        z_conv = modules.get(z.target) if z is not None and z.op == "call_module" else None
        extra_bias = None
        if type(z_conv) is nn.Conv2d and z_conv.bias is not None and len(z.users) == 1:
            extra_bias = z_conv.bias.detach()
            unbiased = copy.deepcopy(z_conv)
            unbiased.bias = None
            parent, _, attr = z.target.rpartition(".")
            setattr(folded.get_submodule(parent) if parent else folded, attr, unbiased)
        name = f"{node.target.replace('.', '_')}_relu"
        folded.add_submodule(name, FrozenConvReLU(conv, extra_bias))
        with folded.graph.inserting_after(chain[-1]):
            fused = folded.graph.call_module(name, (node.args[0],) if z is None else (node.args[0], z))
        chain[-1].replace_all_uses_with(fused)
        for n in reversed([node, *chain]):
            folded.graph.erase_node(n)
    folded.delete_all_unused_submodules()


class FrozenConvReLU(nn.Module):
    """relu(conv(x) + bias [+ z]) with frozen weights: one cuDNN kernel on CUDA.

    `bias` is the convolution's, plus the residual convolution's where that one's was moved here.
    Where autograd records (the frozen branch of a block some image chose, in training), the fused
    kernel runs only with `fused_under_autograd` (set by spottune.py's `_lean_blocks`, which the CUDA graphs run),
    with a backward of its own (`_FusedUnit`): written in Python, it costs host time per unit, which
    measured slower than the kernel saved when run eagerly (ResNet-50, per-image routing: 59 ms a
    step against 52; docs/performance.md), and nothing inside a replayed graph. Elsewhere torch's
    layers run there.
    """

    def __init__(self, conv: nn.Conv2d, extra_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.conv = conv
        bias = conv.bias.detach() if extra_bias is None else conv.bias.detach() + extra_bias
        self.register_buffer("bias", bias)
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.fused = True  # the cuDNN kernel where possible; off for good once cuDNN turns a configuration down
        self.fused_under_autograd = False

    def _apply(self, fn, recurse: bool = True):
        self._cast.clear()
        return super()._apply(fn, recurse)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias in `dtype`, cast once (they are frozen), the weight in the input's memory layout."""
        key = (dtype, self.conv.weight.device)
        if key not in self._cast:
            w = self.conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
            self._cast[key] = (w, self.bias.to(dtype))
        return self._cast[key]

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        recording = torch.is_grad_enabled() and (x.requires_grad or (z is not None and z.requires_grad))
        if (self.fused and (not recording or self.fused_under_autograd) and x.is_cuda and x.dim() == 4
                and torch.backends.cudnn.enabled):
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            if dtype in (torch.float16, torch.bfloat16, torch.float32) and x.is_contiguous(memory_format=torch.channels_last):
                xx, zz = x.to(dtype), None if z is None else z.to(dtype).contiguous(memory_format=torch.channels_last)
                try:
                    return _FusedUnit.apply(xx, zz, self, dtype) if recording else self._fused(xx, zz, dtype)
                except RuntimeError:  # no fused cuDNN engine for this configuration: torch ops from now on
                    self.fused = False
        c = self.conv
        y = F.conv2d(x, c.weight, self.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.relu(y if z is None else y + z)

    def _fused(self, x: torch.Tensor, z: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        c = self.conv
        w, b = self._weights(dtype)
        geometry = (c.stride, c.padding, c.dilation, c.groups)
        if z is None:
            return torch.cudnn_convolution_relu(x, w, b, *geometry)
        return torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, *geometry)  # z made channels_last by forward


class _FusedUnit(torch.autograd.Function):
    """A FrozenConvReLU's fused kernel under autograd: input gradients by ReLU's mask, then the convolution's data gradient.

    Keeps less than torch's conv and ReLU would: the weights are frozen, so the convolution's backward
    is its data gradient alone, a transposed convolution of the gradient, which needs the input's
    shape, not the input. The ReLU's backward needs only where the output is positive: a unit with a
    residual ends its block, and its output (the frozen branch's) is kept by SpotTune's route anyway;
    any other unit keeps a mask of a byte per element (half its bf16 output), and its output is freed
    once the next unit has read it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor | None, unit: FrozenConvReLU, dtype: torch.dtype):
        y = unit._fused(x, z, dtype)
        ctx.unit, ctx.dtype, ctx.input_shape = unit, dtype, x.shape
        ctx.save_for_backward(y if z is not None else y > 0)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (kept,) = ctx.saved_tensors
        g = g.contiguous(memory_format=torch.channels_last)
        gy = torch.where(kept, g, 0) if kept.dtype == torch.bool else torch.ops.aten.threshold_backward(g, kept, 0)
        gx = None
        if ctx.needs_input_grad[0]:  # the data gradient is the transposed convolution, which needs no input
            c, (w, _) = ctx.unit.conv, ctx.unit._weights(ctx.dtype)
            extra = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in
                     zip(ctx.input_shape[2:], gy.shape[2:], c.stride, c.padding, c.dilation, c.kernel_size)]
            gx = F.conv_transpose2d(gy, w, None, c.stride, c.padding, extra, c.groups, c.dilation)
        return gx, gy if ctx.needs_input_grad[1] else None, None, None

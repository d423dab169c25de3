"""Fold inference-mode BatchNorm into the convolution before it: the frozen branch's cheaper twin.

A frozen block's BatchNorm is an affine map with constant statistics, so conv -> BN equals one
convolution with rescaled weights and a bias. The folded block computes the same function with
one elementwise pass less per convolution in the forward and none in the backward: BatchNorm's
inference-mode backward is a broadcast elementwise kernel per layer, which made the frozen
branch's input gradients cost as much as its convolutions (docs/performance.md).
"""

from __future__ import annotations

import copy

import torch
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
    folded.graph.lint()
    folded.recompile()
    return folded.requires_grad_(False)

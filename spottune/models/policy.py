"""The routing policy: a small ResNet that decides, per image and block, frozen or tuned."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: an image's routing must not depend on the other images in its batch,
    # and must be the same in training and evaluation (BN's batch vs running statistics are not).
    return nn.GroupNorm(min(8, channels), channels)


class _PolicyBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = _norm(out_ch)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm(out_ch))
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class RoutingPolicy(nn.Module):
    """ResNet-8-like policy (stem + 3 basic blocks + linear) returning 2 logits per routable block.

    It sees the image resized to `input_size` pixels a side, so its cost stays small and fixed
    whatever the backbone's resolution.
    Its normalisation is per image (GroupNorm), so a decision depends on that image alone.
    Logit index 1 means "run the tuned copy".
    """

    def __init__(self, num_blocks: int, width: int = 32, input_size: int = 64) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.input_size = input_size
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            _PolicyBlock(width, width, 2), _PolicyBlock(width, 2 * width, 2), _PolicyBlock(2 * width, 4 * width, 2)
        )
        self.fc = nn.Linear(4 * width, 2 * num_blocks)
        # Start undecided: equal logits, so early training explores both branches evenly.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=False)
        x = self.blocks(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x).view(-1, self.num_blocks, 2)


def sample_decisions(logits: torch.Tensor, temperature: float, mode: str) -> torch.Tensor:
    """Turn (B, L, 2) logits into (B, L) decisions in {0, 1}.

    'gumbel': straight-through Gumbel-Softmax (hard one-hot forward, soft gradient backward);
    'argmax': deterministic, no gradient (evaluation); 'sample': stochastic hard sample, no gradient.
    Noise comes from torch's generator on the logits' device, so seeding reproduces it on CPU and GPU.
    """
    if mode == "gumbel":
        return F.gumbel_softmax(logits.float(), tau=temperature, hard=True)[..., 1]
    if mode == "argmax":
        return (logits[..., 1] > logits[..., 0]).to(logits.dtype)
    if mode == "sample":
        return F.gumbel_softmax(logits.float(), tau=temperature, hard=True)[..., 1].detach()
    raise ValueError(f"unknown decision mode {mode!r}; allowed: gumbel, argmax, sample")

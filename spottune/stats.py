"""The statistics of a paired comparison on the same test images, and how per-image a routing is.

For images i = 1..n and two models A (baseline) and B (candidate) with correctness a_i, b_i in {0, 1}:

    difference      mean_i (b_i - a_i)                      = accuracy(B) - accuracy(A)
    bootstrap CI    the (1-level)/2 and (1+level)/2 quantiles of that mean over `samples` resamples of
                    the n images with replacement (paired: an image's a_i and b_i are drawn together)
    McNemar         only discordant images count: n01 (A right, B wrong), n10 (A wrong, B right);
                    p = min(1, 2 * P[X <= min(n01, n10)]) with X ~ Binomial(n01 + n10, 1/2)
    mixed blocks    blocks that send between 5% and 95% of the test images to their tuned copy: a
                    per-block choice (the same branch for every image) has none
"""

from __future__ import annotations

import math

import torch


def mcnemar_exact(a_correct: torch.Tensor, b_correct: torch.Tensor) -> dict[str, float]:
    """Exact two-sided McNemar test on paired correctness: only discordant pairs count."""
    b = int((a_correct & ~b_correct).sum())  # a right, b wrong
    c = int((~a_correct & b_correct).sum())  # a wrong, b right
    n = b + c
    if n == 0:
        return {"a_only": b, "b_only": c, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return {"a_only": b, "b_only": c, "p_value": min(1.0, 2 * tail)}


def bootstrap_difference(a_correct: torch.Tensor, b_correct: torch.Tensor, *, samples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
    """Paired bootstrap confidence interval of accuracy(b) - accuracy(a). Each tensor holds one score per
    test image: whether it was right (or, in the benchmark, how many seeds got it right). Float64, so the
    mean difference is not rounded through float32."""
    diff = b_correct.double() - a_correct.double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (samples, len(diff)), generator=g)
    means = diff[idx].mean(1).sort().values
    lo, hi = means[int((1 - level) / 2 * samples)], means[min(samples - 1, int((1 + level) / 2 * samples))]
    return {"difference": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level}


def mixed_blocks(tuned_fraction_per_block: list[float]) -> int:
    """Blocks whose routing differs between images: 5% to 95% of them take the tuned copy."""
    return sum(0.05 <= f <= 0.95 for f in tuned_fraction_per_block)

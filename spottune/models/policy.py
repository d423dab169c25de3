"""The routing policy: a small ResNet that decides, per image and block, frozen or tuned."""

from __future__ import annotations

import math
from collections.abc import Callable

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

    def __init__(self, num_blocks: int, width: int = 32, input_size: int = 64,
                 init_tune_probability: float = 0.5, init_weight_std: float = 0.0) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.input_size = input_size
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            _PolicyBlock(width, width, 2), _PolicyBlock(width, 2 * width, 2), _PolicyBlock(2 * width, 4 * width, 2)
        )
        self.fc = nn.Linear(4 * width, 2 * num_blocks)
        # The tuned copy's probability starts at `init_tune_probability` for every block (0.5: undecided);
        # with init_weight_std 0 every image starts with the same logits and the per-image part is learnt
        # from zero. A symmetric start is a stationary point of the usage term (usage_term).
        nn.init.normal_(self.fc.weight, std=init_weight_std) if init_weight_std > 0 else nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        with torch.no_grad():
            self.fc.bias.view(num_blocks, 2)[:, 1] = math.log(init_tune_probability / (1 - init_tune_probability))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=False)
        x = self.blocks(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x).view(-1, self.num_blocks, 2)


class GraphedPolicy:
    """Runs a RoutingPolicy at inference as a replayed CUDA graph, one per input shape.

    Why: the policy is a few dozen small kernels whose cost is their launches, not their arithmetic
    (measured on an H200 at batch 128: 2.5 ms per inference batch, unchanged at half its width),
    and SpotTune's blocks wait for its decisions. A replayed graph launches them all at once.
    Training runs it eagerly: there its launches overlap the blocks' work, and a graphed backward
    would have to be kept apart from DistributedDataParallel's gradient hooks. CPU tensors,
    gradients and autocast with its weight cache (a graph would read cast copies freed at its exit)
    also run eagerly. Graphs read the parameters in place, so load_state_dict is seen; moving the
    model needs `reset()`.
    """

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self._graphs: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}

    def reset(self) -> None:
        self._graphs.clear()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cuda")
        if (not images.is_cuda or self.policy.training or torch.is_grad_enabled()
                or (autocast and torch.is_autocast_cache_enabled())):
            return self.policy(images)
        key = (tuple(images.shape), images.dtype, images.stride(), images.device, autocast,
               torch.get_autocast_dtype("cuda") if autocast else None)
        run = self._graphs.get(key)
        if run is None:
            run = self._graphs[key] = self._capture(images)
        return run(images)

    def _capture(self, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        static_in = images.detach().clone()
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN picks its algorithms here
            for _ in range(2):
                self.policy(static_in)
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may call CUDA during the capture (the DataLoader's pin-memory
        # thread, NCCL's watchdog under torchrun); the default 'global' mode then invalidates it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.policy(static_in)

        def run(x: torch.Tensor) -> torch.Tensor:
            static_in.copy_(x)
            graph.replay()
            return static_out.clone()  # the next replay overwrites static_out

        return run


def tune_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, L, 2) logits -> (B, L) probability of the tuned copy, without noise (float32)."""
    return torch.sigmoid(logits[..., 1].float() - logits[..., 0].float())


def usage_term(p: torch.Tensor) -> torch.Tensor:
    """ln 2 minus the mutual information between an image and its decision, averaged over blocks.

        I_l = H(mean_b p_bl) - mean_b H(p_bl),   term = mean_l (ln 2 - I_l) >= 0

    p: (B, L) probabilities of tuning. The term is zero exactly when half of the batch tunes each block
    and every image is decided (p in {0, 1}); a block that every image routes the same way (the
    collapse to a per-block choice) costs ln 2. Unlike the global-k entropy term, which pushes each
    block's batch usage to 0 or 1, it rewards decisions that differ between images.
    """
    def entropy(q: torch.Tensor) -> torch.Tensor:
        q = q.clamp(1e-6, 1 - 1e-6)
        return -(q * q.log() + (1 - q) * (1 - q).log())

    mutual_information = entropy(p.mean(0)) - entropy(p).mean(0)
    return (math.log(2) - mutual_information).mean()


def sample_decisions(logits: torch.Tensor, temperature: float, mode: str, noise: float = 1.0) -> torch.Tensor:
    """Turn (B, L, 2) logits into (B, L) decisions.

    'gumbel': straight-through Gumbel-Softmax (hard one-hot forward, soft gradient backward), with
             forward values exactly 0 and 1 (torch's `hard=True` returns 1 - s + s, which can be
             1 - 2**-24): a block can then return the chosen branch's output itself;
    'argmax': deterministic, no gradient (evaluation); 'sample': stochastic hard sample, no gradient;
    'expectation': the probability of the tuned copy itself (no noise, no gradient): each block then
             returns the mixture F + p (F~ - F), the expected output over the decisions sampled in training.

    The hard decision is argmax(logits + noise * g), g ~ Gumbel(0, 1): the temperature changes only the
    soft part, i.e. the gradient's scale, never which branch runs. `noise` scales the Gumbel noise (1:
    Gumbel-Softmax; 0: the training decisions are the evaluation's argmax, gradients still straight-through).
    Noise comes from torch's generator on the logits' device, so seeding reproduces it on CPU and GPU.
    """
    if mode in ("gumbel", "sample"):
        logits = logits.float()
        if noise > 0:
            # As F.gumbel_softmax draws it (same generator calls), so noise 1 gives its samples.
            gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()
            logits = logits + (gumbels if noise == 1 else noise * gumbels)
        soft = (logits / temperature).softmax(-1)
        hard = (soft[..., 1] > soft[..., 0]).to(soft.dtype)  # torch's argmax: a tie takes index 0
        return hard + (soft[..., 1] - soft[..., 1].detach()) if mode == "gumbel" else hard
    if mode == "argmax":
        return (logits[..., 1] > logits[..., 0]).to(logits.dtype)
    if mode == "expectation":
        return tune_probability(logits)
    raise ValueError(f"unknown decision mode {mode!r}; allowed: gumbel, argmax, sample, expectation")

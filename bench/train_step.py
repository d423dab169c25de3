"""Benchmark: SpotTune's training step and inference against plain fine-tuning, on one GPU.

Same engine, same settings (bf16 autocast, channels_last, SGD with momentum), batch resident on the
GPU so only the model is timed. SpotTune's routing mix is set through the policy's bias: with zero
weights, P(tuned) = p for every image and block, whatever the Gumbel temperature.

    python bench/train_step.py --backbones resnet50 resnet101 efficientnet_lite0 --out bench/results/train_step.json

Prints a table and writes JSON. Not a test: run it on the GPU whose numbers you report.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from spottune.config import validate_params
from spottune.models import build_model


def cuda_time(fn, steps: int, warmup: int) -> float:
    """Median milliseconds of fn() over `steps` runs after `warmup`, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def set_routing(model, p: float) -> None:
    with torch.no_grad():
        model.policy.fc.weight.zero_()
        bias = model.policy.fc.bias.view(-1, 2)
        bias[:, 0] = 0.0
        bias[:, 1] = math.log(p / (1 - p)) if 0 < p < 1 else (30.0 if p >= 1 else -30.0)


def measure(backbone: str, method: str, p: float | None, batch: int, size: int, steps: int, warmup: int) -> dict:
    params = validate_params({
        "model": {"backbone": backbone, "weights": "none", "method": method},
        "data": {"image_size": size},
    })
    torch.manual_seed(0)
    model = build_model(params, 100).cuda().to(memory_format=torch.channels_last)
    if p is not None:
        set_routing(model, p)
    optimizer = torch.optim.SGD(model.parameter_groups(params.optim), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out.logits.float(), y)
            extra = model.regularization(out)
            loss = loss if extra is None else loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    torch.cuda.reset_peak_memory_stats()
    train_ms = cuda_time(train_step, steps, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30

    model.eval()

    @torch.inference_mode()
    def infer():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    infer_ms = cuda_time(infer, steps, warmup)
    return {"backbone": backbone, "method": method, "p_tuned": p, "batch": batch, "size": size,
            "train_ms": train_ms, "train_img_s": batch / train_ms * 1e3, "peak_gib": peak,
            "infer_ms": infer_ms, "infer_img_s": batch / infer_ms * 1e3}


def hand_written_loop(backbone: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    """The plainest PyTorch fine-tuning step with the same settings: our engine should not be slower."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(backbone, weights=None, num_classes=100).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    ms = cuda_time(step, steps, warmup)
    return {"backbone": backbone, "method": "hand-written", "p_tuned": None, "batch": batch, "size": size,
            "train_ms": ms, "train_img_s": batch / ms * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101", "efficientnet_lite0"])
    ap.add_argument("--mixes", nargs="+", type=float, default=[0.5, 0.1, 0.9])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_step.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    rows = []
    for backbone in args.backbones:
        if backbone.startswith("resnet") and backbone != "resnet26":
            rows.append(hand_written_loop(backbone, args.batch, args.size, args.steps, args.warmup))
        rows.append(measure(backbone, "finetune", None, args.batch, args.size, args.steps, args.warmup))
        for p in args.mixes:
            rows.append(measure(backbone, "spottune", p, args.batch, args.size, args.steps, args.warmup))
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    base = {r["backbone"]: r for r in rows if r["method"] == "finetune"}
    print(f"GPU: {gpu}, torch {torch.__version__}, batch {args.batch}, {args.size} px, bf16, channels_last")
    print(f"{'backbone':18} {'method':13} {'p':>4} {'train ms':>9} {'x ft':>6} {'img/s':>7} {'GiB':>6} {'x ft':>5} "
          f"{'infer img/s':>11} {'x ft':>5}")
    for r in rows:
        b = base[r["backbone"]]
        p = "" if r["p_tuned"] is None else f"{r['p_tuned']:.1f}"
        mem = f"{r['peak_gib']:6.2f} {r['peak_gib'] / b['peak_gib']:5.2f}" if "peak_gib" in r else " " * 12
        inf = f"{r['infer_img_s']:11.0f} {r['infer_img_s'] / b['infer_img_s']:5.2f}" if "infer_img_s" in r else ""
        print(f"{r['backbone']:18} {r['method']:13} {p:>4} {r['train_ms']:9.1f} {r['train_ms'] / b['train_ms']:6.2f} "
              f"{r['train_img_s']:7.0f} {mem} {inf}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)},
                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

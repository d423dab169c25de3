"""Benchmark: SpotTune's training step and inference against plain fine-tuning, on one GPU.

Same engine step (`spottune.engine.train_step`) and settings for every row (bf16 autocast,
channels_last, SGD with momentum, every learning rate 0 so the routing and weights hold while timed:
`hold_weights`); the batch lives on the GPU so only the model is timed (the data path has its own
benchmark). Rows:
  hand-written   the plainest torchvision fine-tuning loop (our engine should be as fast)
  finetune       our FineTuneNet, its step replayed as a CUDA graph as training runs it ('graphs'), or
                 eagerly ('eager', --finetune-executions); the ratios are against 'graphs'
  spottune       per execution (see EXECUTIONS: 'mixed' = the 2019 design; 'ours' = split training
                 with the route kernels and its blocks replayed as CUDA graphs, conditional inference,
                 the frozen copy folded and fused, CUDA-graphed policy at inference;
                 'ours-recompute' adds policy.recompute_frozen; 'ours-eager', 'ours-nofold', 'ours-nofuse'
                 and 'ours-nograph' leave one part out) and routing mix: p=0.5/0.1/0.9 draw each image's decision
                 per block with that probability; 'trained' replays the per-block routing a
                 policy learnt on real data (bench/results/routing-*.json)
Peak memory (allocated tensors) is over warm-up and timed steps (a CUDA graph allocates while it is
captured, in the warm-up); the timed steps' alone is in the JSON as timed_peak_gib. 'rsv' is the peak
the caching allocator reserved in the timed steps, started from an empty cache: the steady state's
footprint, CUDA graphs' memory pools included (timed_reserved_gib). Inference images/s is a stream of batches through
`infer_batches`, as evaluation runs it (SpotTune queues each batch's policy one batch ahead); '1 batch'
is the ratio for one call alone (latency).

    python bench/train_step.py --out bench/results/train_step.json

Prints a table and writes JSON. Not a test: run it on the GPU whose numbers you report.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from spottune.atomic import write_json
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


def stream_time(model, x: torch.Tensor, setup, batches: int, repeats: int = 5) -> float:
    """Median milliseconds per batch of `repeats` streams of `batches` batches through `model.infer_batches`.

    This is how evaluation runs a model (spottune.engine.predict): one stream, no host sync per batch,
    so a model may queue work for the next batch early (SpotTune queues its policy one batch ahead).
    """
    def run() -> None:
        with torch.inference_mode(), setup.autocast():
            for _ in model.infer_batches(x for _ in range(batches)):
                pass

    run()  # warm-up: policy graphs, cuDNN's algorithm choices
    return cuda_time(run, repeats, 1) / batches


def print_profile(fn, title: str, steps: int = 5) -> None:
    """Where a step's time goes: GPU kernel time against wall time per step, and the ops with the most GPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    print(f"\n== {title}: {wall:.1f} ms wall per step (profiled), GPU kernels {busy:.1f} ms, "
          f"{sum(e.count for e in kernels) // steps} kernels")
    for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:16]:
        ms = e.self_device_time_total / steps / 1e3
        if ms > 0.05:
            print(f"  {ms:7.2f} ms  {e.count // steps:5d}x  {e.key[:90]}")


def set_routing(model, mix: str, trained: list[float]) -> float:
    """Policy whose decisions follow `mix`: per-image random draws at rate p, or a trained per-block pattern.

    A trained pattern longer than the backbone's blocks is cut; blocks beyond it stay frozen. Returns
    the fraction of tuned decisions expected.
    """
    probs = trained[:model.num_blocks] if mix == "trained" else [float(mix)] * model.num_blocks
    with torch.no_grad():
        model.policy.fc.weight.zero_()
        bias = model.policy.fc.bias.view(-1, 2)
        bias[:, 0] = 0.0
        for l, p in enumerate(probs):
            p = min(max(p, 1e-6), 1 - 1e-6)
            bias[l, 1] = math.log(p / (1 - p))
    # Random draws need sampling at evaluation (equal logits for all images); a trained pattern is argmax.
    eval_mode = "argmax" if mix == "trained" else "sample"
    model.policy_params = model.policy_params.model_copy(update={"eval_decisions": eval_mode, "temperature": 1.0})
    model.temperature = 1.0
    return sum(round(p) if mix == "trained" else p for p in probs) / model.num_blocks


def hold_weights(optimizer: torch.optim.Optimizer) -> None:
    """Time training steps without changing the model: every learning rate 0, all the arithmetic kept.

    Why: on one repeated batch of noise, training moves what a row is meant to time. The decisions'
    gradient drives a free policy to all-or-nothing routing within a few steps (a "0.1" row ended
    at 88-100% tuned), and with the policy held the network itself diverged in some rows, after
    which NaN logits route every image to the frozen copy. SGD still computes every gradient,
    momentum and weight-decay term at a learning rate of 0.
    """
    for group in optimizer.param_groups:
        group["lr"] = 0.0


def gpu_batch(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of noise images on the GPU (channels_last) with labels of 100 classes."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 3, size, size, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 100, (batch,), device="cuda", generator=g)


EXECUTIONS = {  # name: (model.execution in training, fold the frozen BN, fuse conv+ReLU, graph the policy,
    #                  recompute_frozen, replay the blocks as CUDA graphs in training)
    "mixed": ("mixed", False, False, False, False, False),  # the 2019 design
    "ours": ("auto", True, True, True, False, True),
    "ours-recompute": ("auto", True, True, True, True, False),  # policy.recompute_frozen: memory for time
    "ours-eager": ("auto", True, True, True, False, False),  # the blocks' training not replayed as CUDA graphs
    "ours-nofold": ("auto", False, False, True, False, True),  # the frozen copy with its BN layers
    "ours-nofuse": ("auto", True, False, True, False, True),  # folded, but conv, bias, residual and ReLU as torch ops
    "ours-nograph": ("auto", True, True, False, False, True),  # the policy not graphed at inference
}


def measure(backbone: str, method: str, execution: str | None, mix: str | None, trained: list[float],
            batch: int, size: int, steps: int, warmup: int, policy: dict, profile: bool = False) -> dict:
    from spottune.engine import DeviceSetup, train_step

    params = validate_params({"model": {"backbone": backbone, "weights": "none", "method": method},
                              "data": {"image_size": size},
                              "policy": {k: v for k, v in policy.items() if k != "compile"}})
    # The previous rows' memory back to the driver, so that this row's peaks are its own: their models and
    # CUDA graphs, and the cuBLAS workspaces cached per stream (each model's side stream, each capture's).
    gc.collect()
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    left_over = torch.cuda.memory_allocated() / 2**30  # should be 0: nothing of the rows before
    torch.manual_seed(0)
    model = build_model(params, 100).cuda().to(memory_format=torch.channels_last)
    if mix is None:
        model.graph_blocks = execution != "eager"  # spottune.training turns the graphs on
    else:
        expected_fraction = set_routing(model, mix, trained)
        mode, model.fold_frozen_bn, fuse, model.graph_policy, recompute, model.graph_blocks = EXECUTIONS[execution]
        model.policy_params = model.policy_params.model_copy(update={"recompute_frozen": recompute})
        if model.fold_frozen_bn and not fuse:
            from spottune.models.fold import FrozenConvReLU

            for unit in (m for b in model.runtime_frozen_blocks() for m in b.modules() if isinstance(m, FrozenConvReLU)):
                unit.fused = False
        if policy.get("compile"):
            model.policy = torch.compile(model.policy)
            model.graph_policy = False
    setup = DeviceSetup.resolve("cuda", amp=True, channels_last=True)
    optimizer = torch.optim.SGD(model.parameter_groups(params.optim), lr=1e-3, momentum=0.9)
    hold_weights(optimizer)
    x, y = gpu_batch(batch, size)

    def step():  # the engine's own training step
        train_step(model, model, optimizer, x, y, setup)

    row = {"backbone": backbone, "method": method, "execution": execution, "mix": mix, "batch": batch, "size": size,
           "left_over_gib": left_over}
    model.train()
    if mix is not None:
        model.execution = mode
    # Peak memory over warm-up and timed steps: CUDA graphs (the training step's) allocate
    # their memory once, while they are captured in the warm-up, and nothing when replayed. The timed
    # steps' own peak is kept apart (timed_peak_gib).
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_peak = torch.cuda.max_memory_allocated() / 2**30
    # The timed steps start from an empty cache: the memory reserved while they run is what the steady
    # state holds, CUDA graphs' pools included (a pool stays whole while its graph lives; a replay
    # allocates nothing, so allocated bytes alone would miss it).
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row["train_ms"] = cuda_time(step, steps, 0)
    row["timed_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row["peak_gib"] = max(warmup_peak, row["timed_peak_gib"])
    row["timed_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    row["train_img_s"] = batch / row["train_ms"] * 1e3
    if profile:
        print_profile(step, f"{backbone} {method} {execution or ''} {mix or ''}")

    model.eval()
    if mix is not None:
        model.execution = "mixed" if mode == "mixed" else "auto"

    @torch.inference_mode()
    def infer():
        with setup.autocast():
            return model(x)

    row["infer_ms"] = stream_time(model, x, setup, steps)  # throughput: a stream of batches, as evaluation runs
    row["infer_img_s"] = batch / row["infer_ms"] * 1e3
    row["infer_one_batch_ms"] = cuda_time(infer, steps, warmup)  # latency: one call, nothing queued ahead
    if profile:
        print_profile(infer, f"{backbone} {method} {execution or ''} {mix or ''} inference")
    if mix is not None:
        with torch.inference_mode(), setup.autocast():
            torch.manual_seed(1)
            decisions = model.decide(x)
            model.execution = "mixed"
            ref = model(x, decisions).logits.float()
            model.execution = "conditional"
            got = model(x, decisions).logits.float()
        row["tuned_fraction"] = float(decisions.float().mean())
        row["tuned_fraction_expected"] = expected_fraction
        row["routing_held"] = abs(row["tuned_fraction"] - expected_fraction) < 0.05  # '!' in the table if not
        row["infer_rel_err_vs_mixed"] = float((got - ref).norm() / ref.norm())
        row["infer_same_top1"] = float((got.argmax(1) == ref.argmax(1)).float().mean())
    return row


def policy_cost(policy: dict, num_blocks: int, batch: int, size: int, steps: int, warmup: int) -> dict:
    """The routing policy alone: what SpotTune pays on top of its blocks, in training and inference."""
    from spottune.models.policy import RoutingPolicy

    net = RoutingPolicy(num_blocks, policy["width"], policy["input_size"]).cuda().to(memory_format=torch.channels_last)
    if policy.get("compile"):
        net = torch.compile(net)
    x, _ = gpu_batch(batch, size)

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(x).float().sum().backward()

    @torch.inference_mode()
    def infer():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(x)

    return {"policy": dict(policy), "train_ms": cuda_time(train, steps, warmup), "infer_ms": cuda_time(infer, steps, warmup)}


def hand_written_loop(backbone: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    """The plainest PyTorch fine-tuning step with the same settings: the default params' head dropout
    and weight decay, SGD with momentum, bf16 autocast, channels_last."""
    import torchvision

    defaults = validate_params({"model": {"backbone": backbone}})
    torch.manual_seed(0)
    net = torchvision.models.get_model(backbone, weights=None, num_classes=100)
    net.fc = torch.nn.Sequential(torch.nn.Dropout(defaults.model.dropout), net.fc)
    net = net.cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9,  # held, as every other row (hold_weights)
                          weight_decay=defaults.optim.weight_decay)
    x, y = gpu_batch(batch, size)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    ms = cuda_time(step, steps, warmup)
    return {"backbone": backbone, "method": "hand-written", "execution": None, "mix": None, "batch": batch,
            "size": size, "train_ms": ms, "train_img_s": batch / ms * 1e3}


def print_table(rows: list[dict], header: str) -> None:
    base: dict[str, dict] = {}  # per backbone, fine-tuning as training runs it (replayed as a graph)
    for r in rows:
        if r["method"] == "finetune" and r["execution"] != "eager":
            base.setdefault(r["backbone"], r)
    print(header)
    print(f"{'backbone':18} {'method':12} {'exec':6} {'mix':>7} {'train ms':>9} {'x ft':>5} {'GiB':>6} {'x ft':>5} "
          f"{'rsv GiB':>7} {'x ft':>5} {'infer img/s':>11} {'x ft':>5} {'1 batch':>7} {'rel err':>8}")
    for r in rows:
        b = base[r["backbone"]]
        mem = (f"{r['peak_gib']:6.2f} {r['peak_gib'] / b['peak_gib']:5.2f} "
               f"{r['timed_reserved_gib']:7.2f} {r['timed_reserved_gib'] / b['timed_reserved_gib']:5.2f}"
               if "peak_gib" in r else " " * 26)
        inf = (f"{r['infer_img_s']:11.0f} {r['infer_img_s'] / b['infer_img_s']:5.2f} "
               f"{b['infer_one_batch_ms'] / r['infer_one_batch_ms']:7.2f}") if "infer_img_s" in r else " " * 25
        err = f"{r['infer_rel_err_vs_mixed']:8.1e}" if "infer_rel_err_vs_mixed" in r else ""
        mix = (r["mix"] or "") + ("" if r.get("routing_held", True) else "!")
        print(f"{r['backbone']:18} {r['method']:12} {r['execution'] or '':6} {mix:>7} {r['train_ms']:9.1f} "
              f"{r['train_ms'] / b['train_ms']:5.2f} {mem} {inf} {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101", "efficientnet_lite0"])
    ap.add_argument("--mixes", nargs="+", default=["0.5", "0.1", "0.9", "trained"])
    ap.add_argument("--executions", nargs="+", default=["mixed", "ours"], choices=list(EXECUTIONS))
    ap.add_argument("--finetune-executions", nargs="+", default=["graphs"], choices=["graphs", "eager"])
    ap.add_argument("--trained-routing", type=Path, default=Path(__file__).parent / "results" / "routing-fashion-mnist-lite0.json")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--policy-width", type=int, default=32)
    ap.add_argument("--policy-input", type=int, default=64)
    ap.add_argument("--compile-policy", action="store_true", help="torch.compile the routing policy")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning for every row")
    ap.add_argument("--profile", action="store_true",
                    help="also print, per row, GPU kernel time against wall time and the ops with the most GPU time "
                         "(training step and inference; timings measured before profiling)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_step.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    policy = {"width": args.policy_width, "input_size": args.policy_input}
    if args.compile_policy:
        policy["compile"] = True
    trained = json.loads(args.trained_routing.read_text())["tuned_fraction_per_block"]
    rows = []
    for backbone in args.backbones:
        if backbone.startswith("resnet") and backbone != "resnet26":
            rows.append(hand_written_loop(backbone, args.batch, args.size, args.steps, args.warmup))
        for execution in args.finetune_executions:
            rows.append(measure(backbone, "finetune", execution, None, trained, args.batch, args.size, args.steps,
                                args.warmup, policy, args.profile))
        for execution in args.executions:
            for mix in args.mixes:
                rows.append(measure(backbone, "spottune", execution, mix, trained, args.batch, args.size,
                                    args.steps, args.warmup, policy, args.profile))
    policy_row = policy_cost(policy, 16, args.batch, args.size, args.steps, args.warmup)
    gpu = torch.cuda.get_device_name()
    print_table(rows, f"GPU: {gpu}, torch {torch.__version__}, batch {args.batch}, {args.size} px, bf16, channels_last, "
                      f"cudnn.benchmark={args.cudnn_benchmark}, median of {args.steps} steps after {args.warmup}")
    print(f"policy alone (width {args.policy_width}, {args.policy_input} px): train {policy_row['train_ms']:.2f} ms, "
          f"inference {policy_row['infer_ms']:.2f} ms per batch")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    meta = {k: (str(v.resolve().relative_to(repo)) if isinstance(v, Path) and v.resolve().is_relative_to(repo)
                else str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"gpu": gpu, "torch": torch.__version__, "args": meta, "rows": rows, "policy": policy_row})


if __name__ == "__main__":
    main()

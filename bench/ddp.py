"""Benchmark: what a second GPU costs each training process, with the data loader out of the picture.

Run under torchrun with 2 processes (one per GPU). For each method it times the engine's training
step (`spottune.engine.train_step`, bf16, channels_last, batches already on the GPU, weights held as
in bench/train_step.py) these ways:

  alone      rank 0 trains, rank 1 waits: one GPU, as `spottune train` runs without torchrun
  parallel   both ranks train their own model at once, no gradient exchange: what sharing the host costs
  ddp        both ranks train one DistributedDataParallel model (`spottune.distributed`): the real thing
  ddp bcast  the same with DDP's default `broadcast_buffers=True` (rank 0's BN statistics sent to every
             rank before each forward), which `spottune.distributed` turns off

so a loss of scaling splits into the host's share (alone -> parallel) and DDP's own (parallel -> ddp).
Scaling = 2 x alone ms / ddp ms (the slower rank). Prints a table and writes JSON (rank 0).

    torchrun --nproc_per_node 2 bench/ddp.py --out bench/results/ddp-step.json

Not a test: run it on the GPUs whose numbers you report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import cuda_time, gpu_batch, hold_weights, set_routing

from spottune.atomic import write_json
from spottune.config import validate_params
from spottune.distributed import Distributed
from spottune.models import build_model


def time_step(model, wrapped, params, setup, batch: int, size: int, steps: int, warmup: int) -> float:
    from spottune.engine import train_step

    optimizer = torch.optim.SGD(model.parameter_groups(params.optim), lr=1e-3, momentum=0.9)
    hold_weights(optimizer)  # each row keeps its routing mix while timed
    x, y = gpu_batch(batch, size)
    model.train()
    return cuda_time(lambda: train_step(model, wrapped, optimizer, x, y, setup), steps, warmup)


def measure(method: str, mix: str | None, trained: list[float], rank_env: Distributed, args) -> dict:
    from spottune.engine import DeviceSetup

    device = torch.device(rank_env.device_name("cuda"))
    setup = DeviceSetup.resolve(str(device), amp=True, channels_last=True)
    params = validate_params({"model": {"backbone": args.backbone, "weights": "none", "method": method},
                              "data": {"image_size": args.size}})

    def fresh():
        torch.manual_seed(0)
        model = build_model(params, 100).to(device).to(memory_format=torch.channels_last)
        model.graph_blocks = not args.eager  # as spottune.training runs it, unless asked
        if mix is not None:
            set_routing(model, mix, trained)
        return model

    timing = (args.batch, args.size, args.steps, args.warmup)
    row = {"method": method, "mix": mix}
    model = fresh()
    if rank_env.rank == 0:
        row["alone_ms"] = time_step(model, model, params, setup, *timing)
    dist.barrier()
    row["parallel_ms"] = time_step(model, model, params, setup, *timing)
    dist.barrier()
    model = fresh()
    row["ddp_ms"] = time_step(model, rank_env.wrap(model, device), params, setup, *timing)
    dist.barrier()
    model = fresh()  # DDP's defaults for buffers: rank 0's BN statistics broadcast before every forward
    ddp = DistributedDataParallel(model, device_ids=[device.index])
    row["ddp_bcast_ms"] = time_step(model, ddp, params, setup, *timing)
    dist.barrier()
    gathered = [None] * rank_env.world_size
    dist.all_gather_object(gathered, row)
    for key in ("parallel_ms", "ddp_ms", "ddp_bcast_ms"):
        if key in row:
            row[f"{key}_per_rank"] = [r[key] for r in gathered]
    row["scaling"] = rank_env.world_size * row.get("alone_ms", 0.0) / max(row["ddp_ms_per_rank"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--rows", nargs="+", default=["finetune", "spottune:0.5", "spottune:trained"],
                    help="METHOD or spottune:MIX (a routing mix as in bench/train_step.py)")
    ap.add_argument("--trained-routing", type=Path, default=Path(__file__).parent / "results" / "routing-fashion-mnist-lite0.json")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs of the training step (training uses them)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ddp-step.json"))
    args = ap.parse_args()
    rank_env = Distributed.from_env()
    if not rank_env.enabled or not torch.cuda.is_available():
        raise SystemExit("run under torchrun on GPUs: torchrun --nproc_per_node 2 bench/ddp.py")
    rank_env.start(torch.device(rank_env.device_name("cuda")))
    trained = json.loads(args.trained_routing.read_text())["tuned_fraction_per_block"]
    rows = []
    for spec in args.rows:
        method, _, mix = spec.partition(":")
        rows.append(measure(method, mix or None, trained, rank_env, args))
    if rank_env.rank == 0:
        gpu = torch.cuda.get_device_name()
        print(f"{rank_env.world_size} x {gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.backbone}, "
              f"batch {args.batch} per GPU, {args.size} px, bf16, median of {args.steps} steps")
        print(f"{'method':10} {'mix':>8} {'alone ms':>9} {'parallel ms':>12} {'ddp ms':>8} {'scaling':>8} "
              f"{'ddp bcast ms':>13} {'scaling':>8}")
        for r in rows:
            bcast = max(r["ddp_bcast_ms_per_rank"])
            print(f"{r['method']:10} {r['mix'] or '':>8} {r['alone_ms']:9.1f} {max(r['parallel_ms_per_rank']):12.1f} "
                  f"{max(r['ddp_ms_per_rank']):8.1f} {r['scaling']:8.2f} {bcast:13.1f} "
                  f"{rank_env.world_size * r['alone_ms'] / bcast:8.2f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "trained_routing")}
        write_json(args.out, {"gpus": f"{rank_env.world_size} x {gpu}", "cpu_cores": os.cpu_count(),
                              "torch": torch.__version__, "args": meta, "rows": rows})
    rank_env.stop()


if __name__ == "__main__":
    main()

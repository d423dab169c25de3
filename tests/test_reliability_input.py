"""Bad input and secrets: every kind of bad input fails with a message naming the culprit and leaves
nothing half-made (no manifest, dataset, checkpoint or promoted model), and credentials reach no
log, report, params file, DVC file, Prefect record or uploaded object.

Real files, real `spottune` commands (in-process, or as processes where the exit status and stderr
are the point), moto's S3 server as a process on 127.0.0.1 and Prefect's test server. Corrupt,
truncated, zero-byte and oversized images, empty class folders and unexpected labels are covered in
test_validation.py; missing buckets, unreachable endpoints and absent credentials for the store in
test_store.py. This file adds what those do not.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spottune.config import Params, load_params, validate_params
from spottune.errors import ConfigError, DataError, StoreError
from spottune.settings import RemoteSettings

from support import (
    PROJECT,
    MotoServer,
    bucket_names,
    clean_env,
    cli,
    free_port,
    new_bucket,
    new_pipeline_repo,
    prefect_test_server,
    snapshot_bucket,
    tiny_flow_project,
)

FASHION = ("bag", "coat", "sandal", "trouser")
sys.path.insert(0, str(PROJECT))  # `flows` is not an installed package: it runs from the repository root


# ---------------------------------------------------------------------------------------------
# Helpers: small real trees, the CLI in-process, crafted PNGs


def real_tree(src: Path, dst: Path, labels: dict[str, str], train: int = 4, test: int = 2) -> Path:
    """dst/{train,test}/LABEL/*.png holding real Fashion-MNIST images of the mapped source class, and a
    dataset card listing the labels (as `spottune data` writes it)."""
    for split, n in (("train", train), ("test", test)):
        for label, source_class in labels.items():
            folder = dst / split / label
            folder.mkdir(parents=True)
            for f in sorted((src / split / source_class).glob("*.png"))[:n]:
                shutil.copyfile(f, folder / f.name)
    (dst / "dataset.json").write_text(json.dumps({"source": "test", "classes": sorted(labels)}))
    return dst


def params_file(tmp_path: Path, root: Path, **sections: dict[str, Any]) -> Path:
    """A params.yaml for a tiny CPU run on `root` (YAML-dumped, so any label or path is quoted right)."""
    raw: dict[str, Any] = {
        "data": {"root": str(root), "image_size": 32, "batch_size": 64, "eval_batch_size": 64},
        "prepare": {"manifest": str(tmp_path / "prepared" / "manifest.csv"), "val_fraction": 0.25},
        "validate": {"min_images_per_class": 1, "min_rows": 1},
        "model": {"method": "linear"},
        "optim": {"epochs": 1, "max_steps_per_epoch": 1},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: kilobytes on disk, width x height pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = (b"\x00" * (1 + (width + 7) // 8)) * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


@pytest.fixture
def tree(fashion_root, tmp_path) -> Path:
    return real_tree(fashion_root, tmp_path / "data", {c: c for c in FASHION})


# ---------------------------------------------------------------------------------------------
# Non-image files and decompression bombs


@pytest.mark.slow
def test_non_image_files_are_skipped_and_a_disguised_one_is_named(capsys, tree, tmp_path):
    """Files without an image extension are not images of a class: the manifest leaves them out, so
    validation and training never see them. A text file named .png is an image by its name: validation
    names it (file_decodes), and training from an unvalidated tree stops naming it, before a checkpoint."""
    (tree / "train" / "bag" / "notes.txt").write_text("photographed in 2019\n")
    (tree / "train" / "bag" / "labels.csv").write_text("path,label\nx.png,bag\n")
    params = params_file(tmp_path, tree)
    code, text = cli(capsys, "prepare", "--params", params)
    assert code == 0, text
    manifest = (tmp_path / "prepared" / "manifest.csv").read_text()
    assert "notes.txt" not in manifest and "labels.csv" not in manifest and manifest.count("\n") == 1 + 4 * 6

    disguised = tree / "train" / "coat" / "table.png"
    disguised.write_text("path,label,split\na.png,coat,train\n")
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    code, text = cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")
    assert code == 3 and "file_decodes" in text and "table.png" in text and "Traceback" not in text, text

    code, text = cli(capsys, "train", "--params", params, "--out", tmp_path / "run", "--set", "data.manifest=null")
    assert code == 3 and "table.png" in text and "cannot decode" in text, text
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_decompression_bombs_are_refused_from_their_header(capsys, tree, tmp_path):
    """A 48 KB PNG that decodes to 400 Mpx (over twice Pillow's limit: Pillow raises a non-OSError) and a
    12 KB one of 100 Mpx (over the limit: Pillow only warns and would decode 300 MB of RGB). Validation
    refuses both without decoding; training refuses them by name instead of crashing or swapping."""
    from spottune.config import DataParams
    from spottune.data.loaders import build_datasets, load_rgb

    big, bigger = tree / "train" / "bag" / "bomb-100mpx.png", tree / "train" / "coat" / "bomb-400mpx.png"
    big.write_bytes(png_bomb(10_000, 10_000))
    bigger.write_bytes(png_bomb(20_000, 20_000))
    assert bigger.stat().st_size < 100_000

    params = params_file(tmp_path, tree)
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    code, text = cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")
    assert code == 3 and "pixels_within_limit" in text, text
    assert "bomb-100mpx.png (10000x10000)" in text and "bomb-400mpx.png (20000x20000)" in text, text

    for bomb in (big, bigger):
        with pytest.raises(DataError, match=f"refused image .*{bomb.name}"):
            load_rgb(str(bomb))
    splits = build_datasets(DataParams(root=tree, image_size=32), seed=0)
    with pytest.raises(DataError, match="bomb-"):
        for i in range(len(splits.train.dataset)):
            splits.train.dataset[i]


# ---------------------------------------------------------------------------------------------
# Symlinks: out of the tree refused everywhere; inside the tree allowed


@pytest.fixture
def outside_file(fashion_root, tmp_path) -> Path:
    """A real image outside every data directory (a private file, another dataset)."""
    private = tmp_path / "private"
    private.mkdir()
    target = private / "secret.png"
    shutil.copyfile(next((fashion_root / "train" / "shirt").glob("*.png")), target)
    return target


def test_materialise_refuses_symlinks_out_of_the_source_and_copies_links_inside(tree, outside_file, tmp_path):
    link = tree / "train" / "bag" / "escape.png"
    link.symlink_to(outside_file)
    from spottune.data.sources import materialise

    with pytest.raises(DataError, match="escape.png") as err:
        materialise(str(tree), tmp_path / "out", log=lambda _: None)
    assert "outside" in str(err.value) and str(outside_file) in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    link.unlink()
    inner = tree / "train" / "bag" / "alias.png"
    inner.symlink_to(next((tree / "train" / "coat").glob("*.png")))
    materialise(str(tree), tmp_path / "out", log=lambda _: None)
    copied = tmp_path / "out" / "train" / "bag" / "alias.png"
    assert copied.is_file() and not copied.is_symlink()  # the bytes, not a link that could be re-pointed
    assert copied.read_bytes() == inner.read_bytes()


def test_prepare_validate_and_training_refuse_symlinks_out_of_the_data_directory(capsys, tree, outside_file, tmp_path):
    from spottune.config import DataParams
    from spottune.data.loaders import build_datasets

    inner = tree / "train" / "bag" / "alias.png"
    inner.symlink_to(Path("..") / "coat" / next((tree / "train" / "coat").glob("*.png")).name)
    params = params_file(tmp_path, tree)
    assert cli(capsys, "prepare", "--params", params)[0] == 0, "a link inside the tree is allowed"
    assert "train/bag/alias.png" in (tmp_path / "prepared" / "manifest.csv").read_text()
    manifest_before = (tmp_path / "prepared" / "manifest.csv").read_bytes()

    escape = tree / "train" / "coat" / "escape.png"
    escape.symlink_to(outside_file)
    code, text = cli(capsys, "prepare", "--params", params)
    assert code == 3 and "train/coat/escape.png" in text and "outside the data directory" in text, text
    assert (tmp_path / "prepared" / "manifest.csv").read_bytes() == manifest_before, "no manifest lists it"

    # a manifest written before the link was planted: validation and training still refuse it
    shutil.copyfile(outside_file, tmp_path / "stand-in.png")
    escape.unlink()
    shutil.copyfile(tmp_path / "stand-in.png", escape)
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    escape.unlink()
    escape.symlink_to(outside_file)
    code, text = cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")
    assert code == 3 and "file_inside_root" in text and "train/coat/escape.png" in text, text

    manifest = tmp_path / "prepared" / "manifest.csv"
    for data in (DataParams(root=tree, manifest=manifest, image_size=32), DataParams(root=tree, image_size=32)):
        with pytest.raises(DataError, match="escape.png.*private"):
            build_datasets(data, seed=0)
    code, text = cli(capsys, "train", "--params", params, "--out", tmp_path / "run", "--set", f"data.manifest={manifest}")
    assert code == 3 and "escape.png" in text and not (tmp_path / "run" / "checkpoint.pt").exists(), text


# ---------------------------------------------------------------------------------------------
# Label directory names with odd characters

ODD_LABELS = {  # raw folder name -> the Fashion-MNIST class whose images it holds
    "my class": "bag",
    "café ☕": "coat",
    "it's \"quoted\"": "sandal",
    "$(touch pwned); `id` | x > y": "trouser",
    "-rf": "dress",
    "..hidden": "sneaker",
    "a,b\\c": "shirt",
}


def test_materialise_makes_odd_label_names_safe_or_refuses_them(fashion_root, tmp_path):
    from spottune.data.sources import materialise

    src = real_tree(fashion_root, tmp_path / "src", ODD_LABELS, train=2, test=1)
    counts = materialise(str(src), tmp_path / "out", log=lambda _: None)
    card = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert card["classes"] == sorted(["my_class", "caf", "it_s_quoted", "touch_pwned_id_x_y", "rf", "hidden", "a_b_c"])
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == card["classes"]
    assert counts == {"train": 14, "test": 7}

    for bad, words in (({"日本語": "bag"}, "日本語"), ({"...": "bag"}, "'...'"),
                       ({"A b": "bag", "a_B": "coat"}, "would merge")):
        src = real_tree(fashion_root, tmp_path / f"bad-{uuid.uuid4().hex[:6]}", bad, train=1, test=1)
        out = tmp_path / f"out-{src.name}"
        with pytest.raises(DataError, match=words):
            materialise(str(src), out, log=lambda _: None)
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.slow
def test_odd_label_names_survive_prepare_validate_and_training(capsys, fashion_root, tmp_path, monkeypatch):
    """A tree used as it is (no `spottune data`): the labels pass through the CSV manifest, GX, the loaders
    and the model card unchanged, and no label is ever run by a shell."""
    from spottune.settings import RuntimeSettings
    from spottune.training import fit

    monkeypatch.chdir(tmp_path)
    root = real_tree(fashion_root, tmp_path / "data", ODD_LABELS, train=4, test=2)
    params = params_file(tmp_path, root, validate={"classes": list(ODD_LABELS)})
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    code, text = cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")
    assert code == 0 and "passed" in text, text
    p = load_params(params, [f"data.manifest={tmp_path / 'prepared' / 'manifest.csv'}"])
    fit(p, tmp_path / "run", RuntimeSettings(device="cpu", progress=False), log=lambda _: None)
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["classes"] == sorted(ODD_LABELS)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["test"]["per_class_accuracy"]) == len(ODD_LABELS) and metrics["test"]["images"] == 2 * len(ODD_LABELS)
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


# ---------------------------------------------------------------------------------------------
# Empty datasets


def test_an_empty_data_directory_is_refused_and_nothing_is_written(capsys, tmp_path):
    from spottune.config import DataParams
    from spottune.data.loaders import build_datasets
    from spottune.data.sources import materialise

    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in FASHION:
            (root / split / label).mkdir(parents=True)
    (root / "train" / "bag" / "README.txt").write_text("images go here\n")
    params = params_file(tmp_path, root)
    code, text = cli(capsys, "prepare", "--params", params)
    assert code == 3 and "no image files" in text and str(root) in text, text
    assert not (tmp_path / "prepared").exists()
    with pytest.raises(DataError, match="no image files"):
        materialise(str(root), tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(DataError, match="train"):
        build_datasets(DataParams(root=root, image_size=32), seed=0)


def snapshot_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_data_overwrite_refuses_a_source_inside_the_output_or_an_output_inside_the_source(fashion_root, tmp_path):
    """`spottune data SRC --out OUT --overwrite` removed OUT as a whole: with SRC inside OUT that deleted the
    source and everything beside it. Refused before anything is deleted or written, as is OUT inside SRC."""
    work = tmp_path / "work"
    src = real_tree(fashion_root, work / "incoming", {c: c for c in FASHION}, train=2, test=1)
    (work / "notes.txt").write_text("unrelated, must survive\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link-to-work").symlink_to(work)
    cases = [(src, work), (src, tmp_path / "link-to-work"), (src, src), (work, work / "incoming" / "copy"),
             (work, work / "new" / "deeper"), (tmp_path / "work.partial", work)]
    (tmp_path / "work.partial").mkdir()
    shutil.copytree(src / "train", tmp_path / "work.partial" / "train")
    before = snapshot_tree(tmp_path)
    for source, out in cases:
        r = subprocess.run([sys.executable, "-m", "spottune.cli", "data", str(source), "--out", str(out), "--overwrite"],
                           cwd=tmp_path / "elsewhere", env=clean_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 3 and "inside" in r.stderr and "nothing was written or deleted" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert snapshot_tree(tmp_path) == before, (source, out)
        assert not (work / "new").exists() and not list(tmp_path.rglob("*.partial/dataset.json"))
    assert cli_ok(["data", str(src), "--out", str(tmp_path / "elsewhere" / "copy"), "--overwrite"], tmp_path)


def cli_ok(argv: list[str], cwd: Path) -> bool:
    r = subprocess.run([sys.executable, "-m", "spottune.cli", *argv], cwd=cwd, env=clean_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return True


@pytest.mark.slow
def test_data_from_class_folders_alone_gets_seeded_test_and_val_splits_and_trains(capsys, fashion_root, tmp_path):
    """`spottune data DIR` with DIR/CLASS/* (no train/ or test/): the dataset holds train/ only, and prepare
    gave 0 test images, validate failed and training said 'no test images'. prepare now carves test
    (prepare.test_fraction) and val (prepare.val_fraction) per class from train/, seeded."""
    src = tmp_path / "photos"
    for c in FASHION:
        (src / c).mkdir(parents=True)
        for f in sorted((fashion_root / "train" / c).glob("*.png"))[:10]:
            shutil.copyfile(f, src / c / f.name)
    out = tmp_path / "data" / "photos"
    code, text = cli(capsys, "data", src, "--out", out)
    assert code == 0, text
    params = params_file(tmp_path, out, prepare={"test_fraction": 0.2, "val_fraction": 0.25, "seed": 3})
    code, text = cli(capsys, "prepare", "--params", params)
    assert code == 0 and "8 test" in text, text
    manifest = tmp_path / "prepared" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    per_split = {s: {c: sum(1 for r in rows if r["split"] == s and r["label"] == c) for c in FASHION}
                 for s in ("train", "val", "test")}
    assert per_split == {"train": dict.fromkeys(FASHION, 6), "val": dict.fromkeys(FASHION, 2),
                         "test": dict.fromkeys(FASHION, 2)}, per_split
    first = manifest.read_bytes()
    assert cli(capsys, "prepare", "--params", params)[0] == 0 and manifest.read_bytes() == first, "seeded"
    (tmp_path / "other").mkdir()
    params_other_seed = params_file(tmp_path / "other", out, prepare={"manifest": str(tmp_path / "other.csv"), "seed": 4,
                                                                       "test_fraction": 0.2, "val_fraction": 0.25})
    assert cli(capsys, "prepare", "--params", params_other_seed)[0] == 0
    assert (tmp_path / "other.csv").read_bytes() != first

    code, text = cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")
    assert code == 0 and "passed" in text, text
    code, text = cli(capsys, "train", "--params", params, "--out", tmp_path / "run", "--set", f"data.manifest={manifest}")
    assert code == 0, text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["images"] == 2 * len(FASHION)


def test_a_split_without_images_fails_validation_and_training_names_it(capsys, tree, tmp_path):
    for f in (tree / "test").rglob("*.png"):
        f.unlink()
    params = params_file(tmp_path, tree)
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    code, text = cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")
    assert code == 3 and all(f"test/{c}" in text for c in FASHION), text
    manifest = tmp_path / "prepared" / "manifest.csv"
    code, text = cli(capsys, "train", "--params", params, "--out", tmp_path / "run", "--set", f"data.manifest={manifest}")
    assert code == 3 and "no test images" in text and str(manifest) in text, text
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------
# Malformed files written by earlier stages: a run's model.json, a manifest


@pytest.mark.parametrize("card", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'{"format": "spottune-model/1"}',
                                  b'{"format": "spottune-model/1", "params": "x", "classes": ["a"]}',
                                  b'{"format": "spottune-model/1", "params": {"model": 3}, "classes": ["a"]}',
                                  b'{"format": "spottune-model/1", "params": {}, "classes": "abc"}', b'{"format": {}}'],
                         ids=["not-json", "not-utf8", "a-list", "no-params", "params-not-a-mapping",
                              "model-not-a-mapping", "classes-not-a-list", "format-not-a-string"])
def test_a_malformed_model_json_is_one_line_naming_it(capsys, tmp_path, card):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"\x00" * 16)
    (run / "model.json").write_bytes(card)
    for command in (["evaluate", run], ["export-backbone", run, "--out", tmp_path / "b.safetensors"]):
        code, text = cli(capsys, *command)
        assert code == 3 and text.startswith(f"error: {run / 'model.json'}") and text.count("\n") == 1, text
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("tamper, words", [
    (lambda lines: lines[:2] + [lines[2].replace(",28,28,", ",wide,28,", 1)] + lines[3:], ["line 3", "width 'wide'"]),
    (lambda lines: lines[:4] + [lines[4].replace(",28,28,L,", ",28,28,L,1.5e3x", 1)] + lines[5:], ["line 5", "bytes"]),
    (lambda lines: lines[:2] + [lines[2].replace("bag", "b\udcffag", 1)] + lines[3:], ["not UTF-8"]),
], ids=["width-not-an-integer", "bytes-not-an-integer", "not-utf8"])
def test_a_manifest_with_a_bad_field_is_one_line_naming_it(capsys, tree, tmp_path, tamper, words):
    params = params_file(tmp_path, tree)
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    manifest = tmp_path / "prepared" / "manifest.csv"
    lines = manifest.read_text().split("\n")
    assert ",28,28,L," in lines[2] and ",28,28,L," in lines[4]
    manifest.write_bytes("\n".join(tamper(lines)).encode("utf-8", "surrogateescape"))
    for command in (["validate", "--params", params, "--out-dir", tmp_path / "report"],
                    ["train", "--params", params, "--out", tmp_path / "run", "--set", f"data.manifest={manifest}"]):
        code, text = cli(capsys, *command)
        assert code == 3 and text.startswith(f"error: {manifest}") and text.count("\n") == 1, text
        assert all(w in text for w in words), text
    assert not (tmp_path / "run").exists() and not (tmp_path / "report").exists()


# ---------------------------------------------------------------------------------------------
# Output paths: a directory where a file is expected, long names


@pytest.mark.slow
def test_output_paths_that_cannot_be_written_fail_before_any_work_and_long_valid_names_work(capsys, tree, tmp_path):
    """An existing directory given where a file is expected (or a file where a directory is), or a name over
    the file system's limit, is refused in one line before any work; a 240-character name (valid) works:
    its temporary name used to exceed the limit and fail with a traceback after the work was done."""
    params = params_file(tmp_path, tree)
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    a_dir, a_file = tmp_path / "a-dir", tmp_path / "a-file"
    a_dir.mkdir()
    a_file.write_text("keep\n")
    long_name, too_long = "m" * 235 + ".json", "m" * 300 + ".json"

    def refused(*args: Any, words: str) -> None:
        code, text = cli(capsys, *args)
        assert code == 3 and text.startswith("error: ") and text.count("\n") == 1 and words in text, text
        assert "Traceback" not in text

    validate = ("validate", "--params", params)
    refused(*validate, "--out-dir", tmp_path / "report", "--metrics", a_dir, words=f"--metrics {a_dir} is a directory")
    refused(*validate, "--out-dir", a_file, words=f"--out-dir {a_file} is a regular file, not a directory")
    refused(*validate, "--out-dir", tmp_path / "report", "--metrics", tmp_path / too_long, words="over the file system's limit")
    refused(*validate, "--out-dir", tmp_path / too_long / "x", words="--out-dir")
    refused(*validate, "--out-dir", tmp_path / "report", "--metrics", a_file / "m.json", words=f"{a_file} is not a directory")
    assert not (tmp_path / "report").exists() and a_file.read_text() == "keep\n"
    code, text = cli(capsys, *validate, "--out-dir", tmp_path / "report", "--metrics", tmp_path / long_name)
    assert code == 0 and json.loads((tmp_path / long_name).read_text())["success"], text

    run = tmp_path / "run"
    refused("train", "--params", params, "--out", run, "--plots", a_dir, words="--plots")
    assert not run.exists()
    code, text = cli(capsys, "train", "--params", params, "--out", run, "--metrics", tmp_path / ("t" * 235 + ".json"),
                     "--set", f"data.manifest={tmp_path / 'prepared' / 'manifest.csv'}")
    assert code == 0 and (tmp_path / ("t" * 235 + ".json")).is_file(), text
    refused("train", "--params", params, "--out", a_file, words=f"--out {a_file} is a regular file, not a directory")
    refused("evaluate", run, "--out", a_dir, words=f"--out {a_dir} is a directory")
    refused("export-backbone", run, "--out", a_dir, words=f"--out {a_dir} is a directory")
    refused("compare", run, run, "--report", a_dir, words=f"--report {a_dir} is a directory")
    refused("compare", run, run, "--json", tmp_path / too_long, words="--json")
    code, text = cli(capsys, "compare", run, run, "--report", tmp_path / ("r" * 237 + ".md"))
    assert code == 0 and (tmp_path / ("r" * 237 + ".md")).read_text().startswith("#"), text
    assert sorted(p.name for p in a_dir.iterdir()) == [] and not list(tmp_path.glob(".*tmp*"))


def special_files(tmp_path: Path) -> dict[str, Path]:
    """A directory, a FIFO and (as root) a character device like /dev/null, each a would-be manifest path."""
    import os
    import stat as stat_

    made = {"directory": tmp_path / "as-dir.csv", "FIFO": tmp_path / "as-fifo.csv"}
    made["directory"].mkdir()
    os.mkfifo(made["FIFO"])
    if os.geteuid() == 0:
        made["character device"] = tmp_path / "null"
        os.mknod(made["character device"], stat_.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    return made


def test_prepare_refuses_a_manifest_path_that_is_not_a_regular_file(capsys, tree, tmp_path):
    """`--set prepare.manifest=/dev/null` as root replaced /dev/null with a regular file (rename over it).
    Here on a device node of our own, a FIFO and a directory: refused, left as they were, no *.tmp."""
    import stat as stat_

    params = params_file(tmp_path, tree)
    for kind, path in special_files(tmp_path).items():
        before = path.lstat()
        code, text = cli(capsys, "prepare", "--params", params, "--set", f"prepare.manifest={path}")
        assert code == 3 and f"prepare.manifest {path} is a{'n' if kind[0] in 'aeiou' else ''} {kind}" in text, text
        assert text.count("\n") == 1, text
        after = path.lstat()
        assert stat_.S_IFMT(after.st_mode) == stat_.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*/*.tmp"))
    from spottune.config import PrepareParams
    from spottune.data.manifest import build_manifest, write_manifest

    with pytest.raises(ConfigError, match="FIFO"):
        write_manifest(build_manifest(tree, PrepareParams()), tmp_path / "as-fifo.csv")


def test_a_file_name_that_is_not_utf8_is_named_and_leaves_no_temporary_file(capsys, tree, tmp_path):
    import os

    bad = tree / "train" / "bag" / os.fsdecode(b"photo-\xff\xfe.png")
    shutil.copyfile(next((tree / "train" / "bag").glob("*.png")), bad)
    params = params_file(tmp_path, tree)
    code, text = cli(capsys, "prepare", "--params", params)
    assert code == 3 and "not UTF-8" in text and "photo-\\udcff\\udcfe.png" in text and text.count("\n") == 1, text
    assert not (tmp_path / "prepared" / "manifest.csv").exists()
    assert not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*.tmp"))

    from spottune.data.manifest import ManifestRow, write_manifest

    rows = [ManifestRow(f"train/bag/{bad.name}", "bag", "train", 28, 28, "L", 10, "0" * 64)]
    with pytest.raises(DataError, match="not UTF-8"):
        write_manifest(rows, tmp_path / "direct" / "manifest.csv")
    assert list((tmp_path / "direct").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# params.yaml and --set fuzzing: a Params or a ConfigError naming the key, never anything else

SECTIONS = {(f.alias or n): sorted(type(getattr(Params(), n)).model_fields) for n, f in Params.model_fields.items()}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["imagenet", "none", "resnet26", "spottune", "cosine", "-1", "1e400", "s3://b/x",
                                     "http://u:p@h", "\x00", "a" * 5000, "..", "~", "/", "2001-13-45"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4), max_leaves=12)


@st.composite
def params_docs(draw) -> dict[Any, Any]:
    """Mostly real section and key names (so values reach the validators), sometimes anything."""
    doc: dict[Any, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=8), max_size=4)):
        if draw(st.integers(0, 9)) == 0:
            doc[section] = draw(values)
            continue
        keys = draw(st.lists(st.sampled_from(SECTIONS.get(section) or ["x"]) | st.text(max_size=8), max_size=4))
        doc[section] = {k: draw(values) for k in keys}
    return doc


def printable(key: str) -> str:
    if key != key.strip() or not key:
        return repr(key)
    return key if key.isprintable() else key.encode("unicode_escape").decode()


def _dotted_keys(doc: Any, prefix: str = "") -> set[str]:
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    out = set()
    for k, v in items:
        key = f"{prefix}{k}"
        out |= {key} | _dotted_keys(v, key + ".")
    return out


def assert_names_a_key(message: str, doc: dict[Any, Any]) -> None:
    """Every error line names a key of the document (validate_ is accepted for validate)."""
    lines = message.split("\n")
    assert lines[0].startswith("invalid parameters in "), message
    keys = {printable(k) for k in _dotted_keys(doc)} | {"(top level)"}
    for line in lines[1:]:
        assert any(line.strip().startswith(f"{k}: ") or line.strip().startswith(f"{k}.") for k in keys), (line, message)
    assert len(message) < 20_000, "a message a person can read"


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params_docs())
@example({" ": None})  # found by the fuzzer: the message named a key nobody could see
@example({"optim": {"epochs ": 2}})
def test_any_params_structure_gives_params_or_a_config_error_naming_the_key(doc):
    try:
        validate_params(doc, "params.yaml")
    except ConfigError as e:
        assert_names_a_key(str(e), doc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=200), params_docs().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
                 st.sampled_from(["optim: {epochs: !!int x}", "data: {root: 2001-02-30}", "- a", "a: [", "\x00"])))
@pytest.mark.slow
def test_any_params_file_gives_params_or_a_config_error_naming_the_file(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    try:
        assert isinstance(load_params(path), Params)
    except ConfigError as e:
        assert str(path) in str(e), str(e)


dotted = st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]) | st.text(max_size=20).filter(lambda k: "=" not in k)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(dotted, st.sampled_from(["=", "", "=="]), st.text(max_size=30)
                          | st.sampled_from(["[1, 2", "{a: ", "!!python/object:os.system ls", "&a [*a]", "'", "1e999",
                                            "2001-13-45", "!!int x", "!!bool x", "!!float x"])),
                max_size=4))
def test_any_set_override_gives_params_or_a_config_error_naming_it(pairs):
    overrides = [f"{k}{sep}{v}" for k, sep, v in pairs]
    try:
        load_params(None, overrides)
    except ConfigError as e:
        message = str(e)
        # The key is what precedes the first '=' of the pair (a generated value may hold one too).
        assert any(printable(pair.partition("=")[0].split(".")[0]) in message or repr(pair)[:100] in message
                   for pair in overrides), message


@pytest.mark.parametrize("pair,culprit", [("optim.epochs=[1, 2", "optim.epochs"), ("data.image_size={a: ", "data.image_size"),
                                          ("optim.lr_net=!!python/object/apply:os.system [ls]", "optim.lr_net"),
                                          ("model.weights=" + "w" * 5000, "model")])
def test_cli_set_with_a_broken_value_exits_3_naming_the_key(capsys, tmp_path, pair, culprit):
    code, text = cli(capsys, "train", "--out", tmp_path / "run", "--set", pair)
    assert code == 3 and culprit in text and "Traceback" not in text and len(text) < 2_000, text
    assert not (tmp_path / "run").exists()


def alias_bomb(levels: int = 10) -> str:
    """A params.yaml of a few hundred bytes whose data.root expands to 10**levels strings ('billion laughs')."""
    lines = ["bomb:", '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\ndata:\n  root: *l{levels - 1}\n"


def test_a_yaml_alias_bomb_in_params_is_refused_in_seconds_naming_the_file(tmp_path):
    """Before: pydantic's error held the value and its repr was built in full before being cut: minutes,
    then MemoryError. Anchors and aliases are refused as the file is read."""
    path = tmp_path / "params.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 1_000
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "spottune.cli", "prepare", "--params", str(path)], cwd=tmp_path,
                       env=clean_env(), capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and str(path) in r.stderr, r.stderr
    assert "aliases are not allowed" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "prepared").exists()
    with pytest.raises(ConfigError, match="anchor &a at line 1"):
        load_params(None, ["optim.epochs=&a 3"])


@pytest.mark.parametrize("seed", ["99999999999999999999999", pytest.param(str(2**63), marks=pytest.mark.slow),
                                  str(-(2**63) - 1)])
def test_an_out_of_range_seed_is_refused_naming_the_key_and_the_extremes_train(capsys, tree, tmp_path, seed):
    """torch's generators take 64-bit seeds: optim.seed=99999999999999999999999 was accepted, then training
    died with a traceback ('Overflow when unpacking long'). Refused before any work; both extremes train."""
    params = params_file(tmp_path, tree, data={"manifest": None, "val_fraction": 0.25})
    code, text = cli(capsys, "train", "--params", params, "--out", tmp_path / "run", "--set", f"optim.seed={seed}")
    assert code == 3 and "optim.seed" in text and "Traceback" not in text and not (tmp_path / "run").exists(), text
    for extreme in (2**63 - 1, -(2**63)) if seed == str(2**63) else ():
        code, text = cli(capsys, "train", "--params", params, "--out", tmp_path / f"run{extreme}",
                         "--set", f"optim.seed={extreme}")
        assert code == 0 and (tmp_path / f"run{extreme}" / "model.safetensors").is_file(), text


def test_flow_command_line_set_with_a_broken_value_exits_3_naming_the_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.retrain", "--project-dir", str(tmp_path), "--set", "optim.epochs=[1, 2"],
                       cwd=PROJECT, env=clean_env(PREFECT_HOME=str(tmp_path / "prefect")), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3 and "optim.epochs" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "params.yaml").exists()


# ---------------------------------------------------------------------------------------------
# Wrong bucket, endpoint or credentials: the artifact store and the DVC remote

PLANTED_KEY = f"AKIAPLANTED{uuid.uuid4().hex[:9].upper()}"
PLANTED_SECRET = f"planted-secret-{uuid.uuid4().hex}"
PLANTED_TOKEN = f"planted-token-{uuid.uuid4().hex}"
PLANTED = (PLANTED_KEY, PLANTED_SECRET, PLANTED_TOKEN)


def planted_credentials(tmp_path: Path) -> dict[str, str]:
    """Distinctive credentials in boto3's standard chain (and nowhere else: no profile, no instance role)."""
    return {"AWS_ACCESS_KEY_ID": PLANTED_KEY, "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET, "AWS_SESSION_TOKEN": PLANTED_TOKEN,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"), "AWS_DEFAULT_REGION": "us-east-1"}


def leaks(data: bytes | str) -> list[str]:
    blob = data.encode(errors="replace") if isinstance(data, str) else data
    return [s for s in PLANTED if s.encode() in blob]


@pytest.fixture(scope="module")
def moto_servers(tmp_path_factory) -> Iterator[tuple[MotoServer, MotoServer]]:
    """(open, strict): moto accepting any credentials, and one that checks them (so planted ones are wrong)."""
    logs = tmp_path_factory.mktemp("moto")
    servers = [MotoServer(logs / "open.log"), MotoServer(logs / "strict.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})]
    yield servers[0], servers[1]
    for s in servers:
        s.stop()


def bad_store_cases(moto_servers) -> dict[str, tuple[dict[str, str], list[str]]]:
    """case -> (SPOTTUNE_* store variables, words the error must hold)."""
    open_, strict = moto_servers
    closed = f"http://127.0.0.1:{free_port()}"
    return {
        "missing bucket": ({"SPOTTUNE_S3_BUCKET": "no-such-bucket", "SPOTTUNE_S3_ENDPOINT_URL": open_.url},
                           ["'no-such-bucket' does not exist", open_.url]),
        "closed endpoint": ({"SPOTTUNE_S3_BUCKET": "models", "SPOTTUNE_S3_ENDPOINT_URL": closed},
                            [f"endpoint {closed} is unreachable", "'models'"]),
        "wrong credentials": ({"SPOTTUNE_S3_BUCKET": "models", "SPOTTUNE_S3_ENDPOINT_URL": strict.url},
                              ["access denied", "'models'", strict.url]),
    }


@pytest.mark.integration
@pytest.mark.parametrize("case", ["missing bucket", "closed endpoint", "wrong credentials"])
def test_store_misconfiguration_is_one_clear_line_without_secrets(moto_servers, tmp_path, case):
    variables, words = bad_store_cases(moto_servers)[case]
    env = clean_env(**planted_credentials(tmp_path), SPOTTUNE_STORE_BACKEND="s3", SPOTTUNE_S3_MAX_ATTEMPTS="1",
                    **variables)
    for command in (["models", "list", "fashion"], ["promote", "fashion", "v1"]):
        r = subprocess.run([sys.executable, "-m", "spottune.cli", *command], env=env, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
        assert r.returncode == 4 and r.stderr.startswith("error: cannot reach bucket"), r.stderr
        assert all(w in r.stderr for w in words) and "Traceback" not in r.stderr, r.stderr
        assert not leaks(r.stdout + r.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variable", ["SPOTTUNE_S3_ENDPOINT_URL", "SPOTTUNE_REMOTE_ENDPOINT_URL"])
def test_credentials_in_an_endpoint_url_are_refused_without_being_repeated(capsys, monkeypatch, tmp_path, variable):
    """boto3 never reads user:password@ from an endpoint, and the endpoint is logged and written to
    .dvc/config.local: such a URL is refused, and the message does not repeat it."""
    from spottune.store_cli import store_settings

    url = f"http://{PLANTED_KEY}:{PLANTED_SECRET}@127.0.0.1:9"
    monkeypatch.setenv(variable, url)
    monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "s3")
    monkeypatch.setenv("SPOTTUNE_S3_BUCKET", "models")
    with pytest.raises(ConfigError) as err:
        store_settings() if variable.startswith("SPOTTUNE_S3") else RemoteSettings.resolve(Params().remote)
    assert "credentials in the URL" in str(err.value) and "endpoint_url" in str(err.value).lower()
    assert not leaks(str(err.value)), str(err.value)
    if variable == "SPOTTUNE_REMOTE_ENDPOINT_URL":
        repo = new_pipeline_repo(tmp_path / "repo")
        config = (repo / ".dvc" / "config").read_bytes()
        monkeypatch.chdir(repo)
        code, text = cli(capsys, "remote", "--params", repo / "params.yaml")
        assert code == 3 and not leaks(text) and "credentials in the URL" in text, text
        assert (repo / ".dvc" / "config").read_bytes() == config and not (repo / ".dvc" / "config.local").exists()


@pytest.mark.parametrize("region", ["../../x", "us-east-1/../../x", "eu west", "", "x" * 100, "a\nb"])
def test_a_region_of_the_wrong_shape_is_refused_naming_the_variable(capsys, monkeypatch, tmp_path, region):
    """SPOTTUNE_S3_REGION=../../x was accepted (it becomes part of AWS hostnames and signatures) and
    SPOTTUNE_REMOTE_REGION=../../x was written to .dvc/config.local."""
    from spottune.store_cli import store_settings

    monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "s3")
    monkeypatch.setenv("SPOTTUNE_S3_BUCKET", "models")
    monkeypatch.setenv("SPOTTUNE_S3_REGION", region)
    with pytest.raises(ConfigError, match="SPOTTUNE_S3_REGION"):
        store_settings()
    monkeypatch.setenv("SPOTTUNE_REMOTE_REGION", region)
    with pytest.raises(ConfigError, match="region"):
        RemoteSettings.resolve(Params().remote)
    repo = new_pipeline_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("SPOTTUNE_REMOTE_URL", "s3://models/dvcstore")
    code, text = cli(capsys, "remote", "--params", repo / "params.yaml")
    assert code == 3 and "region" in text and not (repo / ".dvc" / "config.local").exists(), text
    for ok in ("us-east-1", "eu-west-1", "default", "zg_1"):
        monkeypatch.setenv("SPOTTUNE_S3_REGION", ok)
        assert store_settings().s3_region == ok


SECRET_IN_URL = f"sk-{uuid.uuid4().hex}"
MALFORMED_ENDPOINTS = [f"http://exa mple.org:9000/{SECRET_IN_URL}", f"http://[::1/{SECRET_IN_URL}",
                       f"http://host:99999/{SECRET_IN_URL}", f"http://host/?X-Amz-Credential={SECRET_IN_URL}",
                       f"https://{SECRET_IN_URL}#frag", f"http://host/{SECRET_IN_URL}\n", f"http://host:{SECRET_IN_URL}"]


@pytest.mark.parametrize("url", MALFORMED_ENDPOINTS, ids=range(len(MALFORMED_ENDPOINTS)))
def test_a_malformed_endpoint_is_refused_without_repeating_it(capsys, monkeypatch, tmp_path, url):
    """botocore's 'Invalid endpoint: <URL>' came as a traceback that printed the whole string; a secret pasted
    into it (a token in the query or path) reached the terminal and the logs."""
    env = clean_env(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", SPOTTUNE_STORE_BACKEND="s3",
                    SPOTTUNE_S3_BUCKET="models", SPOTTUNE_S3_ENDPOINT_URL=url, SPOTTUNE_S3_MAX_ATTEMPTS="1")
    r = subprocess.run([sys.executable, "-m", "spottune.cli", "models", "list", "fashion"], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 3 and "SPOTTUNE_S3_ENDPOINT_URL" in r.stderr and "malformed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and SECRET_IN_URL not in r.stdout + r.stderr, r.stderr
    monkeypatch.setenv("SPOTTUNE_REMOTE_ENDPOINT_URL", url)
    with pytest.raises(ConfigError, match="malformed endpoint URL") as err:
        RemoteSettings.resolve(Params().remote)
    assert SECRET_IN_URL not in str(err.value) and str(err.value).count("\n") == 1, str(err.value)


def test_the_store_never_repeats_an_endpoint_that_botocore_refuses(monkeypatch):
    """Belt and braces below the settings: whatever botocore refuses as an endpoint, the StoreError shows
    scheme and host at most."""
    from spottune.settings import StoreSettings
    from spottune.store import S3Backend

    settings = StoreSettings.model_construct(**{**StoreSettings(store_backend="s3", s3_bucket="models").model_dump(),
                                                "s3_endpoint_url": f"http://exa mple.org/{SECRET_IN_URL}"})
    with pytest.raises(StoreError, match="malformed") as err:
        S3Backend(settings)
    assert SECRET_IN_URL not in str(err.value) and "http://exa" in str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize("case", ["missing bucket", "closed endpoint", "wrong credentials"])
def test_dvc_push_to_a_wrong_remote_names_bucket_and_endpoint(moto_servers, tmp_path, case):
    variables, _ = bad_store_cases(moto_servers)[case]
    bucket, endpoint = variables["SPOTTUNE_S3_BUCKET"], variables["SPOTTUNE_S3_ENDPOINT_URL"]
    repo = new_pipeline_repo(tmp_path / "repo")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = clean_env(**planted_credentials(tmp_path), SPOTTUNE_REMOTE_URL=f"s3://{bucket}/dvcstore",
                    SPOTTUNE_REMOTE_ENDPOINT_URL=endpoint)
    r = subprocess.run([sys.executable, "-m", "spottune.cli", "data", "digits", "--out", "data/digits",
                        "--train-per-class", "2", "--test-per-class", "1", "--push"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr
    assert f"s3://{bucket}/dvcstore at {endpoint}" in r.stderr and "dvc push" in r.stderr, r.stderr
    assert not leaks(r.stdout + r.stderr)
    config = (repo / ".dvc" / "config").read_text() + (repo / ".dvc" / "config.local").read_text()
    assert not leaks(config)


# ---------------------------------------------------------------------------------------------
# Secrets: a whole retrain flow with planted credentials, then every place they could have reached

NAME = "fashion-secrets"
TRAINING = {"optim.max_steps_per_epoch": 1}


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory) -> Path:
    """A git + DVC repository with this project's pipeline and flows on tiny real data (as in test_flow.py)."""
    return tiny_flow_project(tmp_path_factory.mktemp("secrets") / "repo", NAME, per_class=(8, 4), steps_per_epoch=2)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_test_server(home, log_level="INFO") as api:
        from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

        logging.getLogger("prefect").setLevel(logging.INFO)  # when another module set up Prefect's logging first
        yield {"api": api, "home": str(home), "db": PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1]}


@pytest.fixture
def s3_flow_env(moto_servers, monkeypatch, tmp_path) -> dict[str, str]:
    """Planted credentials, the store and the DVC remote on the open moto server, for one flow run."""
    open_ = moto_servers[0]
    env = {**planted_credentials(tmp_path), "SPOTTUNE_STORE_BACKEND": "s3", "SPOTTUNE_S3_BUCKET": new_bucket(open_.url),
           "SPOTTUNE_S3_ENDPOINT_URL": open_.url, "SPOTTUNE_STORE_PREFIX": "team", "SPOTTUNE_S3_MAX_ATTEMPTS": "1",
           "SPOTTUNE_REMOTE_URL": f"s3://{new_bucket(open_.url)}/dvcstore", "SPOTTUNE_REMOTE_ENDPOINT_URL": open_.url,
           "NO_PROXY": "127.0.0.1", "SPOTTUNE_MODEL_CACHE_DIR": str(tmp_path / "model-cache")}
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def prefect_records(flow_run_id: Any) -> dict[str, str]:
    """What Prefect's API holds about one flow run: parameters, logs, task runs, artifacts (as JSON text)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler):
                handler.flush()  # logs are shipped to the API in the background
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs, offset = [], 0
        while batch := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        offset=offset, limit=200):
            logs += batch
            offset += len(batch)
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        tasks = client.read_task_runs(flow_run_filter=runs)
        artifacts = client.read_artifacts(flow_run_filter=runs)
    return {"parameters": json.dumps(run.parameters), "flow run": run.model_dump_json(),
            "logs": "\n".join(f"{l.name}: {l.message}" for l in logs),
            "task runs": "\n".join(t.model_dump_json() for t in tasks),
            "artifacts": "\n".join(a.model_dump_json() for a in artifacts)}


@pytest.mark.integration
@pytest.mark.parametrize("case, attempts", [("missing bucket", 1), ("wrong credentials", 1), ("closed endpoint", 4)])
def test_flow_checks_the_store_first_retries_only_what_may_recover_and_promotes_nothing(
        flow_project, prefect_server, moto_servers, s3_flow_env, monkeypatch, case, attempts):
    """(Before the secrets test: that one's capfd would leave Prefect's console logging on a closed file.)

    The store is reached before any work: a wrong bucket or credential fails at once (a retry cannot
    fix it), an unreachable endpoint is retried with backoff, then the flow gives up naming it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import flows.retrain as flows_retrain

    variables, words = bad_store_cases(moto_servers)[case]
    good = s3_flow_env["SPOTTUNE_S3_BUCKET"]
    before = snapshot_bucket(moto_servers[0].url, good)
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(flows_retrain, "check_store", flows_retrain.check_store.with_options(retry_delay_seconds=[0.1, 0.2, 0.4]))
    state = flows_retrain.retrain(overrides=TRAINING, project_dir=str(flow_project), return_state=True)
    assert state.is_failed()
    with pytest.raises(StoreError) as err:
        state.result()
    assert all(w in str(err.value) for w in words) and not leaks(str(err.value)), str(err.value)
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [t.name.rsplit("-", 1)[0] for t in tasks] == ["check-store"], "nothing ran before the store was reached"
    assert tasks[0].run_count == attempts
    assert snapshot_bucket(moto_servers[0].url, good) == before, "nothing written to the store"
    assert "no-such-bucket" not in bucket_names(moto_servers[0].url)


@pytest.mark.slow
@pytest.mark.integration
def test_planted_credentials_reach_no_log_file_parameter_artifact_or_object(
        flow_project, prefect_server, moto_servers, s3_flow_env, capfd):
    from flows.retrain import retrain

    state = retrain(overrides=TRAINING, project_dir=str(flow_project), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["promoted"], result["status"]
    console = capfd.readouterr()
    for _ in range(30):
        records = prefect_records(state.state_details.flow_run_id)
        if "data version" in records["logs"]:
            break
        time.sleep(1)
    assert "data version" in records["logs"] and "Running stage 'validate'" in records["logs"], "the flow's logs were captured"
    assert "optim.max_steps_per_epoch" in records["parameters"] and "spottune-retrain-report" in records["artifacts"]

    found: dict[str, list[str]] = {}

    def scan(where: str, data: bytes | str) -> None:
        if hits := leaks(data):
            found[where] = hits

    scan("flow result", json.dumps(result, default=str))
    scan("stdout/stderr", console.out + console.err)
    for what, text in records.items():
        scan(f"prefect {what}", text)
    scanned = 0
    for base in (flow_project, Path(prefect_server["home"])):
        for f in base.rglob("*"):
            if f.is_file() and not f.is_symlink():
                scan(str(f), f.read_bytes())
                scanned += 1
    for suffix in ("", "-wal", "-shm"):  # Prefect's whole database: runs, logs, events, artifacts
        if Path(prefect_server["db"] + suffix).is_file():
            scan(f"prefect database{suffix}", Path(prefect_server["db"] + suffix).read_bytes())
    url = moto_servers[0].url
    store_objects = snapshot_bucket(url, s3_flow_env["SPOTTUNE_S3_BUCKET"])
    dvc_objects = snapshot_bucket(url, s3_flow_env["SPOTTUNE_REMOTE_URL"][5:].split("/")[0])
    for key, data in {**store_objects, **dvc_objects}.items():
        scan(f"s3 {key}", data)

    assert any(k.endswith("/report.md") for k in store_objects) and any(k.endswith("production.json") for k in store_objects)
    assert len(dvc_objects) >= 80 and scanned > 100 and Path(prefect_server["db"]).is_file()
    assert (flow_project / ".dvc" / "config.local").read_text().count(url) == 1
    assert found == {}, f"planted credentials found in: {found}"

"""The manifest and the data contract on real Fashion-MNIST files, broken one way at a time.

Runs the `spottune prepare` and `spottune validate` commands in-process (one GX import for the
module) and checks the exit code and that the message names the failed check and the files.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spottune.config import PrepareParams
from spottune.data.manifest import COLUMNS, build_manifest, read_manifest

from support import PROJECT, cli


def _params_file(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        f"data:\n  root: {root}\nprepare:\n  manifest: {tmp_path / 'prepared' / 'manifest.csv'}\n"
        "validate:\n  min_images_per_class: 2\n  min_rows: 10\n"
    )
    return path


def prepare_and_validate(capsys, tmp_path: Path, root: Path) -> tuple[int, str]:
    params = _params_file(tmp_path, root)
    code, text = cli(capsys, "prepare", "--params", params)
    assert code == 0, text
    return cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")


@pytest.fixture
def root(fashion_root, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(fashion_root, copy)
    return copy


def test_manifest_lists_every_image_with_seeded_stratified_splits(root):
    rows = build_manifest(root, PrepareParams(val_fraction=0.25, seed=3))
    assert len(rows) == 600 and len({r.path for r in rows}) == 600
    per = {(s, c): 0 for s in ("train", "val", "test") for c in {r.label for r in rows}}
    for r in rows:
        per[(r.split, r.label)] += 1
        assert (r.width, r.height, r.mode) == (28, 28, "L") and r.bytes == (root / r.path).stat().st_size > 0
    assert {n for (s, _), n in per.items() if s == "val"} == {10}  # 25% of 40, every class
    assert {n for (s, _), n in per.items() if s == "train"} == {30}
    assert all(r.path.startswith("test/") for r in rows if r.split == "test")
    again = build_manifest(root, PrepareParams(val_fraction=0.25, seed=3))
    other = build_manifest(root, PrepareParams(val_fraction=0.25, seed=4))
    assert again == rows and [r.split for r in other] != [r.split for r in rows]


def test_pool_without_split_folders_is_carved_into_three_splits(root, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(root / "train", pool)
    rows = build_manifest(pool, PrepareParams(val_fraction=0.25, test_fraction=0.5, seed=0))
    counts = {s: sum(r.split == s for r in rows) for s in ("train", "val", "test")}
    assert counts == {"test": 200, "val": 50, "train": 150}


def test_clean_dataset_passes_and_writes_reports(capsys, root, tmp_path):
    code, text = prepare_and_validate(capsys, tmp_path, root)
    assert code == 0 and "passed" in text, text
    with open(tmp_path / "prepared" / "manifest.csv") as f:
        assert tuple(csv.DictReader(f).fieldnames) == COLUMNS
    result = json.loads((tmp_path / "report" / "result.json").read_text())
    assert result["success"] and result["statistics"]["rows"] == 600
    assert result["statistics"]["expectations"] >= 15
    assert "PASSED" in (tmp_path / "report" / "report.html").read_text()


def _corrupt(root: Path) -> list[str]:
    f = next((root / "train" / "bag").glob("*.png"))
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return [f.name, "file_decodes"]


def _truncated(root: Path) -> list[str]:
    f = next((root / "train" / "coat").glob("*.png"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return [f.name, "file_decodes"]


def _zero_byte(root: Path) -> list[str]:
    f = next((root / "test" / "dress").glob("*.png"))
    f.write_bytes(b"")
    return [f.name, "file_not_empty"]


def _duplicate_across_splits(root: Path) -> list[str]:
    src = next((root / "train" / "sandal").glob("*.png"))
    shutil.copyfile(src, root / "test" / "sandal" / "copy-of-train.png")
    return [src.name, "copy-of-train.png", "across splits", "expect_column_values_to_be_unique(column=sha256)"]


def _empty_class(root: Path) -> list[str]:
    for f in (root / "test" / "shirt").iterdir():
        f.unlink()
    return ["test/shirt", "expect_column_values_to_be_between(column=images"]


def _unexpected_label(root: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "train" / "zebra").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / "train" / "zebra" / f"z{i}.png")
    return ["zebra", "z0.png", "expect_column_values_to_be_in_set(column=label"]


def _oversized(root: Path) -> list[str]:
    from PIL import Image

    f = next((root / "train" / "trouser").glob("*.png"))
    Image.new("L", (4500, 4500), 7).save(f)  # 20 Mpx > max_pixels, 4500 > max_side; a few KB on disk
    return [f.name, "pixels_within_limit", "4500x4500", "expect_column_values_to_be_between(column=width"]


@pytest.mark.parametrize("breakage", [_corrupt, _truncated, _zero_byte, _duplicate_across_splits, _empty_class,
                                      _unexpected_label, _oversized])
def test_bad_data_fails_naming_the_check_and_the_files(capsys, root, tmp_path, breakage):
    expected = breakage(root)
    code, text = prepare_and_validate(capsys, tmp_path, root)
    assert code == 3, text
    assert "data validation failed" in text and "Traceback" not in text
    for words in expected:
        assert words in text, f"{words!r} not in:\n{text}"
    result = json.loads((tmp_path / "report" / "result.json").read_text())
    assert not result["success"] and result["failures"]
    assert "FAILED" in (tmp_path / "report" / "report.html").read_text()


def test_labels_come_from_params_when_given(capsys, root, tmp_path):
    params = _params_file(tmp_path, root)
    params.write_text(params.read_text() + "  classes: [bag, coat]\n")
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    code, text = cli(capsys, "validate", "--params", params, "--out-dir", tmp_path / "report")
    assert code == 3 and "unexpected label(s)" in text and "trouser" in text


def test_manifest_with_wrong_columns_is_named(tmp_path):
    from spottune.errors import DataError

    bad = tmp_path / "m.csv"
    bad.write_text("path,label\nx.png,a\n")
    with pytest.raises(DataError, match="m.csv"):
        read_manifest(bad)


def test_reports_are_replaced_whole_never_written_through_a_link(capsys, root, tmp_path):
    """Reports are written atomically (temporary name, rename), as every other output: a report file that is a
    hard link into a cache (DVC's `hardlink` cache type links outputs so) is replaced, the cached bytes are
    left alone. Before, `write_text` truncated and rewrote the shared inode: the cache's copy changed too."""
    report = tmp_path / "report"
    report.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("result.json", "summary.json", "report.html"):
        (cache / name).write_text("cached bytes of an earlier validation\n")
        (report / name).hardlink_to(cache / name)
    metrics = tmp_path / "metrics" / "validation.json"
    metrics.parent.mkdir()
    (cache / "metrics.json").write_text("cached metrics\n")
    metrics.hardlink_to(cache / "metrics.json")
    params = _params_file(tmp_path, root)
    assert cli(capsys, "prepare", "--params", params)[0] == 0
    code, text = cli(capsys, "validate", "--params", params, "--out-dir", report, "--metrics", metrics)
    assert code == 0, text
    for name in ("result.json", "summary.json", "report.html"):
        assert (cache / name).read_text() == "cached bytes of an earlier validation\n", name
        assert (report / name).stat().st_nlink == 1 and "cached bytes" not in (report / name).read_text()
    assert (cache / "metrics.json").read_text() == "cached metrics\n"
    assert json.loads(metrics.read_text())["success"] == 1
    assert sorted(p.name for p in report.iterdir()) == ["data_docs", "report.html", "result.json", "summary.json"]


def _page_text(path: Path) -> str:
    """A Data Docs page as a reader sees it: tags, scripts and styles stripped, whitespace collapsed."""
    import re

    text = re.sub(r"<(script|style).*?</\1>", " ", path.read_text(), flags=re.DOTALL)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def _description(suite: str, kind: str, column: str) -> str:
    """An expectation's description, as the committed suite gx/expectations/SUITE.json holds it."""
    saved = json.loads((PROJECT / "gx" / "expectations" / f"{suite}.json").read_text())
    return next(e["description"] for e in saved["expectations"] if e["type"] == kind and e["kwargs"].get("column") == column)


def _tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_docs_name_the_failed_expectation_and_the_files(capsys, root, tmp_path):
    """The stage runs the committed checkpoints; their Data Docs site lands whole in the report folder, its
    validation page marks the run failed and shows the failed expectation with the offending files, and the
    committed GX project is left as it was (the checkpoints ran in a copy, removed afterwards)."""
    committed = _tree_digest(PROJECT / "gx")
    _duplicate_across_splits(root)
    code, text = prepare_and_validate(capsys, tmp_path, root)
    assert code == 3 and "data_docs/index.html" in text, text
    docs = tmp_path / "report" / "data_docs"
    pages = sorted((docs / "validations" / "manifest").rglob("*.html"))
    assert len(pages) == 1 and (docs / "index.html").is_file()
    assert str(pages[0].relative_to(docs)) in (docs / "index.html").read_text()  # the index links the run
    page = _page_text(pages[0])
    assert "Status: Failed" in page
    assert _description("manifest", "expect_column_values_to_be_unique", "sha256") in page
    assert "copy-of-train.png" in page
    counts = _page_text(next((docs / "validations" / "class_counts").rglob("*.html")))
    assert "Status: Succeeded" in counts
    assert _tree_digest(PROJECT / "gx") == committed
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["data_docs", "report.html", "result.json", "summary.json"]
    assert not list(tmp_path.glob(".*gx-run-*"))


def test_clean_dataset_data_docs_show_every_checkpoint_passed(capsys, root, tmp_path):
    code, text = prepare_and_validate(capsys, tmp_path, root)
    assert code == 0, text
    docs = tmp_path / "report" / "data_docs"
    for suite in ("manifest", "class_counts"):
        (page,) = (docs / "validations" / suite).rglob("*.html")
        assert "Status: Succeeded" in _page_text(page), suite
    assert 'href="data_docs/index.html"' in (tmp_path / "report" / "report.html").read_text()


def test_committed_checkpoint_fails_bad_data_through_gx_public_api(tmp_path):
    """What a GX user types against the project's gx/ folder: its checkpoint fails a manifest with a label
    outside the class set and passes the same table once the label is allowed."""
    import great_expectations as gx
    import pandas as pd

    from spottune.config import ValidateParams
    from spottune.data.validation import copy_gx_project, suite_parameters

    copy_gx_project(PROJECT, tmp_path)
    context = gx.get_context(mode="file", project_root_dir=str(tmp_path))
    checkpoint = context.checkpoints.get("manifest")
    rows = [{"path": f"train/{c}/{i}.png", "label": c, "split": "train", "width": 28, "height": 28, "mode": "L",
             "bytes": 100, "sha256": f"{i:064x}"} for i, c in enumerate(["cat", "dog", "zebra"])]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    params = ValidateParams(min_rows=1)
    failed = checkpoint.run(batch_parameters={"dataframe": df}, expectation_parameters=suite_parameters(params, ["cat", "dog"]))
    assert not failed.success
    (result,) = failed.run_results.values()
    bad = [(r.expectation_config.type, r.expectation_config.kwargs.get("column")) for r in result.results if not r.success]
    assert bad == [("expect_column_values_to_be_in_set", "label")]
    passed = checkpoint.run(batch_parameters={"dataframe": df},
                            expectation_parameters=suite_parameters(params, ["cat", "dog", "zebra"]))
    assert passed.success


def test_manifest_suite_expects_the_manifest_columns():
    saved = json.loads((PROJECT / "gx" / "expectations" / "manifest.json").read_text())
    (columns,) = [e["kwargs"]["column_list"] for e in saved["expectations"] if e["type"] == "expect_table_columns_to_match_ordered_list"]
    assert tuple(columns) == COLUMNS

"""The project's DVC files under real dvc in temporary git repositories, without training: the validate stage
through the GX checkpoints."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from support import dvc, git_pipeline_repo, requires, set_params, sh

requires("dvc")
pytestmark = pytest.mark.integration  # real dvc in a temporary git repository


@pytest.mark.slow
def test_validate_stage_runs_the_checkpoints_and_fails_on_bad_data(tmp_path):
    repo = git_pipeline_repo(tmp_path / "repo")
    sh(sys.executable, "-m", "spottune.cli", "data", "fashion-mnist", "--out", "data/fashion-mnist",
       "--train-per-class", "8", "--test-per-class", "4", "--track", cwd=repo)
    set_params(repo, prepare={"val_fraction": 0.25}, validate={"min_images_per_class": 2, "min_rows": 10})
    sh("git", "add", ".", cwd=repo)
    sh("git", "commit", "-q", "-m", "tiny data", cwd=repo)

    dvc("repro", "validate", cwd=repo)
    assert json.loads((repo / "metrics" / "validate.json").read_text())["success"] == 1
    docs = repo / "reports" / "validation" / "data_docs"
    assert (docs / "index.html").is_file() and len(list((docs / "validations").rglob("*.html"))) == 2
    assert "/data_docs" in (repo / "reports" / "validation" / ".gitignore").read_text()  # a DVC output
    assert not (repo / "gx" / "uncommitted").exists()  # the committed GX project is not written to

    sandal = min((repo / "data" / "fashion-mnist" / "train" / "sandal").glob("*.png"))
    shutil.copyfile(sandal, repo / "data" / "fashion-mnist" / "test" / "sandal" / "leaked.png")
    failed = dvc("repro", "validate", cwd=repo, ok=False)
    assert failed.returncode != 0
    out = failed.stdout + failed.stderr
    assert "expect_column_values_to_be_unique(column=sha256)" in out and "leaked.png" in out, out
    assert "Traceback" not in out
    assert not list((repo / "reports" / "validation").glob(".gx-run-*"))  # no scratch copy left behind


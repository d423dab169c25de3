"""`spottune reproduce` for real: a temporary git repository with this project's pipeline, tiny real data
versioned with DVC, a real `dvc repro` (12 train / 6 test images per class, 32 px, 2 steps, one
thread), `spottune publish` into a local store, then a reproduction in a git worktree at another
thread count than this machine's default, and one of a version whose record does not match its run.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dvc")
pytestmark = pytest.mark.slow

from support import clean_env, new_pipeline_repo, set_params

NAME = "fashion-repro"


def sh(*args: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r


def spottune(*args: str, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "spottune.cli", *map(str, args), cwd=cwd, env=env, ok=ok)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The repository after one `dvc repro` on one thread, and the environment of its local store."""
    tmp = tmp_path_factory.mktemp("reproduce")
    env = clean_env(SPOTTUNE_STORE_BACKEND="local", SPOTTUNE_STORE_ROOT=str(tmp / "artifacts"),
                    SPOTTUNE_MODEL_CACHE_DIR=str(tmp / "cache"))
    env.pop("OMP_NUM_THREADS", None)
    repo = new_pipeline_repo(tmp / "repo")
    sh("git", "init", "-q", "-b", "main", cwd=repo, env=env)
    spottune("data", "fashion-mnist", "--out", "data/fashion-mnist", "--train-per-class", "12", "--test-per-class", "6",
             "--track", cwd=repo, env=env)
    set_params(repo, prepare={"val_fraction": 0.25}, validate={"min_images_per_class": 2, "min_rows": 10},
               data={"image_size": 32, "batch_size": 16, "eval_batch_size": 64},
               optim={"epochs": 1, "max_steps_per_epoch": 2})
    sh("git", "add", ".", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "pipeline on a tiny dataset", cwd=repo, env=env)
    sh(sys.executable, "-m", "dvc", "repro", cwd=repo, env={**env, "OMP_NUM_THREADS": "1"})
    return repo, env


def test_a_published_version_records_its_lineage_and_reproduces_exactly(project, tmp_path):
    import importlib.metadata

    repo, env = project
    spottune("publish", "runs/spottune", "--name", NAME, "--candidate-only", cwd=repo, env=env)
    shown = json.loads(spottune("models", "show", f"{NAME}@latest", "--json", cwd=repo, env=env).stdout)
    lineage = shown["lineage"]
    head = sh("git", "rev-parse", "HEAD", cwd=repo, env=env).stdout.strip()
    assert lineage["git_commit"] == head and lineage["git_dirty"] is False  # dvc.lock, metrics/ changed: the pipeline's
    assert lineage["dvc_lock_sha256"] == hashlib.sha256((repo / "dvc.lock").read_bytes()).hexdigest()
    assert lineage["data_version"] == yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert (lineage["threads"], lineage["device"], lineage["run"]) == (1, "cpu", "runs/spottune")
    assert lineage["params"]["optim"]["max_steps_per_epoch"] == 2 and lineage["params"]["gate"]["floor"] == 0.5
    assert lineage["packages"]["torch"] == importlib.metadata.version("torch") and lineage["flow_run"] is None
    assert {"lineage.json", "dvc.lock", "data.dvc"} <= set(shown["files"]) and "git.diff" not in shown["files"]
    assert shown["gate"]["passed"] is False and shown["metrics"]["test"]["accuracy"] is not None

    out = tmp_path / "repro"
    r = spottune("reproduce", f"{NAME}@{shown['version']}", "--out", out, cwd=repo, env=env, ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "match the record" in r.stdout
    assert json.loads((out / "runs" / "spottune" / "metrics.json").read_text())["threads"] == 1
    assert sh("git", "rev-parse", "HEAD", cwd=out, env=env).stdout.strip() == head
    assert (out / "data" / "fashion-mnist").is_dir()


def test_a_dirty_version_is_rebuilt_with_its_diff_and_a_stale_record_is_named(project, tmp_path):
    """The run trained with lr_head 0.5, then params.yaml was put back and a comment added to dvc.yaml: the
    record (params of the checkout, its diff) no longer describes the run, and reproduce says where."""
    repo, env = project
    set_params(repo, optim={"lr_head": 0.5})
    sh(sys.executable, "-m", "dvc", "repro", "train_spottune", cwd=repo, env={**env, "OMP_NUM_THREADS": "1"})
    sh("git", "checkout", "-q", "params.yaml", cwd=repo, env=env)
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text() + "# a local note\n")
    try:
        published = spottune("publish", "runs/spottune", "--name", NAME, "--candidate-only", cwd=repo, env=env).stdout
        assert "uncommitted changes" in published
        version = published.strip().splitlines()[-1].split()[1].rstrip(":")
        shown = json.loads(spottune("models", "show", f"{NAME}@{version}", "--json", cwd=repo, env=env).stdout)
        assert shown["lineage"]["git_dirty"] is True and "git.diff" in shown["files"]
        text = spottune("models", "show", f"{NAME}@{version}", cwd=repo, env=env).stdout
        assert "uncommitted changes (git.diff)" in text and "1 threads" in text

        out = tmp_path / "repro"
        r = spottune("reproduce", f"{NAME}@{version}", "--out", out, cwd=repo, env=env, ok=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "NOT reproduced" in r.stderr and "test.loss" in r.stderr and "model.safetensors" in r.stderr, r.stderr
        assert (out / "dvc.yaml").read_text().endswith("# a local note\n")  # the diff was applied
    finally:
        sh("git", "checkout", "-q", "dvc.yaml", cwd=repo, env=env)

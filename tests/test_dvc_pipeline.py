"""The DVC pipeline for real: a temporary git repository with this project's dvc.yaml and params.yaml,
real `dvc repro` runs, and `dvc push`/`dvc pull` against moto's S3 server as a separate process on
127.0.0.1. Tiny params (12 train / 6 test images per class, 32 px, 2 steps per epoch) keep it short.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import (
    MotoServer,
    clean_env,
    dvc,
    git_pipeline_repo,
    requires,
    s3_client,
    set_params,
    sh,
)

requires("dvc")
pytestmark = pytest.mark.integration  # real dvc in a temporary git repository


def ran(result: subprocess.CompletedProcess) -> set[str]:
    """Stages that `dvc repro` ran (not skipped, not restored from the run cache)."""
    return {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory) -> Path:
    repo = git_pipeline_repo(tmp_path_factory.mktemp("clone") / "repo")
    sh(sys.executable, "-m", "spottune.cli", "data", "fashion-mnist", "--out", "data/fashion-mnist",
       "--train-per-class", "12", "--test-per-class", "6", "--track", cwd=repo)
    assert (repo / "data.dvc").is_file()
    set_params(repo, prepare={"val_fraction": 0.25}, validate={"min_images_per_class": 2, "min_rows": 10},
               data={"image_size": 32, "batch_size": 16, "eval_batch_size": 64},
               optim={"epochs": 2, "max_steps_per_epoch": 2})
    sh("git", "add", ".", cwd=repo)
    sh("git", "commit", "-q", "-m", "pipeline on a tiny dataset", cwd=repo)
    return repo


@pytest.mark.slow
def test_repro_runs_everything_then_nothing_then_only_what_a_param_touches(pipeline_repo):
    repo = pipeline_repo
    first = dvc("repro", cwd=repo)
    assert ran(first) == {"prepare", "validate", "train_finetune", "train_spottune", "compare", "gate"}, first.stdout
    metrics = json.loads((repo / "metrics" / "compare.json").read_text())
    gate = json.loads((repo / "metrics" / "gate.json").read_text())
    assert gate["decision"] in ("promote", "refuse") and gate["rule"] == "non_inferiority" and gate["margin"] == 0.01
    assert gate["vs_baseline"]["ci_low"] == metrics["difference_ci_low"] and gate["champion"]["status"] == "no_store"
    assert not (repo / "artifacts").exists()
    assert {"finetune", "spottune", "difference", "mcnemar_p"} <= set(metrics)
    assert json.loads((repo / "metrics" / "validate.json").read_text())["success"] == 1
    assert metrics["test_images"] == 60
    assert len(json.loads((repo / "plots" / "compare" / "routing.json").read_text())) == 16
    assert [r["epoch"] for r in json.loads((repo / "plots" / "spottune" / "learning_curve.json").read_text())] == [0, 1]
    sh("git", "add", ".", cwd=repo)
    sh("git", "commit", "-q", "-m", "first run", cwd=repo)

    second = dvc("repro", cwd=repo)
    assert ran(second) == set(), second.stdout
    assert dvc("status", cwd=repo).stdout.strip().endswith("Data and pipelines are up to date.")

    set_params(repo, policy={"temperature": 2.0})  # SpotTune only
    third = dvc("repro", cwd=repo)
    assert ran(third) == {"train_spottune", "compare", "gate"}, third.stdout

    set_params(repo, gate={"floor": 1.01})  # the gate's own params rerun the gate alone
    fourth = dvc("repro", cwd=repo)
    assert ran(fourth) == {"gate"}, fourth.stdout
    gate = json.loads((repo / "metrics" / "gate.json").read_text())
    assert gate["decision"] == "refuse" and "< floor 1.0100" in gate["reason"]

    shown = dvc("metrics", "diff", "HEAD", "--json", cwd=repo).stdout
    assert "metrics/spottune.json" in shown
    shown = dvc("metrics", "show", cwd=repo).stdout
    assert "metrics/compare.json" in shown and "test_accuracy" in shown
    assert "metrics/gate.json" in shown and "vs_baseline.ci_low" in shown
    html = repo / "plots_out"
    dvc("plots", "show", "--out", str(html), cwd=repo)
    assert (html / "index.html").is_file() and "val_accuracy" in (html / "index.html").read_text()


@pytest.mark.slow
def test_same_params_give_identical_evaluation_metrics(pipeline_repo):
    repo = pipeline_repo
    sh("git", "checkout", "-q", "params.yaml", cwd=repo)
    dvc("repro", cwd=repo)
    names = ("finetune.json", "spottune.json", "compare.json", "gate.json")
    before = {n: (repo / "metrics" / n).read_text() for n in names}
    again = set()
    for stage in ("train_spottune", "compare", "gate"):  # SpotTune samples routing noise: the stochastic one
        again |= ran(dvc("repro", "--force", "--no-run-cache", "--single-item", stage, cwd=repo))  # really trains again
    assert again == {"train_spottune", "compare", "gate"}
    after = {n: (repo / "metrics" / n).read_text() for n in before}
    assert after == before


@pytest.mark.slow
def test_exp_run_with_a_param_override(pipeline_repo):
    repo = pipeline_repo
    sh("git", "checkout", "-q", ".", cwd=repo)
    r = dvc("exp", "run", "-S", "policy.temperature_min=0.25", cwd=repo)
    assert ran(r) == {"train_spottune", "compare", "gate"}, r.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["policy"]["temperature_min"] == 0.25
    assert "0.25" in dvc("exp", "show", "--csv", cwd=repo).stdout


def test_bad_params_fail_before_any_work(pipeline_repo, tmp_path):
    repo = pipeline_repo
    for section, values, key in (
        ("optim", {"nesterov": True}, "optim.nesterov"),
        ("optim", {"lr_net": -0.5}, "optim.lr_net"),
        ("model", {"backbone": "vgg16"}, "model.backbone"),
    ):
        sh("git", "checkout", "-q", ".", cwd=repo)
        shutil.rmtree(repo / "runs", ignore_errors=True)
        set_params(repo, **{section: values})
        r = dvc("repro", "train_finetune", cwd=repo, ok=False)
        assert r.returncode != 0 and key in r.stdout + r.stderr, r.stdout + r.stderr
        assert not (repo / "runs" / "finetune" / "checkpoint.pt").exists()
    sh("git", "checkout", "-q", ".", cwd=repo)


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3 server as its own process on 127.0.0.1 (real HTTP), stopped afterwards."""
    server = MotoServer(tmp_path / "moto.log")
    yield server.url
    server.stop()


def test_push_then_pull_from_s3_gives_identical_bytes(s3_server, tmp_path):
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket="spottune-data")
    env = clean_env(**creds, SPOTTUNE_REMOTE_URL="s3://spottune-data/dvcstore", SPOTTUNE_REMOTE_ENDPOINT_URL=s3_server)
    repo = git_pipeline_repo(tmp_path / "repo")
    sh(sys.executable, "-m", "spottune.cli", "data", "digits", "--out", "data/digits", "--train-per-class", "5",
       "--test-per-class", "3", "--push", cwd=repo, env=env)
    config = (repo / ".dvc" / "config").read_text() + (repo / ".dvc" / "config.local").read_text()
    assert "s3://spottune-data/dvcstore" in config and s3_server in config and "testing" not in config
    stored = s3.list_objects_v2(Bucket="spottune-data", Prefix="dvcstore/").get("KeyCount", 0)
    assert stored >= 81  # 80 images + the card, plus the directory listing object
    before = tree_digest(repo / "data")

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc("pull", "data.dvc", cwd=repo, env=env)
    assert tree_digest(repo / "data") == before


"""The `spottune` command as a user runs it: real processes, real files, exit codes and messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from support import spottune

TINY = ["--set", "data.image_size=32", "--set", "optim.epochs=1", "--set", "optim.max_steps_per_epoch=3"]


@pytest.mark.slow
def test_train_evaluate_compare_predict(fashion_root, tmp_path):
    runs = tmp_path / "runs"
    for method in ("finetune", "spottune"):
        r = spottune("train", "--method", method, "--out", runs / method, "--set", f"data.root={fashion_root}", *TINY)
        assert r.returncode == 0, r.stderr
        assert {"checkpoint.pt", "model.safetensors", "model.json", "metrics.json"} <= {p.name for p in (runs / method).iterdir()}
    metrics = json.loads((runs / "spottune" / "metrics.json").read_text())
    assert metrics["method"] == "spottune" and len(metrics["test"]["tuned_fraction_per_block"]) == 16

    r = spottune("evaluate", runs / "spottune", "--out", tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])  # deterministic decisions

    r = spottune("compare", runs / "finetune", runs / "spottune", "--report", tmp_path / "report.md",
                 "--json", tmp_path / "comparison.json")
    assert r.returncode == 0, r.stderr
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["candidate"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert 0.0 <= comparison["mcnemar"]["p_value"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "# spottune vs finetune" in report
    fractions = metrics["test"]["tuned_fraction_per_block"]
    assert metrics["test"]["mixed_blocks"] == sum(0.05 <= f <= 0.95 for f in fractions)
    assert f"Per image: {metrics['test']['mixed_blocks']} of 16 blocks" in report
    assert "| less common branch | " + " | ".join(f"{min(f, 1 - f):.2f}" for f in fractions) in report

    images = sorted((fashion_root / "test" / "trouser").glob("*.png"))[:2]
    r = spottune("predict", "--run", runs / "spottune", "--json", *images)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["path"] for row in rows] == [str(p) for p in images]
    assert all(len(row["top"]) == 3 and "tuned_blocks" in row for row in rows)


@pytest.mark.parametrize(
    "args,culprit",
    [
        (["--method", "magic"], "model.method"),
        (["--backbone", "vgg16"], "model.backbone"),
        (["--set", "optim.lr_net=-1"], "optim.lr_net"),
        (["--set", "optim.nesterov=true"], "optim.nesterov"),
        (["--set", "data.root=/no/such/dir"], "/no/such/dir"),
    ],
)
@pytest.mark.slow
def test_bad_input_fails_clearly_and_writes_nothing(args, culprit, tmp_path):
    r = spottune("train", "--out", tmp_path / "run", *args)
    assert r.returncode == 3
    assert culprit in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_bad_params_file_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("model:\n  backbone: resnet50\n  wieghts: none\n")
    r = spottune("train", "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 3 and "model.wieghts" in r.stderr and "params.yaml" in r.stderr


@pytest.mark.slow
def test_unreadable_image_stops_training_without_a_checkpoint(fashion_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(fashion_root, root)
    bad = next((root / "train" / "sandal").glob("*.png"))
    bad.write_bytes(b"")
    r = spottune("train", "--method", "finetune", "--out", tmp_path / "run", "--set", f"data.root={root}",
                 "--set", "data.image_size=32", "--set", "data.batch_size=400")
    assert r.returncode == 3 and bad.name in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_existing_run_is_not_overwritten_silently(fashion_root, tmp_path):
    args = ["train", "--method", "linear", "--out", tmp_path / "run", "--set", f"data.root={fashion_root}", *TINY]
    assert spottune(*args).returncode == 0
    r = spottune(*args)
    assert r.returncode == 3 and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert spottune(*args, "--overwrite").returncode == 0


@pytest.mark.slow
def test_resume_unfinished_continues_matching_runs_and_restarts_the_others(fashion_root, tmp_path):
    """What a retried pipeline stage runs: resume an unfinished run made with the same params, start
    over when its params differ, and retrain a finished run from scratch."""
    base = ["train", "--method", "linear", "--out", tmp_path / "run", "--set", f"data.root={fashion_root}",
            "--set", "data.image_size=32", "--set", "optim.max_steps_per_epoch=2", "--set", "optim.epochs=2"]
    assert spottune(*base, "--stop-after-epochs", "1").returncode == 0
    assert not (tmp_path / "run" / "model.safetensors").exists()
    r = spottune(*base, "--resume-unfinished")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stdout + r.stderr
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1]

    r = spottune(*base, "--resume-unfinished")  # finished: retrained from scratch
    assert r.returncode == 0 and "resuming" not in r.stdout
    assert spottune(*base, "--stop-after-epochs", "1", "--overwrite").returncode == 0
    r = spottune(*base, "--resume-unfinished", "--set", "optim.lr_head=0.5")  # other params: start over
    assert r.returncode == 0 and "cannot resume" in r.stderr and "optim.lr_head" in r.stderr, r.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history"][0]["lr"]["head"] == 0.5


@pytest.mark.slow
def test_library_imports_no_orchestration_package():
    code = ("import sys, spottune.cli, spottune.training, spottune.compare; "
            "bad = {'prefect', 'dvc', 'great_expectations', 'boto3'} & set(sys.modules); print(sorted(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, spottune.config; print('torch' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False", "settings must validate without importing torch"

"""Live metrics: a run's per-epoch metrics reach `dvc exp show` and `dvc plots` right after each epoch, while
later epochs are still to run (real dvc on this project's dvc.yaml in a temporary git repository)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support import dvc, git_pipeline_repo, requires, sh

requires("dvc")
pytestmark = [pytest.mark.slow, pytest.mark.integration]  # trains, and runs dvc


def live_metrics_in_exp_show(repo: Path, path: str) -> dict[str, Any]:
    """The workspace's metrics file PATH as `dvc exp show --json` reports it (DVC's own reading of it)."""
    rows = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    workspace = next(r for r in rows if r.get("rev") == "workspace")
    return workspace["data"]["metrics"][path]["data"]


def plotted_steps(repo: Path, path: str) -> list[int]:
    """The steps `dvc plots show --json` reads from one live TSV file."""
    shown = json.loads(dvc("plots", "show", "--json", path, cwd=repo).stdout)
    rows = [row for plot in shown["data"][path] for row in plot["content"]["data"]["values"]]
    return sorted({int(r["step"]) for r in rows})


def test_each_epoch_is_visible_to_dvc_before_the_next_one_runs(fashion_root, tiny_params, runtime, tmp_path):
    from spottune.training import fit

    repo = git_pipeline_repo(tmp_path / "repo")
    sh("git", "add", ".", cwd=repo)
    sh("git", "commit", "-q", "-m", "pipeline", cwd=repo)
    params = tiny_params(fashion_root, model={"method": "finetune"}, optim={"epochs": 2, "max_steps_per_epoch": 1})
    live = repo / "live" / "finetune"
    run = repo / "runs" / "finetune"

    assert fit(params, run, runtime, stop_after_epochs=1, live_dir=live, log=lambda _: None) is None  # epoch 1 to run
    first = live_metrics_in_exp_show(repo, "live/finetune/metrics.json")
    assert first["step"] == 0 and 0 <= first["val"]["accuracy"] <= 1 and first["train"]["loss"] > 0
    assert set(first["lr"]) == {"net", "head"} and first["lr"]["head"] == pytest.approx(params.optim.lr_head)
    assert plotted_steps(repo, "live/finetune/plots/metrics/train/loss.tsv") == [0]
    assert not (run / "metrics.json").exists()  # the final record waits for the end

    final = fit(params, run, runtime, resume=True, live_dir=live, log=lambda _: None)
    second = live_metrics_in_exp_show(repo, "live/finetune/metrics.json")
    assert second["step"] == 1 and second["lr"]["head"] < first["lr"]["head"]  # cosine: epoch 1 starts lower
    assert second["val"]["accuracy"] == pytest.approx(final["history"][-1]["val"]["accuracy"])
    assert plotted_steps(repo, "live/finetune/plots/metrics/val/accuracy.tsv") == [0, 1]
    rows = (live / "plots" / "metrics" / "lr" / "head.tsv").read_text().splitlines()
    assert rows[0] == "step\thead" and [r.split("\t")[0] for r in rows[1:]] == ["0", "1"]
    assert not [p for p in live.rglob("*") if p.name.startswith(".")]  # no temporary file left behind

    # a run that starts over shows its own epochs only, never the last run's
    fit(params, run, runtime, overwrite=True, stop_after_epochs=1, live_dir=live, log=lambda _: None)
    assert live_metrics_in_exp_show(repo, "live/finetune/metrics.json")["step"] == 0
    assert plotted_steps(repo, "live/finetune/plots/metrics/val/accuracy.tsv") == [0]

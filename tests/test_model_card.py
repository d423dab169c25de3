"""The model card of a published version (model_card.json and .md): every section holds the run's own values
(the session's real finished run, a real comparison with another run and the gate's real decision, a
lineage collected from a git checkout), and `spottune models show` prints it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from support import clean_env, cli

NAME = "fashion"
SECTIONS = ("model", "intended_use", "training_data", "metrics", "comparison", "routing", "limitations")


@pytest.fixture(scope="module")
def published(finished_run, other_run, tmp_path_factory) -> dict:
    """finished_run published with the gate stage's record of it against other_run, and its lineage."""
    from spottune.compare import compare_runs
    from spottune.config import GateParams, load_params
    from spottune.gate import decide
    from spottune.lineage import collect_lineage
    from spottune.settings import RuntimeSettings, StoreSettings
    from spottune.store import Gate, open_store, sha256_file

    repo = tmp_path_factory.mktemp("card") / "repo"
    repo.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", repo / "params.yaml")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "project"]):
        subprocess.run(["git", *args], cwd=repo, env=clean_env(), check=True, capture_output=True)
    run = repo / "runs" / "linear"
    shutil.copytree(finished_run, run)
    comparison = compare_runs(other_run, run, RuntimeSettings(device="cpu", progress=False))
    record = decide(comparison, GateParams(rule="non_inferiority", margin=0.05, floor=0.99),  # the floor refuses
                    {"status": "no_store", "reason": "test"}, weights_sha256=sha256_file(run / "model.safetensors"))
    lineage = collect_lineage(repo, run, load_params(repo / "params.yaml"), data_version="0123456789abcdef" * 2)
    root = repo.parent / "artifacts"
    store = open_store(StoreSettings(store_backend="local", store_root=root))
    result = store.publish(run, NAME, gate=Gate.from_record(record), data_version=lineage.record["data_version"],
                           lineage=lineage)
    card = json.loads(store.read_verified(NAME, result.version, "model_card.json"))
    md = store.read_verified(NAME, result.version, "model_card.md").decode()
    metrics = json.loads((run / "metrics.json").read_text())
    return {"card": card, "md": md, "metrics": metrics, "record": record, "lineage": lineage.record,
            "version": result.version, "root": root}


def test_the_card_has_every_section_with_the_runs_values(published):
    card, metrics, record = published["card"], published["metrics"], published["record"]
    assert set(card) == {"format", *SECTIONS} and card["format"] == "spottune-model-card/1"
    assert card["model"]["method"] == "linear" and len(card["model"]["classes"]) == 10
    assert "t-shirt_top" in card["intended_use"]["use"] and f"{NAME}@production" in card["intended_use"]["use"]
    assert "32 px" in card["intended_use"]["not_for"]

    data = card["training_data"]
    assert data["data_version"] == published["lineage"]["data_version"]
    assert data["git_commit"] == published["lineage"]["git_commit"] and len(data["git_commit"]) == 40
    assert data["dvc_lock_sha256"] == published["lineage"]["dvc_lock_sha256"]
    assert data["train_images_per_epoch"] == metrics["history"][-1]["train"]["images"] > 0

    m = card["metrics"]
    assert m["test_accuracy"] == metrics["test"]["accuracy"] and m["test_images"] == metrics["test"]["images"] == 200
    assert list(m["per_class_accuracy"].values()) == metrics["test"]["per_class_accuracy"]
    assert list(m["per_class_accuracy"]) == card["model"]["classes"]

    cmp = card["comparison"]
    assert cmp["baseline"] == record["baseline"] and cmp["candidate"]["accuracy"] == record["candidate"]["accuracy"]
    assert cmp["ci_low"] == record["vs_baseline"]["ci_low"] <= cmp["difference"] <= cmp["ci_high"]
    assert cmp["gate"]["passed"] is False and "floor 0.9900" in cmp["gate"]["floor_check"]
    assert cmp["gate"]["reason"] == record["reason"] and cmp["gate"]["rule"] == "non_inferiority"

    assert card["routing"] is None  # a linear probe routes nothing
    weakest = min(zip(m["per_class_accuracy"].values(), m["per_class_accuracy"]))[1]
    assert any(f"weakest class: {weakest}" in n for n in card["limitations"])
    assert any("candidate, not for production" in n for n in card["limitations"])


def test_the_markdown_card_shows_the_same_values(published):
    md, card = published["md"], published["card"]
    for heading in ("Intended use", "Training data", "Metrics", "Comparison with the baseline and the gate",
                    "Routing", "Limitations"):
        assert f"\n## {heading}\n" in md
    assert f"data version (data.dvc md5): {card['training_data']['data_version']}" in md
    assert f"test top-1 accuracy: {card['metrics']['test_accuracy']:.4f}" in md
    for name, acc in card["metrics"]["per_class_accuracy"].items():
        assert f"| {name} | {acc:.4f} |" in md
    assert "gate: FAILED (candidate only)" in md and card["comparison"]["gate"]["floor_check"] in md


def test_models_show_prints_the_card(published, capsys, monkeypatch):
    monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "local")
    monkeypatch.setenv("SPOTTUNE_STORE_ROOT", str(published["root"]))
    code, out = cli(capsys, "models", "show", f"{NAME}@{published['version']}", "--json")
    assert code == 0 and json.loads(out)["card"] == published["card"]
    code, out = cli(capsys, "models", "show", f"{NAME}@latest")
    assert code == 0 and published["md"] in out and f"{NAME} {published['version']}" in out

"""The project's DVC files under real dvc in temporary git repositories, without training: the validate stage
through the GX checkpoints, the params each stage lists, and `dvc plots show` with the bundled template."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import yaml

from support import PROJECT, dvc, git_pipeline_repo, requires, set_params, sh

requires("dvc")
pytestmark = pytest.mark.integration  # real dvc in a temporary git repository

# Keys no stage reads: the training commands set model.method and data.manifest on their command line, and
# the rest is read by other commands (remote, the flow's publish) or only by other methods.
UNREAD = {"data.manifest", "data.val_fraction", "data.num_workers", "model.method", "model.last_k", "model.l2sp_alpha",
          "remote.name", "remote.url", "remote.endpoint_url", "remote.region", "publish.promote"}


def leaves(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a nested params dict."""
    out = set()
    for k, v in tree.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


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
    assert not list((repo / "reports").glob(".*gx-run-*"))  # no scratch copy left behind


def test_each_stage_lists_only_params_keys_it_reads(tmp_path):
    """dvc's own reading of dvc.yaml (dvc.api.params_show per stage): every stage lists single keys that exist
    in params.yaml, never a whole section, and none of the keys no stage reads; `dvc exp show --param-deps`
    then shows just those columns."""
    repo = git_pipeline_repo(tmp_path / "repo")
    sh("git", "add", ".", cwd=repo)
    sh("git", "commit", "-q", "-m", "pipeline", cwd=repo)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    code = ("import json, sys, dvc.api; print(json.dumps({s: dvc.api.params_show(stages=s, deps=True) "
            "for s in sys.argv[1:]}))")
    shown_per_stage = json.loads(sh(sys.executable, "-c", code, *stages, cwd=repo).stdout)
    listed: dict[str, set[str]] = {}
    for name, stage in stages.items():
        keys = stage.get("params", [])
        assert all(isinstance(k, str) and "." in k for k in keys), f"dvc.yaml stage {name} lists a whole section: {keys}"
        listed[name] = leaves(shown_per_stage[name])
        assert listed[name] == set(keys), name
        for key in keys:
            section, leaf = key.split(".", 1)
            assert leaf in params[section] and not isinstance(params[section][leaf], dict), f"{name}: {key}"
    assert not set().union(*listed.values()) & UNREAD
    assert not {k for k in listed["train_finetune"] if k.startswith("policy.")} | ({"optim.lr_policy",
                                                                                     "optim.policy_weight_decay"} & listed["train_finetune"])
    shown = json.loads(dvc("exp", "show", "--json", "--param-deps", cwd=repo).stdout)
    workspace = next(row for row in shown if row["rev"] == "workspace")
    assert leaves(workspace["data"]["params"]["params.yaml"]["data"]) == set().union(*listed.values())


def test_plots_show_writes_a_page_that_renders_offline(tmp_path):
    """`dvc plots show` with the project's .dvc/config (plots.html_template) on tiny plot files of every plot
    dvc.yaml defines: the page loads nothing from the network (no remote <script src> or <link href>), holds
    the bundled libraries, and (where node is installed) those libraries alone render every plot to SVG."""
    repo = git_pipeline_repo(tmp_path / "repo")
    curve = [{"epoch": e, "val_accuracy": 0.3 + 0.2 * e, "train_loss": 1.9 - 0.5 * e} for e in range(3)]
    files = {"plots/finetune/learning_curve.json": curve, "plots/spottune/learning_curve.json": curve,
             "plots/compare/routing.json": [{"block": b, "tuned_fraction": b / 4} for b in range(4)],
             "plots/compare/per_class.json": [{"class": c, "spottune": 0.8, "finetune": 0.7} for c in ("bag", "coat")]}
    for name, rows in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(json.dumps(rows))
    for method in ("finetune", "spottune"):  # the training's live plots: DVCLive's TSVs, one per metric
        for metric in ("train/loss", "train/accuracy", "val/accuracy", "lr/net"):
            tsv = repo / "live" / method / "plots" / "metrics" / f"{metric}.tsv"
            tsv.parent.mkdir(parents=True, exist_ok=True)
            tsv.write_text(f"step\t{metric.split('/')[1]}\n" + "".join(f"{e}\t{0.5 + 0.1 * e}\n" for e in range(3)))
    dvc("plots", "show", "--out", "page", cwd=repo)
    page = (repo / "page" / "index.html").read_text()
    remote = re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//[^>]*>", page, flags=re.IGNORECASE)
    assert remote == []
    template = (PROJECT / ".dvc" / "plots-offline" / "template.html").read_text()
    bundled = re.findall(r"<script type=\"text/javascript\">/\* (vega[a-z-]*) [0-9.]+ .*?</script>", template, flags=re.DOTALL)
    assert bundled == ["vega", "vega-lite", "vega-embed"]
    for block in re.findall(r"<script type=\"text/javascript\">/\*.*?</script>", template, flags=re.DOTALL):
        assert block in page
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page was not rendered")
    rendered = sh(node, str(PROJECT / "tests" / "render_plots.js"), str(repo / "page" / "index.html"), cwd=repo).stdout
    lines = [line.split() for line in rendered.splitlines()]
    assert {line[0] for line in lines} >= {"#Validation_accuracy_per_epoch", "#Training_loss_per_epoch",
                                           "#Test_accuracy_per_class"}
    assert all(int(paths) > 0 for _, _, paths in lines), rendered

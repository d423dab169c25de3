"""The retrain flow for real: real `dvc repro` and `dvc exp run` in a temporary git repository holding this
project's pipeline, Prefect's test server, the local store and a moto S3 server process on 127.0.0.1.

One tiny training (12 train / 6 test images per class, 32 px, 1 step per epoch) is shared by the
tests: the first run (no overrides) trains in the repository, which is then committed as a user
commits dvc.lock; later runs override only what needs no training (validation thresholds, settings
no stage reads, the model name) or edit params.yaml's gate (which no run may override), so DVC
retrains nothing and only validation, the gate, report, publish and promote steps differ; so do the runs that Prefect starts through a deployment (`python -m flows.serve`, and a
`prefect worker start` process on the prefect.yaml deployment), each in its own checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import (
    PROJECT,
    MotoServer,
    WebhookReceiver,
    clean_env,
    dummy_aws_env,
    free_port,
    new_bucket,
    prefect_test_server,
    requires,
    set_params,
    sh,
    tiny_flow_project,
)

requires("dvc", "prefect")  # Prefect is not imported here: PREFECT_HOME is set first (prefect_api)
pytestmark = pytest.mark.integration  # Prefect's test server, real dvc, moto; `slow`: the tests that train
BIN = Path(sys.executable).parent
NAME = "fashion-test"
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.org"}  # DVC commits experiments
sys.path.insert(0, str(PROJECT))  # `flows` is not an installed package: it runs from the repository root


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """Prefect's test server (one per module) with its own PREFECT_HOME; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    with prefect_test_server(home, os.environ.get("TEST_LOG", "WARNING"), **GIT_IDENTITY) as api:
        yield api


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC repository with this project's pipeline and flows, tiny data and tiny params, and a bare
    git repository as its remote `origin` (where experiments are pushed)."""
    repo = tiny_flow_project(tmp_path_factory.mktemp("clone") / "repo", NAME, per_class=(12, 6), steps_per_epoch=1)
    origin = tmp_path_factory.mktemp("origin") / "origin.git"
    sh("git", "init", "-q", "--bare", str(origin), cwd=repo)
    sh("git", "remote", "add", "origin", str(origin), cwd=repo)
    return repo


@pytest.fixture(scope="module")
def local_store(project, tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("artifacts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPOTTUNE_STORE_BACKEND", "local")
        mp.setenv("SPOTTUNE_STORE_ROOT", str(root))
        mp.setenv("SPOTTUNE_MODEL_CACHE_DIR", str(root.parent / "model-cache"))  # the gate stage's champion
        yield root


def local_store_env(root: Path) -> dict[str, str]:
    """What a child process that runs the flow needs to promote into the local store at root
    (clean_env() drops every SPOTTUNE_STORE_* variable of this process)."""
    return {"SPOTTUNE_STORE_BACKEND": "local", "SPOTTUNE_STORE_ROOT": str(root)}


def open_local(root: Path):
    from spottune.settings import StoreSettings
    from spottune.store import open_store

    return open_store(StoreSettings(store_backend="local", store_root=root))


@pytest.fixture(scope="module")
def first_run(prefect_api, project, local_store) -> dict[str, Any]:
    """The one full run: every stage, `dvc repro` in the repository, promoting into the local store; then
    its dvc.lock and metrics are committed, as a user commits them after `make run`."""
    from flows.retrain import retrain

    before = (project / "params.yaml").read_bytes()
    head = sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
    started = time.monotonic()
    result = retrain(project_dir=str(project))
    result["_seconds"] = time.monotonic() - started
    result["_params_before"] = before
    result["_head"] = head  # the commit the run started from (the commit below follows it)
    result["_lock"] = (project / "dvc.lock").read_bytes()
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-q", "-m", "first run", cwd=project)
    return result


def checkout_state(repo: Path) -> dict[str, Any]:
    """What a run must leave as it was in the user's checkout: HEAD, `git status`, params.yaml, dvc.lock, and
    every file of the outputs (metrics, plots, live metrics, reports, runs, the manifest)."""
    outputs = {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
               for d in ("metrics", "plots", "live", "reports", "runs", "prepared") for p in sorted((repo / d).rglob("*"))
               if p.is_file()}
    return {"head": sh("git", "rev-parse", "HEAD", cwd=repo).stdout,
            "status": sh("git", "status", "--porcelain", "--untracked-files=all", cwd=repo).stdout,
            "params.yaml": (repo / "params.yaml").read_bytes(), "dvc.lock": (repo / "dvc.lock").read_bytes(),
            "outputs": outputs}


def experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """name -> params.yaml of every experiment on HEAD, as `dvc exp show --json` reports them."""
    shown = json.loads(sh(sys.executable, "-m", "dvc", "exp", "show", "--json", cwd=repo).stdout)
    found = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                found[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]
    return found


def experiment_file(repo: Path, name: str, path: str) -> str:
    """A file as experiment NAME's commit holds it."""
    refs = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/", cwd=repo).stdout.split()
    [ref] = [r for r in refs if r.endswith(f"/{name}")]
    return sh("git", "show", f"{ref}:{path}", cwd=repo).stdout


def leftover_checkouts(repo: Path) -> list[str]:
    """Worktrees other than the repository itself, and anything left under .dvc/tmp/checkouts."""
    worktrees = [line for line in sh("git", "worktree", "list", "--porcelain", cwd=repo).stdout.splitlines()
                 if line.startswith("worktree ")]
    parent = repo / ".dvc" / "tmp" / "checkouts"
    left = [p.name for p in parent.iterdir() if p.name != ".lock"] if parent.is_dir() else []
    return worktrees[1:] + left


def retrain_leaving_checkout(project: Path, **kwargs: Any) -> dict[str, Any]:
    """The flow run retrain(**kwargs), which must leave the user's checkout as it was (params.yaml byte-identical,
    dvc.lock and every output unchanged) and no private checkout behind."""
    from flows.retrain import retrain

    state = checkout_state(project)
    r = retrain(**kwargs)
    assert checkout_state(project) == state and not leftover_checkouts(project)
    return r


def task_run_names(flow_run_name_or_id: Any = None) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    return [r.name for r in runs]


@pytest.mark.slow
def test_flow_runs_every_step_and_promotes(first_run, project, local_store):
    r = first_run
    assert r["promoted"] and r["gate_passed"] and r["status"].startswith("promoted"), r["status"]
    store = open_local(local_store)
    assert store.production(NAME)["version"] == r["version"]
    [row] = store.list_versions(NAME)
    assert row.complete and row.gate_passed and row.production and row.data_version == r["data_version"]
    store.verify_version(NAME, r["version"])
    # every step ran, as a Prefect task
    names = set(task_run_names())
    for step in ("version-data", "validate", "train-train_finetune", "train-train_spottune", "compare", "gate",
                 "report", "publish", "promote"):
        assert any(n.startswith(step) for n in names), (step, names)
    # the data version is data.dvc's md5
    assert r["data_version"] == yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    # no overrides: `dvc repro` in the repository itself, which dvc.lock records; no experiment
    assert r["experiment"] is None and r["report"] == str(project / "reports" / "retrain.md")
    assert (project / "params.yaml").read_bytes() == r["_params_before"]
    lock = yaml.safe_load(r["_lock"])
    assert lock["stages"]["train_spottune"]["params"]["params.yaml"]["optim.max_steps_per_epoch"] == 1
    published = json.loads((local_store / "models" / NAME / "versions" / r["version"] / "params.json").read_text())
    assert published["optim"]["max_steps_per_epoch"] == 1
    # the lineage: the commit, a clean checkout (the run rewrote only dvc.lock, data.dvc, metrics/, plots/), the
    # override, the training's threads and the flow run that published it
    lineage = json.loads(store.read_verified(NAME, r["version"], "lineage.json"))
    assert lineage["git_commit"] == r["_head"] and lineage["git_dirty"] is False, lineage
    assert lineage["params"]["optim"]["max_steps_per_epoch"] == 1 and lineage["data_version"] == r["data_version"]
    assert lineage["threads"] >= 1 and lineage["device"] == "cpu" and lineage["run"] == "runs/spottune"
    assert lineage["flow_run"]["id"] and lineage["flow_run"]["name"] and lineage["flow_run"]["deployment"] is None
    assert store.read_verified(NAME, r["version"], "dvc.lock") == (project / "dvc.lock").read_bytes()
    # the report: comparison, statistics, routing per class (table and PNG), published with the model
    report = (local_store / "models" / NAME / "versions" / r["version"] / "report.md").read_text()
    assert report == r["report_md"] == (project / "reports" / "retrain.md").read_text()
    # what the command line prints: the report up to its routing section
    assert report.startswith(r["summary_md"]) and "McNemar" in r["summary_md"] and "Which blocks" not in r["summary_md"]
    for words in ("test top-1", "McNemar", "bootstrap CI", "Which blocks SpotTune tunes, per class",
                  "data:image/png;base64,", r["data_version"], "(validation/data_docs/index.html)"):
        assert words in report, words
    assert (project / "reports" / "validation" / "data_docs" / "index.html").is_file()  # what the report links
    assert (project / "reports" / "routing_per_class.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_the_flows_version_has_a_card_with_its_data_routing_and_gate_and_live_metrics(first_run, project, local_store):
    r = first_run
    card = json.loads(open_local(local_store).read_verified(NAME, r["version"], "model_card.json"))
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    [manifest] = [o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "prepared/manifest.csv"]
    data = card["training_data"]
    assert data["data_version"] == r["data_version"] and data["manifest_md5"] == manifest["md5"]
    assert data["manifest"] == "prepared/manifest.csv" and data["git_commit"] == r["_head"]
    gate = json.loads((project / "metrics" / "gate.json").read_text())
    assert card["comparison"]["baseline"] == gate["baseline"] and card["comparison"]["gate"]["reason"] == r["reason"]
    metrics = json.loads((project / "runs" / "spottune" / "metrics.json").read_text())
    routing = card["routing"]
    assert routing["tuned_fraction_per_block"] == metrics["test"]["tuned_fraction_per_block"] and routing["blocks"] > 0
    assert routing["mixed_blocks"] == metrics["test"]["mixed_blocks"] == len(routing["mixed_block_indices"])
    assert card["metrics"]["test_accuracy"] == r["candidate_accuracy"]
    # the training stages wrote their live metrics, which dvc.yaml lists: the last epoch's
    for method in ("finetune", "spottune"):
        live = json.loads((project / "live" / method / "metrics.json").read_text())
        assert live["step"] == 0 and live["train"]["loss"] > 0 and "head" in live["lr"]


@pytest.mark.slow
def test_report_is_a_prefect_artifact(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["spottune-retrain-report"])))
    assert arts and arts[0].type == "markdown" and "Which blocks SpotTune tunes" in arts[0].data


@pytest.mark.slow
def test_a_failed_gate_publishes_a_candidate_that_never_becomes_production(first_run, project, local_store):
    from flows.retrain import retrain
    from spottune.store import PromotionRefused

    set_params(project, gate={"floor": 1.01})  # a stricter gate is a change to params.yaml, not an override
    try:
        r = retrain(project_dir=str(project))  # a plain run: `dvc repro` reruns only the gate stage
        record = json.loads((project / "metrics" / "gate.json").read_text())
        lock = yaml.safe_load((project / "dvc.lock").read_text())
    finally:  # the checkout as the first run committed it, for the tests that follow
        sh("git", "checkout", "-q", "params.yaml", "dvc.lock", "metrics/gate.json", cwd=project)
    assert not r["promoted"] and not r["gate_passed"] and r["experiment"] is None
    assert r["status"].startswith("not promoted:") and "< floor 1.0100" in r["status"], r["status"]
    assert record["decision"] == "refuse" and record["floor"] == 1.01
    assert lock["stages"]["gate"]["params"]["params.yaml"]["gate.floor"] == 1.01
    # production holds these very weights (the first run's; nothing retrained): no champion to compare with
    assert record["champion"]["status"] == "same_weights" and record["champion"]["version"] == first_run["version"]
    store = open_local(local_store)
    rows = {row.version: row for row in store.list_versions(NAME)}
    assert set(rows) == {first_run["version"], r["version"]}
    assert rows[r["version"]].complete and rows[r["version"]].gate_passed is False
    assert store.production(NAME)["version"] == first_run["version"]
    for force in (False, True):
        with pytest.raises(PromotionRefused, match="failed its promotion gate"):
            store.promote(NAME, r["version"], force=force, reason="forcing a refused version")
    assert store.production(NAME)["version"] == first_run["version"]
    # same weights as the first run (nothing retrained), but another verdict: another version
    assert r["version"][:12] == first_run["version"][:12] and r["version"] != first_run["version"]


def flow_run_state(flow_run_id: str) -> tuple[str, str]:
    """The name and state of a flow run, as Prefect's server has them."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
    return run.name, run.state.type.value


@pytest.mark.slow
def test_a_refused_gate_and_a_failed_run_alert_the_webhook_and_a_dead_one_fails_nothing(first_run, project, local_store,
                                                                                    monkeypatch):
    from flows.retrain import retrain
    from spottune.errors import ConfigError

    set_params(project, gate={"floor": 1.01})  # the gate refuses; nothing retrains
    try:
        monkeypatch.setenv("SPOTTUNE_ALERT_WEBHOOK", f"http://127.0.0.1:{free_port()}/down")  # nothing listens there
        unheard = retrain(project_dir=str(project))
        with WebhookReceiver() as hook:
            monkeypatch.setenv("SPOTTUNE_ALERT_WEBHOOK", hook.url)
            refused = retrain(project_dir=str(project))
            with pytest.raises(ConfigError, match="optim.epoch"):
                retrain(overrides={"optim.epoch": 1}, project_dir=str(project))
            received = hook.wait_for(2)
    finally:  # the checkout as the first run committed it, for the tests that follow
        sh("git", "checkout", "-q", "params.yaml", "dvc.lock", "metrics/gate.json", cwd=project)
    # a webhook that is down costs the run nothing: it completes with its verdict
    assert unheard["gate_passed"] is False and unheard["status"].startswith("not promoted:")
    assert len(received) == 2 and all(r["content_type"] == "application/json" for r in received), received
    gate_alert, failure = (r["body"] for r in received)

    assert gate_alert["event"] == "gate_refused" and gate_alert["model"] == NAME
    assert gate_alert["version"] == refused["version"] and gate_alert["reason"] == refused["reason"]
    assert "< floor 1.0100" in gate_alert["reason"] and gate_alert["candidate_accuracy"] == refused["candidate_accuracy"]
    assert flow_run_state(gate_alert["flow_run_id"]) == (gate_alert["flow_run"], "COMPLETED")

    assert failure["event"] == "flow_failed" and failure["model"] == NAME and failure["state"] == "Failed"
    assert "optim.epoch" in failure["reason"] and failure["parameters"]["overrides"] == {"optim.epoch": 1}
    assert flow_run_state(failure["flow_run_id"]) == (failure["flow_run"], "FAILED")


@pytest.mark.slow
def test_gate_overrides_are_refused_before_any_work(first_run, project, capsys):
    from flows.retrain import main, retrain
    from spottune.errors import ConfigError

    lock = (project / "dvc.lock").read_bytes()
    params = (project / "params.yaml").read_bytes()
    gate = (project / "metrics" / "gate.json").read_bytes()
    before = experiments(project)
    with pytest.raises(ConfigError, match=r"gate.floor, gate.margin refused: the promotion gate is params.yaml"):
        retrain(overrides={"validate.max_side": 4000, "gate.floor": 0.0, "gate.margin": 1.0},
                project_dir=str(project))
    assert main(["--project-dir", str(project), "--set", "gate.rule=non_inferiority"]) == 3  # bad input
    assert "error: flow override: gate.rule refused" in capsys.readouterr().err
    assert (project / "dvc.lock").read_bytes() == lock and (project / "params.yaml").read_bytes() == params
    assert (project / "metrics" / "gate.json").read_bytes() == gate
    assert experiments(project) == before and not leftover_checkouts(project)  # no experiment was started


@pytest.mark.slow
def test_a_bad_override_fails_before_any_work(first_run, project):
    from flows.retrain import retrain
    from spottune.errors import ConfigError

    lock = (project / "dvc.lock").read_bytes()
    params = (project / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="optim.epoch"):
        retrain(overrides={"optim.epoch": 1}, project_dir=str(project))
    assert (project / "dvc.lock").read_bytes() == lock and (project / "params.yaml").read_bytes() == params


# ---------------------------------------------------------------------------------------------
# Overrides run as DVC experiments in a private checkout; deployments never touch the user's checkout


@pytest.mark.slow
def test_an_override_runs_as_a_dvc_experiment_and_leaves_the_checkout_as_it_was(first_run, project, local_store):
    from flows.dvc_runner import unused_experiment_name
    # the user is editing params.yaml (not committed): the experiment starts from the checkout as it is
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("max_pixels: 16000000", "max_pixels: 15000000"))
    try:
        r = retrain_leaving_checkout(project, overrides={"validate.max_side": 4000}, project_dir=str(project))
    finally:
        sh("git", "checkout", "-q", "params.yaml", cwd=project)
    name = r["experiment"]
    assert name and r["report"] is None and r["promoted"]
    # listed by `dvc exp list`; `dvc exp show` has the override and the uncommitted edit
    assert name in sh(sys.executable, "-m", "dvc", "exp", "list", "--name-only", cwd=project).stdout.split()
    params = experiments(project)[name]
    assert params["validate"]["max_side"] == 4000 and params["validate"]["max_pixels"] == 15000000
    # DVC ran the validate stage with them (the experiment's dvc.lock); the weights are the first run's
    lock = yaml.safe_load(experiment_file(project, name, "dvc.lock"))
    assert lock["stages"]["validate"]["params"]["params.yaml"]["validate.max_side"] == 4000
    first_lock = yaml.safe_load(first_run["_lock"])
    assert lock["stages"]["train_spottune"]["outs"] == first_lock["stages"]["train_spottune"]["outs"]
    # pushed to the git remote, and a retried flow run (same name) gets a name of its own
    assert r["experiment_pushed_to"] == "origin"
    assert f"/{name}\n" in sh("git", "ls-remote", "origin", "refs/exps/*", cwd=project).stdout
    assert unused_experiment_name(project, name) == f"{name}-2"
    # published from the experiment's results, the report naming the override
    report = (local_store / "models" / NAME / "versions" / r["version"] / "report.md").read_text()
    assert report == r["report_md"] and "`validate.max_side=4000`" in report
    # and its version names the experiment
    lineage = json.loads((local_store / "models" / NAME / "versions" / r["version"] / "lineage.json").read_text())
    assert lineage["experiment"] == name and lineage["params"]["validate"]["max_side"] == 4000, lineage


@pytest.mark.slow
def test_an_experiment_gates_on_the_record_its_own_checkout_made(first_run, project, local_store):
    """A stricter gate edited into params.yaml (not committed) reaches the experiment, whose `dvc exp run`
    reruns the gate stage in the private checkout: the flow decides on that record, while the user's
    metrics/gate.json and dvc.lock stay as they were."""
    set_params(project, gate={"floor": 1.01})
    try:
        r = retrain_leaving_checkout(project, overrides={"data.num_workers": 0}, project_dir=str(project))
    finally:
        sh("git", "checkout", "-q", "params.yaml", cwd=project)
    assert not r["promoted"] and not r["gate_passed"] and "< floor 1.0100" in r["reason"], r["status"]
    record = json.loads(experiment_file(project, r["experiment"], "metrics/gate.json"))
    assert record["decision"] == "refuse" and record["floor"] == 1.01 and record["reason"] == r["reason"]
    lock = yaml.safe_load(experiment_file(project, r["experiment"], "dvc.lock"))
    assert lock["stages"]["gate"]["params"]["params.yaml"]["gate.floor"] == 1.01
    assert json.loads((project / "metrics" / "gate.json").read_text())["decision"] == "promote"
    stored = json.loads((local_store / "models" / NAME / "versions" / r["version"] / "gate.json").read_text())
    assert stored["passed"] is False and stored["details"] == record


@pytest.mark.slow
def test_an_experiment_reruns_the_gate_when_production_changed(first_run, project, local_store, tmp_path):
    """Production replaced by another model (its weights shifted to one class, promoted by hand) after the
    committed record was made: the experiment's DVC skips the unchanged gate stage, the flow sees that the
    record describes another production and reruns the stage in the private checkout, against the new
    champion. Production goes back to the first run's version afterwards, for the tests that follow."""
    from spottune.store import Gate

    from support import shifted_run

    store = open_local(local_store)
    before = store.production(NAME)["version"]
    other = shifted_run(project / "runs" / "spottune", tmp_path / "shifted", class_index=7, shift=50.0)
    store.publish(other, NAME, "shifted-by-hand", gate=Gate(None, "published by hand for this test"))
    store.promote(NAME, "shifted-by-hand", force=True, reason="a champion the committed record never saw")
    try:
        r = retrain_leaving_checkout(project, overrides={"validate.max_side": 4001}, project_dir=str(project))
    finally:
        store.promote(NAME, before, reason="back to the version the committed record describes")
    committed = json.loads(experiment_file(project, r["experiment"], "metrics/gate.json"))
    assert committed["champion"]["status"] != "compared"  # the stage did not rerun inside the experiment
    stored = json.loads((local_store / "models" / NAME / "versions" / r["version"] / "gate.json").read_text())
    assert stored["details"]["champion"]["version"] == "shifted-by-hand", stored["details"]["champion"]
    assert stored["details"]["champion"]["status"] == "compared"
    assert r["reason"] == stored["details"]["reason"]


@pytest.mark.slow
def test_a_deployment_run_works_in_its_own_checkout_at_head(first_run, project, local_store, monkeypatch):
    """The deployment's entry as a worker runs it: prefect.yaml's parameters, started in the project folder
    (its pull step), while the user has an edit in params.yaml that would fail validation: the run works
    in a worktree at HEAD, never sees the edit, and leaves the user's checkout as it is."""
    [deployment] = yaml.safe_load((project / "prefect.yaml").read_text())["deployments"]
    parameters = deployment["parameters"]
    assert parameters["own_checkout"] is True and parameters["overrides"] == {}
    path = project / "params.yaml"
    path.write_text(path.read_text().replace("max_side: 4096", "max_side: 9"))  # 28-px images: too large
    monkeypatch.chdir(project)
    try:
        r = retrain_leaving_checkout(project, **parameters)
    finally:
        sh("git", "checkout", "-q", "params.yaml", cwd=project)
    assert r["gate_passed"]
    assert experiments(project)[r["experiment"]]["validate"]["max_side"] == 4096  # HEAD's, not the edit
    open_local(local_store).verify_version(NAME, r["version"])


@pytest.mark.slow
def test_two_flows_with_different_overrides_at_once_each_run_their_own(first_run, project, local_store):
    """Two flow runs side by side in one project, each publishing under the model name its override gives
    (an override that retrains nothing: CI time); each experiment holds its own params."""
    from flows.retrain import retrain

    state = checkout_state(project)
    names = [f"{NAME}-a", f"{NAME}-b"]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(retrain, overrides={"publish.model_name": n}, project_dir=str(project)) for n in names]
        results = [f.result(timeout=600) for f in futures]
    assert checkout_state(project) == state and not leftover_checkouts(project)
    shown = experiments(project)
    assert results[0]["experiment"] != results[1]["experiment"]
    store = open_local(local_store)
    for r, name in zip(results, names, strict=True):
        assert r["promoted"] and r["model"] == name and store.production(name)["version"] == r["version"]
        assert shown[r["experiment"]]["publish"]["model_name"] == name
        assert f"`publish.model_name={json.dumps(name)}`" in r["report_md"]


def test_the_checkout_of_a_killed_run_is_removed_by_the_next(first_run, project):
    from flows.checkout import private_checkout

    code = ("import sys, time; from pathlib import Path; from flows.checkout import private_checkout\n"
            "with private_checkout(Path('.').resolve(), 'killed', carry_workspace=False, "
            "data_root=Path('data/fashion-mnist'), log=lambda m: None) as root:\n"
            "    print(root, flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=clean_env(), stdout=subprocess.PIPE, text=True)
    try:
        killed = Path(proc.stdout.readline().strip())
        assert killed.is_absolute() and (killed / "data" / "fashion-mnist").is_dir(), killed
    finally:
        proc.kill()
        proc.wait()
    assert len(leftover_checkouts(project)) == 3  # git's record of it, its folder and its lock
    logged: list[str] = []
    with private_checkout(project, "next", carry_workspace=False, data_root=Path("data/fashion-mnist"),
                          log=logged.append) as root:
        assert not killed.exists() and root.is_dir()
    assert any("a run that was killed" in m for m in logged), logged
    assert not leftover_checkouts(project)


# ---------------------------------------------------------------------------------------------
# S3: an upload that fails half-way, then re-runs


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory) -> Iterator[str]:
    """moto's S3 server as a child process on a free loopback port; dummy credentials in the env."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        with dummy_aws_env(), pytest.MonkeyPatch.context() as mp:
            mp.setenv("NO_PROXY", "127.0.0.1")
            yield server.url
    finally:
        server.stop()


@pytest.mark.slow
def test_rerun_after_an_upload_failure_neither_duplicates_nor_corrupts(first_run, project, moto_url, monkeypatch):
    import flows.retrain as flows_retrain
    from spottune.settings import StoreSettings
    from spottune.store import MANIFEST, VERSION_FILES, S3Backend, open_store

    bucket = new_bucket(moto_url)
    for k, v in {"SPOTTUNE_STORE_BACKEND": "s3", "SPOTTUNE_S3_BUCKET": bucket, "SPOTTUNE_S3_ENDPOINT_URL": moto_url,
                 "SPOTTUNE_STORE_PREFIX": "team/spottune", "SPOTTUNE_S3_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    settings = StoreSettings(store_backend="s3", s3_bucket=bucket, s3_endpoint_url=moto_url,
                             store_prefix="team/spottune")
    store = open_store(settings)

    # the upload fails at its third file, on every attempt (the task retries, then the flow fails)
    real_put = S3Backend.put_file
    attempts: list[str] = []

    def failing_put(self, key, src, sha256):
        if key.endswith("/metrics.json"):
            attempts.append(key)
            raise ConnectionResetError(f"injected: connection lost uploading {key}")
        return real_put(self, key, src, sha256)

    monkeypatch.setattr(S3Backend, "put_file", failing_put)
    monkeypatch.setattr(flows_retrain, "publish", flows_retrain.publish.with_options(retry_delay_seconds=0))
    with pytest.raises(ConnectionResetError):
        flows_retrain.retrain(project_dir=str(project))
    assert len(attempts) == 4  # first try + 3 retries
    [row] = store.list_versions(NAME)
    assert not row.complete and row.problem and "MANIFEST" in row.problem
    assert store.production(NAME) is None

    monkeypatch.setattr(S3Backend, "put_file", real_put)
    r = flows_retrain.retrain(project_dir=str(project))
    assert r["promoted"] and r["version"] == row.version
    assert {"model.safetensors", "model.json"} <= set(r["skipped"]) and "metrics.json" in r["uploaded"]
    keys = set(store.backend.list_sizes(store.model_key(NAME, "versions") + "/"))
    lineage_files = ("lineage.json", "dvc.lock", "data.dvc")
    assert keys == {store.version_key(NAME, r["version"], f) for f in (*VERSION_FILES, *lineage_files, MANIFEST)}
    store.verify_version(NAME, r["version"])

    again = flows_retrain.retrain(project_dir=str(project))
    assert again["already_published"] and again["version"] == r["version"] and again["promoted"]
    assert set(store.backend.list_sizes(store.model_key(NAME, "versions") + "/")) == keys
    assert [a["action"] for a in store.audit_trail(NAME)] == ["promote"]
    assert store.production(NAME)["version"] == r["version"]


# ---------------------------------------------------------------------------------------------
# Schedules: prefect.yaml on a process pool, and `python -m flows.serve` triggered through Prefect


def prefect_cli(*args: str, cwd: Path, api: str, **env: str) -> subprocess.CompletedProcess:
    return sh(str(BIN / "prefect"), *args, cwd=cwd, env=clean_env(PREFECT_API_URL=api, **env))


def read_deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_prefect_yaml_deploys_the_weekly_schedule_on_a_process_pool(prefect_api, project):
    prefect_cli("work-pool", "create", "spottune-cpu", "--type", "process", cwd=project, api=prefect_api)
    prefect_cli("--no-prompt", "deploy", "--all", cwd=project, api=prefect_api, SPOTTUNE_PROJECT_DIR=str(project))
    d = read_deployment("retrain/weekly")
    assert d.work_pool_name == "spottune-cpu"
    assert [s.schedule.cron for s in d.schedules] == ["0 3 * * 1"]
    assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]
    assert d.parameters["own_checkout"] is True  # its runs work in their own checkout
    listed = prefect_cli("deployment", "ls", cwd=project, api=prefect_api).stdout
    assert "retrain/weekly" in listed
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_deployment(d.id)  # the serve test below creates retrain/weekly its own way


@pytest.mark.slow
def test_served_deployment_runs_when_triggered_and_promotes(first_run, prefect_api, project, local_store, tmp_path):
    from prefect.deployments import run_deployment

    before = open_local(local_store).production(NAME)["version"]
    state = checkout_state(project)
    env = clean_env(PREFECT_API_URL=prefect_api, **local_store_env(local_store))  # the flow runs in that process
    with open(tmp_path / "serve.log", "wb") as log:  # the child keeps its own copy of the file
        proc = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=project, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                d = read_deployment("retrain/weekly")
                break
            except Exception:  # noqa: BLE001 - not created yet
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(1)
        assert [s.schedule.cron for s in d.schedules] == ["0 3 * * 1"] and d.schedules[0].active
        # the served process runs the flow in its own checkout; an override that no stage reads makes a new
        # version (same weights, no retraining: CI time; another report), which the gate passes and it promotes
        run = run_deployment("retrain/weekly", parameters={"overrides": {"publish.promote": True}},
                             timeout=600)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    store = open_local(local_store)
    pointer = store.production(NAME)
    assert pointer["version"] != before and pointer["history"][-1]["version"] == before
    assert checkout_state(project) == state and not leftover_checkouts(project)
    params = json.loads((local_store / "models" / NAME / "versions" / pointer["version"] / "params.json").read_text())
    assert params["optim"]["max_steps_per_epoch"] == 1
    gate = json.loads((local_store / "models" / NAME / "versions" / pointer["version"] / "gate.json").read_text())
    assert gate["passed"] and gate["details"]["decision"] == "promote" and gate["details"]["format"] == "spottune-gate/1"
    lineage = json.loads((local_store / "models" / NAME / "versions" / pointer["version"] / "lineage.json").read_text())
    assert lineage["flow_run"]["id"] == str(run.id) and lineage["flow_run"]["deployment"] == "weekly"


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Ctrl-C, as a user stops it; killed if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_worker_runs_the_deployment_when_triggered_and_promotes(first_run, prefect_api, project, local_store,
                                                                  tmp_path):
    """The work-pool route of the README, command for command: `make deploy`'s two commands, `prefect
    worker start --pool spottune-cpu` as a real process, `prefect deployment run retrain/weekly -p ...`.
    The worker's flow run works in its own checkout and retrains nothing (HEAD's dvc.lock: CI time) but an
    override that no stage reads makes a new version (another report), which it promotes; the user's
    checkout stays as it was."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:  # retrain/weekly of the tests above, served or deployed
        try:
            client.delete_deployment(read_deployment("retrain/weekly").id)
        except ObjectNotFound:
            pass
    store = open_local(local_store)
    before = store.production(NAME)["version"]

    # make deploy: the pool unless it exists, then prefect.yaml's deployments
    if subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", "spottune-cpu"], cwd=project,
                      env=clean_env(PREFECT_API_URL=prefect_api), capture_output=True).returncode != 0:
        prefect_cli("work-pool", "create", "spottune-cpu", "--type", "process", cwd=project, api=prefect_api)
    prefect_cli("--no-prompt", "deploy", "--all", cwd=project, api=prefect_api, SPOTTUNE_PROJECT_DIR=str(project))
    deployment = read_deployment("retrain/weekly")
    assert deployment.work_pool_name == "spottune-cpu"

    state = checkout_state(project)  # the user's checkout, which the worker's run must leave as it is
    log_path = tmp_path / "worker.log"
    # the worker asks for scheduled runs every second instead of every 10 (CI time) and logs at INFO (the
    # runs it submits); nothing else differs
    with open(log_path, "wb") as log:  # the child keeps its own copy of the file
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "spottune-cpu"], cwd=project,
                                  env=clean_env(PREFECT_API_URL=prefect_api, PREFECT_WORKER_QUERY_SECONDS="1",
                                                PREFECT_LOGGING_LEVEL="INFO", **local_store_env(local_store)),
                                  stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        overrides = {"data.num_workers": 0}
        out = prefect_cli("deployment", "run", "retrain/weekly", "-p", f"overrides={json.dumps(overrides)}",
                          cwd=project, api=prefect_api).stdout
        run_id = uuid.UUID(out.split("UUID:")[1].split()[0])
        deadline = time.monotonic() + 300
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    break
                assert worker.poll() is None, f"the worker exited:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, (run.state, log_path.read_text()[-3000:])
                time.sleep(1)
        assert run.state.is_completed(), (run.state, log_path.read_text()[-3000:])
    finally:
        stop(worker)
    print(f"worker started, run triggered and completed in {time.monotonic() - started:.0f} s")
    # the worker, not this process, ran it: the pool's run, which the worker's log says it submitted
    assert run.deployment_id == deployment.id and run.work_pool_name == "spottune-cpu"
    assert run.parameters["overrides"] == overrides
    assert f"submitting flow run '{run_id}'" in log_path.read_text(), log_path.read_text()[-3000:]
    pointer = store.production(NAME)
    assert pointer["version"] != before and pointer["history"][-1]["version"] == before
    version_dir = local_store / "models" / NAME / "versions" / pointer["version"]
    assert json.loads((version_dir / "params.json").read_text())["optim"]["max_steps_per_epoch"] == 1
    gate = json.loads((version_dir / "gate.json").read_text())
    assert gate["passed"] and gate["details"]["decision"] == "promote"
    assert "data.num_workers=0" in (version_dir / "report.md").read_text()
    flow_run = json.loads((version_dir / "lineage.json").read_text())["flow_run"]
    assert flow_run["id"] == str(run_id) and flow_run["deployment"] == "weekly", flow_run
    assert flow_run["deployment_id"] == str(deployment.id)
    store.verify_version(NAME, pointer["version"])
    assert checkout_state(project) == state and not leftover_checkouts(project)
    assert run.name in experiments(project)

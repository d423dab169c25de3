"""Lineage without training: what a real git checkout records (commit, dirty, the diff), the lineage files
stored and verified with a version on both backends, `spottune models show`, and what `spottune
reproduce` refuses before any work. The end-to-end reproduction (real training) is tests/test_reproduce.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from spottune.config import load_params
from spottune.errors import ConfigError
from spottune.lineage import collect_lineage, find_project
from spottune.settings import StoreSettings
from spottune.store import LINEAGE, ArtifactStore, IntegrityError, Lineage, open_store

from support import clean_env, passed_gate, spottune

NAME = "fashion"


def git(*args: str, cwd: Path) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def project(tmp_path, finished_run) -> Path:
    """A committed git checkout with the pipeline's files and a finished run under runs/ (ignored)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(Path(__file__).resolve().parents[1] / name, repo / name)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    (repo / "metrics").mkdir()
    (repo / "metrics" / "spottune.json").write_text("{}\n")
    (repo / "train.py").write_text("print('train')\n")
    (repo / ".gitignore").write_text("/runs/\n")
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "project", cwd=repo)
    shutil.copytree(finished_run, repo / "runs" / "linear")
    return repo


def lineage_of(project: Path, **kw) -> Lineage:
    return collect_lineage(project, project / "runs" / "linear", load_params(project / "params.yaml"),
                           data_version="0123456789abcdef0123456789abcdef.dir", **kw)


def test_lineage_names_the_commit_and_only_changes_the_pipeline_did_not_make(project, finished_run):
    clean = lineage_of(project)
    r = clean.record
    assert r["git_commit"] == git("rev-parse", "HEAD", cwd=project) and r["git_dirty"] is False
    assert r["dvc_lock_sha256"] == hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    assert set(clean.files) == {"dvc.lock", "data.dvc"}
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert r["threads"] == metrics["threads"] >= 1 and r["device"] == "cpu" and r["run"] == "runs/linear"
    gate = load_params(project / "params.yaml").gate.model_dump(mode="json", by_alias=True)
    assert r["params"]["gate"] == gate and r["params"]["publish"]["promote"] is True
    assert r["packages"]["python"] and r["packages"]["torch"] and r["packages"]["dvc"]
    assert r["flow_run"] is None and r["experiment"] is None
    assert find_project(project / "runs" / "linear") == project

    # what a run writes (dvc.lock, data.dvc, metrics/) leaves it clean, and is stored as it is now
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {prepare: {}}\n")
    (project / "metrics" / "spottune.json").write_text('{"test_accuracy": 0.5}\n')
    after_run = lineage_of(project, experiment="exp-1")
    assert after_run.record["git_dirty"] is False and after_run.record["experiment"] == "exp-1"
    assert after_run.files["dvc.lock"] == (project / "dvc.lock").read_bytes()

    # an edit to a tracked file makes it dirty; its diff rebuilds the edit on a checkout of the commit
    (project / "train.py").write_text("print('train harder')\n")
    git("add", "train.py", cwd=project)  # staged or not, it is a change against the commit
    dirty = lineage_of(project)
    assert dirty.record["git_dirty"] is True and b"train harder" in dirty.files["git.diff"]
    assert b"dvc.lock" not in dirty.files["git.diff"]
    other = project.parent / "other"
    git("worktree", "add", "-q", "--detach", str(other), dirty.record["git_commit"], cwd=project)
    (project.parent / "diff").write_bytes(dirty.files["git.diff"])
    git("apply", str(project.parent / "diff"), cwd=other)
    assert (other / "train.py").read_text() == "print('train harder')\n"


def test_outside_a_git_checkout_nothing_is_claimed(tmp_path, finished_run):
    shutil.copytree(finished_run, tmp_path / "runs" / "linear")
    (tmp_path / "params.yaml").write_text("optim: {epochs: 1}\n")
    r = lineage_of(tmp_path).record
    assert (r["git_commit"], r["git_dirty"], r["dvc_lock_sha256"]) == (None, None, None)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return open_store(StoreSettings(store_backend="local", store_root=tmp_path / "artifacts"))
    import boto3

    moto = request.getfixturevalue("moto")
    bucket = f"lineage-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return open_store(StoreSettings(store_backend="s3", s3_bucket=bucket, s3_endpoint_url=moto.url))


def test_lineage_files_are_stored_listed_and_verified(store, project, tmp_path):
    run = project / "runs" / "linear"
    first = lineage_of(project, flow_run={"id": "run-1", "name": "a", "deployment": None, "deployment_id": None})
    result = store.publish(run, NAME, gate=passed_gate(), lineage=first)
    manifest, _ = store.read_manifest(NAME, result.version)
    assert {LINEAGE, "dvc.lock", "data.dvc"} <= set(manifest["files"])
    assert json.loads(store.read_verified(NAME, result.version, LINEAGE)) == first.record
    fetched = store.fetch_version(NAME, result.version, tmp_path / "fetched")
    assert (fetched / "dvc.lock").read_bytes() == (project / "dvc.lock").read_bytes()

    # the same run published again by another flow run: the same version, the first record kept
    again = store.publish(run, NAME, gate=passed_gate(), lineage=lineage_of(project, flow_run={"id": "run-2"}))
    assert again.version == result.version and again.already_published
    assert json.loads(store.read_verified(NAME, result.version, LINEAGE))["flow_run"]["id"] == "run-1"
    # the same weights from another commit: another version
    (project / "train.py").write_text("print('changed')\n")
    git("commit", "-q", "-am", "change", cwd=project)
    moved = store.publish(run, NAME, gate=passed_gate(), lineage=lineage_of(project))
    assert moved.version != result.version and moved.version[:12] == result.version[:12]

    # a lineage.json changed in the store is refused by show, fetch and promote
    key = store.version_key(NAME, result.version, LINEAGE)
    store.backend.put_bytes(key, json.dumps({**first.record, "git_commit": "0" * 40}).encode())
    with pytest.raises(IntegrityError, match="lineage.json does not match its manifest"):
        store.read_verified(NAME, result.version, LINEAGE)
    with pytest.raises(IntegrityError, match="lineage.json"):
        store.fetch_version(NAME, result.version, tmp_path / "fetched-again")
    with pytest.raises(IntegrityError, match="lineage.json"):
        store.promote(NAME, result.version)


def test_a_manifest_naming_lineage_files_without_lineage_json_is_refused(store, project):
    result = store.publish(project / "runs" / "linear", NAME, gate=passed_gate(), lineage=lineage_of(project))
    key = store.version_key(NAME, result.version, "MANIFEST.json")
    manifest = json.loads(store.backend.get_bytes(key)[0])
    del manifest["files"][LINEAGE]
    store.backend.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(IntegrityError, match="without lineage.json"):
        store.read_manifest(NAME, result.version)


# ---------------------------------------------------------------------------------------------
# The command line: publish, models show, reproduce's refusals


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    return clean_env(SPOTTUNE_STORE_BACKEND="local", SPOTTUNE_STORE_ROOT=str(tmp_path / "artifacts"),
                     SPOTTUNE_MODEL_CACHE_DIR=str(tmp_path / "cache"))


@pytest.mark.slow
def test_models_show_latest_production_and_a_version_without_lineage(project, finished_run, cli_env, tmp_path):
    r = spottune("publish", finished_run, "--name", NAME, "--version", "old", cwd=tmp_path, env=cli_env)
    assert r.returncode == 0 and "no lineage recorded" in r.stdout, r.stderr
    r = spottune("publish", "runs/linear", "--name", NAME, "--version", "new", cwd=project, env=cli_env)
    assert r.returncode == 0, r.stderr
    # published by hand, without the gate stage's record: production only by a forced, audited promotion
    assert spottune("promote", NAME, "old", "--force", "--reason", "test", cwd=tmp_path, env=cli_env).returncode == 0

    latest = json.loads(spottune("models", "show", f"{NAME}@latest", "--json", cwd=tmp_path, env=cli_env).stdout)
    assert latest["version"] == "new" and not latest["production"]
    assert latest["lineage"]["git_commit"] == git("rev-parse", "HEAD", cwd=project)
    assert latest["lineage"]["data_version"] == "0123456789abcdef0123456789abcdef.dir"  # data.dvc's, by default
    assert latest["gate"]["passed"] is None and "history" not in latest["metrics"]  # no gate record: no verdict
    assert latest["metrics"]["test"]["accuracy"] == json.loads((finished_run / "metrics.json").read_text())["test"]["accuracy"]

    prod = json.loads(spottune("models", "show", f"{NAME}@production", "--json", cwd=tmp_path, env=cli_env).stdout)
    assert prod["version"] == "old" and prod["production"] and prod["lineage"] is None
    text = spottune("models", "show", f"{NAME}@new", cwd=tmp_path, env=cli_env).stdout
    assert "git commit  " + latest["lineage"]["git_commit"] in text and "threads" in text
    assert "gate        none (published by hand" in text  # no verdict, not a failure
    assert "none recorded" in spottune("models", "show", f"{NAME}@old", cwd=tmp_path, env=cli_env).stdout

    missing = spottune("models", "show", f"{NAME}@nope", cwd=tmp_path, env=cli_env)
    assert missing.returncode == 4 and "no such version" in missing.stderr and "Traceback" not in missing.stderr


def publish_with(store_root: Path, project: Path, version: str, **record) -> None:
    store = open_store(StoreSettings(store_backend="local", store_root=store_root))
    lineage = lineage_of(project)
    files = {k: v for k, v in lineage.files.items() if k != "git.diff" or record.get("git_dirty")}
    store.publish(project / "runs" / "linear", NAME, version, gate=passed_gate(),
                  lineage=Lineage({**lineage.record, **record}, files))


@pytest.mark.parametrize("record, message", [
    ({"git_commit": "1" * 40}, "which is not in the repository"),
    ({"git_commit": None}, "records no git commit"),
    ({"git_dirty": True}, "dirty checkout and its git.diff is not stored"),
    ({"run": "../elsewhere"}, "records no run folder inside the project"),
])
def test_reproduce_refuses_what_it_cannot_rebuild_before_any_work(project, cli_env, tmp_path, record, message):
    publish_with(Path(cli_env["SPOTTUNE_STORE_ROOT"]), project, "v1", **record)
    out = tmp_path / "repro"
    r = spottune("reproduce", f"{NAME}@v1", "--out", out, cwd=project, env=cli_env)
    assert r.returncode == 3 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_reproduce_refuses_a_version_without_lineage_and_a_busy_out(project, finished_run, cli_env, tmp_path):
    assert spottune("publish", finished_run, "--name", NAME, "--version", "old", cwd=tmp_path, env=cli_env).returncode == 0
    r = spottune("reproduce", f"{NAME}@old", "--out", tmp_path / "repro", cwd=project, env=cli_env)
    assert r.returncode == 3 and "published without a lineage" in r.stderr, r.stderr
    publish_with(Path(cli_env["SPOTTUNE_STORE_ROOT"]), project, "v1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    r = spottune("reproduce", f"{NAME}@v1", "--out", tmp_path / "busy", cwd=project, env=cli_env)
    assert r.returncode == 3 and "is not an empty folder" in r.stderr, r.stderr
    r = spottune("reproduce", f"{NAME}@v1", "--out", tmp_path / "x", "--repo", tmp_path, cwd=project, env=cli_env)
    assert r.returncode == 3 and "not inside a git repository" in r.stderr, r.stderr


def test_metric_differences_ignore_timings_and_name_the_key():
    from spottune.reproduce import metric_differences

    a = {"test": {"accuracy": 0.5, "seconds": 1.0}, "history": [{"train": {"loss": 1.0, "images_per_s": 9}}]}
    b = {"test": {"accuracy": 0.5, "seconds": 2.0}, "history": [{"train": {"loss": 1.0, "images_per_s": 7}}]}
    assert metric_differences(a, b) == []
    b["history"][0]["train"]["loss"] = 1.0 + 1e-7
    assert metric_differences(a, b) == ["history[0].train.loss: recorded 1.0, reproduced 1.0000001"]
    assert metric_differences(a, b, tolerance=1e-6) == []
    assert metric_differences({"threads": 1}, {"threads": 2}) == ["threads: recorded 1, reproduced 2"]
    assert metric_differences({"x": True}, {"x": 1}) == ["x: recorded true, reproduced 1"]


def test_yaml_of_recorded_params_loads_as_the_same_params(project):
    record = lineage_of(project).record["params"]
    path = project / "written.yaml"
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    from spottune.lineage import params_record

    assert params_record(load_params(path)) == record
    with pytest.raises(ConfigError):
        load_params(project / "nope.yaml")


def test_a_served_versions_metadata_carries_its_lineage(tmp_path):
    from spottune.model_cache import version_metadata

    assert version_metadata(tmp_path)["lineage"] is None  # a version published without one
    (tmp_path / LINEAGE).write_text(json.dumps({"git_commit": "abc", "git_dirty": False}))
    assert version_metadata(tmp_path)["lineage"] == {"git_commit": "abc", "git_dirty": False}

"""The retrain flow for real: real `dvc repro` in a temporary git repository holding this project's
pipeline, Prefect's test server, the local store and a moto S3 server process on 127.0.0.1.

One tiny training (12 train / 6 test images per class, 32 px, 1 step per epoch) is shared by the
tests: later runs pass the same training overrides, so DVC reruns nothing and only the gate,
report, publish and promote steps differ; so do the runs that Prefect starts through a deployment
(`python -m flows.serve`, and a `prefect worker start` process on the prefect.yaml deployment).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("dvc")
if importlib.util.find_spec("prefect") is None:  # not imported here: PREFECT_HOME is set first (prefect_api)
    pytest.skip("prefect is not installed", allow_module_level=True)

from support import PROJECT, MotoServer, new_pipeline_repo, set_params  # noqa: E402
BIN = Path(sys.executable).parent
NAME = "fashion-test"
TRAINING = {"optim.max_steps_per_epoch": 1}  # one run's override, repeated so later runs retrain nothing
sys.path.insert(0, str(PROJECT))  # `flows` is not an installed package: it runs from the repository root



def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPOTTUNE_REMOTE_", "PREFECT_API"))}
    return env | {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1", "SPOTTUNE_DEVICE": "cpu",
        "SPOTTUNE_PROGRESS": "false", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org", "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra,
    }


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r


def new_repo(path: Path) -> Path:
    repo = new_pipeline_repo(path, with_flows=True)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """Prefect's test server (one per module) with its own PREFECT_HOME; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "SPOTTUNE_DEVICE": "cpu",
           "SPOTTUNE_PROGRESS": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60):
            yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC repository with this project's pipeline and flows, tiny data and tiny params."""
    repo = new_repo(tmp_path_factory.mktemp("clone") / "repo")
    sh(sys.executable, "-m", "spottune.cli", "data", "fashion-mnist", "--out", "data/fashion-mnist",
       "--train-per-class", "12", "--test-per-class", "6", "--track", cwd=repo)
    set_params(repo, prepare={"val_fraction": 0.25}, validate={"min_images_per_class": 2, "min_rows": 10},
               data={"image_size": 32, "batch_size": 16, "eval_batch_size": 64},
               optim={"epochs": 1, "max_steps_per_epoch": 2},
               gate={"rule": "non_inferiority", "margin": 1.0, "floor": 0.0},  # any tiny model passes
               publish={"model_name": NAME, "promote": True})
    sh("git", "add", ".", cwd=repo)
    sh("git", "commit", "-q", "-m", "pipeline on a tiny dataset", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def local_store(project, tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("artifacts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPOTTUNE_STORE_BACKEND", "local")
        mp.setenv("SPOTTUNE_STORE_ROOT", str(root))
        mp.setenv("SPOTTUNE_MODEL_CACHE_DIR", str(root.parent / "model-cache"))  # the gate stage's champion
        yield root


def open_local(root: Path):
    from spottune.config import StoreSettings
    from spottune.store import open_store

    return open_store(StoreSettings(store_backend="local", store_root=root))


@pytest.fixture(scope="module")
def first_run(prefect_api, project, local_store) -> dict[str, Any]:
    """The one full run: every stage, with a training override, promoting into the local store."""
    from flows.retrain import retrain

    before = (project / "params.yaml").read_bytes()
    started = time.monotonic()
    result = retrain(overrides=TRAINING, project_dir=str(project))
    result["_seconds"] = time.monotonic() - started
    result["_params_before"] = before
    return result


def task_run_names(flow_run_name_or_id: Any = None) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    return [r.name for r in runs]


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
    for step in ("version-data", "validate", "train-train_finetune", "train-train_spottune", "evaluate", "gate",
                 "report", "publish", "promote"):
        assert any(n.startswith(step) for n in names), (step, names)
    # the data version is data.dvc's md5
    assert r["data_version"] == yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    # the override was used by DVC and recorded, and params.yaml is byte-for-byte restored
    assert (project / "params.yaml").read_bytes() == r["_params_before"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train_spottune"]["params"]["params.yaml"]["optim"]["max_steps_per_epoch"] == 1
    published = json.loads((local_store / "models" / NAME / "versions" / r["version"] / "params.json").read_text())
    assert published["optim"]["max_steps_per_epoch"] == 1
    # the report: comparison, statistics, routing per class (table and PNG), published with the model
    report = (local_store / "models" / NAME / "versions" / r["version"] / "report.md").read_text()
    for words in ("test top-1", "McNemar", "bootstrap CI", "Which blocks SpotTune tunes, per class",
                  "data:image/png;base64,", "optim.max_steps_per_epoch=1", r["data_version"]):
        assert words in report, words
    assert (project / "reports" / "routing_per_class.png").read_bytes().startswith(b"\x89PNG")


def test_report_is_a_prefect_artifact(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["spottune-retrain-report"])))
    assert arts and arts[0].type == "markdown" and "Which blocks SpotTune tunes" in arts[0].data


def test_a_failed_gate_publishes_a_candidate_that_never_becomes_production(first_run, project, local_store):
    from flows.retrain import retrain
    from spottune.store import PromotionRefused

    set_params(project, gate={"floor": 1.01})  # a stricter gate is a change to params.yaml, not an override
    try:
        r = retrain(overrides=TRAINING, project_dir=str(project))
    finally:
        sh("git", "checkout", "-q", "params.yaml", cwd=project)
    assert not r["promoted"] and not r["gate_passed"]
    assert r["status"].startswith("not promoted:") and "< floor 1.0100" in r["status"], r["status"]
    record = json.loads((project / "metrics" / "gate.json").read_text())
    assert record["decision"] == "refuse" and record["floor"] == 1.01
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


def test_gate_overrides_are_refused_before_any_work(first_run, project, capsys):
    from flows.retrain import main, retrain
    from spottune.errors import ConfigError

    lock = (project / "dvc.lock").read_bytes()
    params = (project / "params.yaml").read_bytes()
    gate = (project / "metrics" / "gate.json").read_bytes()
    with pytest.raises(ConfigError, match=r"gate.floor, gate.margin refused: the promotion gate is params.yaml"):
        retrain(overrides={**TRAINING, "gate.floor": 0.0, "gate.margin": 1.0}, project_dir=str(project))
    assert main(["--project-dir", str(project), "--set", "gate.rule=non_inferiority"]) == 2
    assert "error: flow override: gate.rule refused" in capsys.readouterr().err
    assert (project / "dvc.lock").read_bytes() == lock and (project / "params.yaml").read_bytes() == params
    assert (project / "metrics" / "gate.json").read_bytes() == gate


def test_a_bad_override_fails_before_any_work(first_run, project):
    from flows.retrain import retrain
    from spottune.errors import ConfigError

    lock = (project / "dvc.lock").read_bytes()
    params = (project / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="optim.epoch"):
        retrain(overrides={"optim.epoch": 1}, project_dir=str(project))
    assert (project / "dvc.lock").read_bytes() == lock and (project / "params.yaml").read_bytes() == params


# ---------------------------------------------------------------------------------------------
# S3: an upload that fails half-way, then re-runs


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory) -> Iterator[str]:
    """moto's S3 server as a child process on a free loopback port; dummy credentials in the env."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    url = server.url
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(k, raising=False)
            for k, v in env.items():
                mp.setenv(k, v)
            mp.setenv("NO_PROXY", "127.0.0.1")
            yield url
    finally:
        server.stop()


def test_rerun_after_an_upload_failure_neither_duplicates_nor_corrupts(first_run, project, moto_url, monkeypatch):
    import boto3

    import flows.retrain as flows_retrain
    from spottune.config import StoreSettings
    from spottune.store import MANIFEST, VERSION_FILES, S3Backend, open_store

    bucket = f"models-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=bucket)
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
        flows_retrain.retrain(overrides=TRAINING, project_dir=str(project))
    assert len(attempts) == 4  # first try + 3 retries
    [row] = store.list_versions(NAME)
    assert not row.complete and row.problem and "MANIFEST" in row.problem
    assert store.production(NAME) is None

    monkeypatch.setattr(S3Backend, "put_file", real_put)
    r = flows_retrain.retrain(overrides=TRAINING, project_dir=str(project))
    assert r["promoted"] and r["version"] == row.version
    assert {"model.safetensors", "model.json"} <= set(r["skipped"]) and "metrics.json" in r["uploaded"]
    keys = set(store.backend.list_sizes(store.model_key(NAME, "versions") + "/"))
    assert keys == {store.version_key(NAME, r["version"], f) for f in (*VERSION_FILES, MANIFEST)}
    store.verify_version(NAME, r["version"])

    again = flows_retrain.retrain(overrides=TRAINING, project_dir=str(project))
    assert again["already_published"] and again["version"] == r["version"] and again["promoted"]
    assert set(store.backend.list_sizes(store.model_key(NAME, "versions") + "/")) == keys
    assert [a["action"] for a in store.audit_trail(NAME)] == ["promote"]
    assert store.production(NAME)["version"] == r["version"]


# ---------------------------------------------------------------------------------------------
# Schedules: prefect.yaml on a process pool, and `python -m flows.serve` triggered through Prefect


def prefect_cli(*args: str, cwd: Path, api: str, **env: str) -> subprocess.CompletedProcess:
    return sh(str(BIN / "prefect"), *args, cwd=cwd, env=_env(PREFECT_API_URL=api, **env))


def read_deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


@pytest.mark.slow
def test_prefect_yaml_deploys_the_weekly_schedule_on_a_process_pool(prefect_api, project):
    prefect_cli("work-pool", "create", "spottune-cpu", "--type", "process", cwd=project, api=prefect_api)
    prefect_cli("--no-prompt", "deploy", "--all", cwd=project, api=prefect_api, SPOTTUNE_PROJECT_DIR=str(project))
    d = read_deployment("retrain/weekly")
    assert d.work_pool_name == "spottune-cpu"
    assert [s.schedule.cron for s in d.schedules] == ["0 3 * * 1"]
    assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]
    listed = prefect_cli("deployment", "ls", cwd=project, api=prefect_api).stdout
    assert "retrain/weekly" in listed
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_deployment(d.id)  # the serve test below creates retrain/weekly its own way


@pytest.mark.slow
def test_served_deployment_runs_when_triggered_and_promotes(first_run, prefect_api, project, local_store, tmp_path):
    from prefect.deployments import run_deployment

    log = open(tmp_path / "serve.log", "wb")
    env = _env(PREFECT_API_URL=prefect_api)
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
        # the served process runs the flow; an override that no stage reads makes a new version (same
        # weights, no retraining: CI time; another report), which the gate passes and it promotes
        run = run_deployment("retrain/weekly", parameters={"overrides": {**TRAINING, "publish.promote": True}},
                             timeout=600)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    store = open_local(local_store)
    pointer = store.production(NAME)
    assert pointer["version"] != first_run["version"]
    assert pointer["history"][-1]["version"] == first_run["version"]
    params = json.loads((local_store / "models" / NAME / "versions" / pointer["version"] / "params.json").read_text())
    assert params["optim"]["max_steps_per_epoch"] == 1
    gate = json.loads((local_store / "models" / NAME / "versions" / pointer["version"] / "gate.json").read_text())
    assert gate["passed"] and gate["details"]["decision"] == "promote" and gate["details"]["format"] == "spottune-gate/1"


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
    The worker's flow run retrains nothing (same training overrides as the other tests: CI time) but an
    override that no stage reads makes a new version (another report), which it promotes."""
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
                      env=_env(PREFECT_API_URL=prefect_api), capture_output=True).returncode != 0:
        prefect_cli("work-pool", "create", "spottune-cpu", "--type", "process", cwd=project, api=prefect_api)
    prefect_cli("--no-prompt", "deploy", "--all", cwd=project, api=prefect_api, SPOTTUNE_PROJECT_DIR=str(project))
    deployment = read_deployment("retrain/weekly")
    assert deployment.work_pool_name == "spottune-cpu"

    log_path = tmp_path / "worker.log"
    log = open(log_path, "wb")
    # the worker asks for scheduled runs every second instead of every 10 (CI time) and logs at INFO (the
    # runs it submits); nothing else differs
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "spottune-cpu"], cwd=project,
                              env=_env(PREFECT_API_URL=prefect_api, PREFECT_WORKER_QUERY_SECONDS="1",
                                       PREFECT_LOGGING_LEVEL="INFO"),
                              stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
        overrides = {**TRAINING, "data.num_workers": 0}
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
        log.close()
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
    store.verify_version(NAME, pointer["version"])

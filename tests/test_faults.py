"""Faults for real: a training process killed with SIGKILL mid-epoch and mid-checkpoint, a DVC stage
killed and retried, the S3 server process killed in the middle of an upload and of a promotion, and
promotions racing from separate processes on the local folder and on S3.

Nothing is mocked: training runs as `python -m spottune.cli train` on real images, the store talks
HTTP to moto server processes on 127.0.0.1, and DVC runs as `python -m dvc`. A backend wrapper only
chooses *when* a fault happens (it kills the server at a chosen request); the failure itself is the
real one (connection refused). moto keeps its state in memory, so "the server comes back" means a
new server on the same port holding the objects stored before the outage (snapshot_bucket /
restore_bucket): what durable S3 keeps through an outage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import yaml

from spottune.errors import StoreError
from spottune.settings import StoreSettings
from spottune.store import MANIFEST, VERSION_FILES, ArtifactStore, open_store

from support import (
    PROJECT,
    MotoServer,
    clean_env,
    dummy_aws_env,
    git_pipeline_repo,
    new_bucket,
    passed_gate,
    restore_bucket,
    set_params,
    snapshot_bucket,
)

NAME = "digits"
PASS = passed_gate()
BIN = Path(sys.executable).parent
# Three epochs of three steps: each epoch lasts seconds on CPU, so a kill lands well inside one.
TRAIN = {
    "data": {"image_size": 32, "batch_size": 16, "eval_batch_size": 200},
    "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "method": "spottune"},
    "optim": {"epochs": 3, "lr_head": 0.02, "max_steps_per_epoch": 3},
}


def child_env(**extra: str) -> dict[str, str]:
    """One intra-op thread: CPU results depend on the thread count, and on a shared 2-core machine
    several busy-waiting OpenMP pools slow training tenfold."""
    return {**os.environ, "SPOTTUNE_DEVICE": "cpu", "SPOTTUNE_PROGRESS": "false", "DVC_NO_ANALYTICS": "1",
            "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **extra}


@contextmanager
def one_thread() -> Iterator[None]:
    """This process trains as the children do (child_env), so their weights can be compared bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """Real scikit-learn digits, 24 train / 6 test images per class: evaluation takes a moment only."""
    from spottune.data.sources import materialise

    root = tmp_path_factory.mktemp("data") / "digits"
    materialise("digits", root, train_per_class=24, test_per_class=6, seed=0, log=lambda _: None)
    return root


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (it runs in its own session): a preempted machine."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def same_weights(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ---------------------------------------------------------------------------------------------
# Preemption of training


def train_cmd(params_file: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spottune.cli", "train", "--params", str(params_file), "--out", str(out), *extra]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(small_digits, tmp_path, runtime):
    from spottune.config import load_params
    from spottune.engine import load_checkpoint
    from spottune.training import fit

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({**TRAIN, "data": {**TRAIN["data"], "root": str(small_digits)}}))
    run = tmp_path / "run"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(train_cmd(params_file, run), env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(lambda: (run / "checkpoint.pt").exists() or proc.poll() is not None, 180, "epoch 0's checkpoint")
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.5)  # into epoch 1's training steps (an epoch takes seconds here)
        finally:
            kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0, "the kill should land in epoch 1, before its checkpoint"
    assert not (run / "model.safetensors").exists()

    resumed = subprocess.run(train_cmd(params_file, run, "--resume"), env=child_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after epoch 0" in resumed.stdout
    assert [h["epoch"] for h in load_checkpoint(run / "checkpoint.pt")["history"]] == [0, 1, 2]

    with one_thread():
        fit(load_params(params_file, []), tmp_path / "straight", runtime, log=lambda _: None)  # never interrupted
    same_weights(tmp_path / "straight" / "model.safetensors", run / "model.safetensors")
    assert list(run.glob(".checkpoint.pt.tmp-*")) == []


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from spottune.atomic import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half of a new checkpoint" * 4096)
            f.flush()
        print("writing", flush=True)
        time.sleep(600)  # killed here, mid-write

    atomic_write(Path(sys.argv[1]), write)
""")


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    import torch

    from spottune.engine import load_checkpoint, save_checkpoint

    target = tmp_path / "run" / "checkpoint.pt"
    old = {"epoch": 0, "model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"epoch": 0}]}
    save_checkpoint(target, old)
    before = target.read_bytes()

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        [partial] = target.parent.glob(".checkpoint.pt.tmp-*")
        assert partial.stat().st_size > 0 and str(proc.pid) in partial.name
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()

    assert target.read_bytes() == before
    loaded = load_checkpoint(target)
    assert loaded["epoch"] == 0 and torch.equal(loaded["model"]["w"], old["model"]["w"])
    assert partial.exists(), "a killed writer cannot clean up after itself"

    save_checkpoint(target, {**old, "epoch": 1})  # the next write (the resumed run) replaces it and cleans up
    assert load_checkpoint(target)["epoch"] == 1
    assert list(target.parent.iterdir()) == [target], "the dead writer's temporary file must be removed"


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    """Cleaning up is only for dead processes: two live writers must not delete each other's file."""
    from spottune.atomic import atomic_write, remove_stale_temporaries

    target = tmp_path / "metrics.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = target.with_name(f".metrics.json.tmp-{os.uname().nodename}-{sleeper.pid}")
        live.write_bytes(b"in progress")
        atomic_write(target, lambda tmp: tmp.write_text("{}"))
        assert live.exists() and target.read_text() == "{}"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(target) == [live] and not live.exists()


# ---------------------------------------------------------------------------------------------
# A retried pipeline run: `dvc repro` of a training stage after the previous one was killed


@pytest.fixture
def pipeline_repo(tmp_path) -> Path:
    repo = git_pipeline_repo(tmp_path / "repo")
    made = subprocess.run([sys.executable, "-m", "spottune.cli", "data", "digits", "--out", "data/digits",
                           "--train-per-class", "12", "--test-per-class", "6"], cwd=repo, env=child_env(),
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    set_params(repo, data={"root": "data/digits", **TRAIN["data"]}, prepare={"val_fraction": 0.25},
               validate={"min_images_per_class": 2, "min_rows": 10}, optim={**TRAIN["optim"], "epochs": 2})
    return repo


@pytest.mark.slow
@pytest.mark.integration
def test_a_retried_training_stage_resumes_from_the_last_checkpoint(pipeline_repo, runtime, monkeypatch):
    """What the retrain flow runs on a retry: `dvc repro train_spottune` again. DVC must not delete the
    checkpoint of the killed run (the stage's output is persistent) and the stage resumes from it."""
    from spottune.config import load_params
    from spottune.engine import load_checkpoint
    from spottune.training import fit

    repo = pipeline_repo
    run = repo / "runs" / "spottune"
    with open(repo.parent / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train_spottune"], cwd=repo, env=child_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: (run / "checkpoint.pt").exists() or proc.poll() is not None, 300, "epoch 0's checkpoint")
            assert proc.poll() is None, (repo.parent / "killed.log").read_text()
            time.sleep(0.5)
        finally:
            kill_group(proc)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0

    retry = subprocess.run([sys.executable, "-m", "dvc", "repro", "train_spottune"], cwd=repo, env=child_env(),
                           capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "resuming runs/spottune after epoch 0" in retry.stdout + retry.stderr
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "train_spottune"], cwd=repo, env=child_env(),
                            capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # dvc.lock records the resumed run like any other

    monkeypatch.chdir(repo)  # the stage's own params: params.yaml plus the stage command's overrides
    params = load_params(Path("params.yaml"), ["model.method=spottune", "data.manifest=prepared/manifest.csv"])
    with one_thread():
        fit(params, repo.parent / "straight", runtime, log=lambda _: None)
    same_weights(repo.parent / "straight" / "model.safetensors", run / "model.safetensors")

    # A finished run is never resumed: rerunning the stage (as after a code change) trains from scratch.
    forced = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "train_spottune"],
                            cwd=repo, env=child_env(), capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert "resuming" not in forced.stdout + forced.stderr
    assert [h["epoch"] for h in load_checkpoint(run / "checkpoint.pt")["history"]] == [0, 1]
    same_weights(repo.parent / "straight" / "model.safetensors", run / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Storage outages: the S3 server process killed mid-upload and mid-promotion


@pytest.fixture(scope="module")
def aws() -> Iterator[None]:
    """Dummy credentials in boto3's standard chain (environment) and nothing else from this machine."""
    with dummy_aws_env():
        yield


@pytest.fixture(scope="module")
def finished_run(small_digits, tmp_path_factory) -> Path:
    """A real finished run (a linear probe, one step) to publish."""
    from spottune.config import validate_params
    from spottune.settings import RuntimeSettings
    from spottune.training import fit

    params = validate_params({**TRAIN, "data": {**TRAIN["data"], "root": str(small_digits)},
                              "model": {**TRAIN["model"], "method": "linear"},
                              "optim": {"epochs": 1, "max_steps_per_epoch": 1}}, "test")
    out = tmp_path_factory.mktemp("runs") / "linear"
    fit(params, out, RuntimeSettings(device="cpu", progress=False), log=lambda _: None)
    return out


def s3_settings(url: str, bucket: str, **kw: Any) -> StoreSettings:
    base = {"s3_max_attempts": 3, "s3_connect_timeout_s": 1, "s3_read_timeout_s": 5}
    return StoreSettings(store_backend="s3", s3_bucket=bucket, s3_endpoint_url=url, store_prefix="team",
                         s3_multipart_threshold_mb=5, s3_multipart_chunksize_mb=5, **(base | kw))


class FaultAt:
    """Delegates every call to a real backend; runs `fault` once, just before the first call `when` selects."""

    def __init__(self, inner: Any, when: Callable[[str, str], bool], fault: Callable[[], None]) -> None:
        self.inner, self.when, self.fault, self.fired = inner, when, fault, False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in ("put_file", "put_bytes", "get_bytes", "iter_chunks"):
            return attr

        def call(key: str, *args: Any, **kw: Any) -> Any:
            if not self.fired and self.when(name, key):
                self.fired = True
                self.fault()
            return attr(key, *args, **kw)

        return call


class Outage:
    """One S3 server process that can crash and come back on the same port with what it had stored."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = MotoServer(tmp / "moto-0.log")
        self.bucket = f"models-{uuid.uuid4().hex[:12]}"
        restore_bucket(self.server.url, self.bucket, {})
        self.kept: dict[str, bytes] | None = None

    def crash(self) -> None:
        self.kept = snapshot_bucket(self.server.url, self.bucket)
        self.server.kill()

    def come_back(self) -> None:
        assert self.kept is not None
        self.server = MotoServer(self.tmp / "moto-1.log", port=self.server.port)
        restore_bucket(self.server.url, self.bucket, self.kept)


@pytest.fixture
def outage(aws, tmp_path) -> Iterator[Outage]:
    o = Outage(tmp_path)
    yield o
    o.server.stop() if o.server.proc.poll() is None else None


def count_attempts(store: ArtifactStore) -> list[str]:
    """URLs of every HTTP request the store's own client sends (botocore's event hook: observation only)."""
    sent: list[str] = []
    store.backend.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    return sent


@pytest.mark.integration
def test_s3_killed_mid_upload_retries_then_names_the_endpoint_and_a_rerun_completes_once(outage, finished_run):
    settings = s3_settings(outage.server.url, outage.bucket)
    store = open_store(settings)
    store.publish(finished_run, NAME, "v0", gate=PASS)
    store.promote(NAME, "v0")
    sent = count_attempts(store)
    third = store.version_key(NAME, "v1", VERSION_FILES[2])
    crashing = ArtifactStore(FaultAt(store.backend, lambda op, key: op == "put_file" and key == third, outage.crash),
                             store.prefix)

    with pytest.raises(StoreError) as failed:
        crashing.publish(finished_run, NAME, "v1", gate=PASS)
    message = str(failed.value)
    assert outage.server.url in message and f"s3://{outage.bucket}/{third}" in message, message
    assert "unreachable" in message
    assert sum(third in url for url in sent) == settings.s3_max_attempts, "botocore retries, then gives up"

    outage.come_back()
    store = open_store(settings)
    assert store.production(NAME)["version"] == "v0"
    rows = {r.version: r for r in store.list_versions(NAME)}
    assert not rows["v1"].complete and "MANIFEST" in rows["v1"].problem
    again = store.publish(finished_run, NAME, "v1", gate=PASS)
    assert again.skipped == list(VERSION_FILES[:2]) and again.uploaded == list(VERSION_FILES[2:])
    keys = set(store.backend.list_sizes(store.version_key(NAME, "v1") + "/"))
    assert keys == {store.version_key(NAME, "v1", f) for f in (*VERSION_FILES, MANIFEST)}
    assert [(r.version, r.complete) for r in store.list_versions(NAME)] == [("v0", True), ("v1", True)]
    assert store.promote(NAME, "v1")["version"] == "v1"


@pytest.mark.integration
def test_s3_killed_between_two_parts_of_the_weights_fails_clearly_and_a_rerun_completes(outage, finished_run):
    """The crash lands inside one object: after the first part of the multipart weights upload arrived."""
    settings = s3_settings(outage.server.url, outage.bucket, s3_max_attempts=2)
    store = open_store(settings)
    weights = store.version_key(NAME, "v1", VERSION_FILES[0])
    assert (finished_run / VERSION_FILES[0]).stat().st_size > 2 * settings.s3_multipart_chunksize_mb << 20
    parts: list[int] = []

    def after_part(**_: Any) -> None:
        parts.append(1)
        if len(parts) == 1:
            outage.crash()

    store.backend.client.meta.events.register("after-call.s3.UploadPart", after_part)
    with pytest.raises(StoreError) as failed:
        store.publish(finished_run, NAME, "v1", gate=PASS)
    message = str(failed.value)
    assert outage.server.url in message and f"s3://{outage.bucket}/{weights}" in message, message

    outage.come_back()
    store = open_store(settings)
    assert store.list_versions(NAME) == [], "a half-uploaded object is never visible"
    again = store.publish(finished_run, NAME, "v1", gate=PASS)
    assert again.uploaded == list(VERSION_FILES) and not again.already_published
    assert [(r.version, r.complete) for r in store.list_versions(NAME)] == [("v1", True)]
    assert store.promote(NAME, "v1")["manifest_sha256"] == again.manifest_sha256


@pytest.mark.integration
@pytest.mark.parametrize("crash_at", ["verify", "audit"])
def test_s3_killed_mid_promotion_never_leaves_an_unverified_or_unaudited_production(outage, finished_run, crash_at):
    """verify: the server dies while promote hashes the version's files (before the pointer moves).
    audit: it dies after the pointer moved, before the audit record: the retry must write that record."""
    settings = s3_settings(outage.server.url, outage.bucket, s3_max_attempts=2)
    store = open_store(settings)
    for v in ("v1", "v2"):
        store.publish(finished_run, NAME, v, gate=PASS)
    store.promote(NAME, "v1", actor="alice@ci")
    audit_prefix = store.model_key(NAME, "audit") + "/"
    if crash_at == "verify":
        when = lambda op, key: op == "iter_chunks" and key.endswith("v2/model.safetensors")
    else:
        when = lambda op, key: op == "put_bytes" and key.startswith(audit_prefix)
    crashing = ArtifactStore(FaultAt(store.backend, when, outage.crash), store.prefix)

    with pytest.raises(StoreError, match=f"endpoint {outage.server.url} is unreachable") as failed:
        crashing.promote(NAME, "v2", actor="bob@ci")
    assert f"s3://{outage.bucket}/" in str(failed.value)

    outage.come_back()
    store = open_store(settings)
    pointer = store.production(NAME)
    assert pointer["version"] == ("v1" if crash_at == "verify" else "v2")
    assert pointer["manifest_sha256"] == store.verify_version(NAME, pointer["version"])[1]

    retried = store.promote(NAME, "v2", actor="bob@ci")  # what the flow's promote task does on retry
    assert retried["version"] == "v2" and retried == store.production(NAME)
    trail = store.audit_trail(NAME)
    assert [(a["action"], a["version"], a["previous_version"], a["by"]) for a in trail] == [
        ("promote", "v1", None, "alice@ci"), ("promote", "v2", "v1", "bob@ci")]
    assert trail[1]["at"] == retried["at"] and trail[1]["manifest_sha256"] == retried["manifest_sha256"]
    store.promote(NAME, "v2")
    assert len(store.audit_trail(NAME)) == 2, "promoting the production version again records nothing new"


# ---------------------------------------------------------------------------------------------
# Concurrency: promotions from separate processes


PROMOTER = textwrap.dedent("""
    import json, sys, time
    from spottune.settings import StoreSettings
    from spottune.store import open_store

    settings, name, version, actor, start = json.loads(sys.argv[1])
    store = open_store(StoreSettings(**settings))
    time.sleep(max(0.0, start - time.time()))  # both processes start promoting at the same instant
    print(json.dumps(store.promote(name, version, actor=actor, reason="race")))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_promotions_from_two_processes_at_once_serialise_and_are_both_audited(backend, finished_run, tmp_path,
                                                                              request):
    if backend == "s3":
        request.getfixturevalue("aws")
        server = MotoServer(tmp_path / "moto.log")
        request.addfinalizer(server.stop)
        settings = s3_settings(server.url, new_bucket(server.url))
    else:
        settings = StoreSettings(store_backend="local", store_root=tmp_path / "artifacts")
    store = open_store(settings)
    rounds = [("v1", "v2"), ("v3", "v4")]
    for v in ("v0", *(v for pair in rounds for v in pair)):
        store.publish(finished_run, NAME, v, gate=PASS)
    store.promote(NAME, "v0")
    payload = settings.model_dump(mode="json")

    for a, b in rounds:
        before = store.production(NAME)["version"]
        start = time.time() + 3
        procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, json.dumps([payload, NAME, v, f"proc-{v}", start])],
                                  env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for v in (a, b)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]

        pointer = store.production(NAME)
        assert pointer["version"] in (a, b)
        assert pointer["manifest_sha256"] == store.verify_version(NAME, pointer["version"])[1]
        records = store.audit_trail(NAME)[-2:]
        assert {r["version"] for r in records} == {a, b}
        assert all(r["by"] == f"proc-{r['version']}" and r["at"] and r["action"] == "promote" for r in records)
        first, second = sorted(records, key=lambda r: r["at"])
        # Serialised: the later promotion saw the earlier one (no lost update), and production is the later one.
        assert (first["previous_version"], second["previous_version"]) == (before, first["version"])
        assert pointer["version"] == second["version"]
        assert [h["version"] for h in pointer["history"]][-2:] == [before, first["version"]]
    assert len(store.audit_trail(NAME)) == 1 + 2 * len(rounds)


HOLD_GPU = """
import sys, time
from pathlib import Path

from prefect import flow

from flows.retrain import gpu_slot


@flow
def hold(marker: str, seconds: float) -> None:
    with gpu_slot("test-gpu"):
        Path(marker).write_text("holding")
        time.sleep(seconds)


if __name__ == "__main__":
    hold(sys.argv[1], float(sys.argv[2]))
"""


@pytest.mark.integration
def test_a_flow_killed_holding_the_gpu_slot_does_not_block_the_next_on_the_temporary_server(tmp_path):
    """SIGKILL while a flow holds the GPU slot, with Prefect's temporary server (no PREFECT_API_URL), whose
    leases die with it: the next flow gives that slot back and runs, instead of waiting for ever; a flow
    that ends normally leaves nothing to give back."""
    script, marker, log = tmp_path / "hold.py", tmp_path / "holding", tmp_path / "killed.log"
    script.write_text(HOLD_GPU)
    env = clean_env(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(PROJECT),
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    with log.open("w") as out:
        killed = subprocess.Popen([sys.executable, str(script), str(marker), "600"], env=env, cwd=tmp_path,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert killed.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the flow and its temporary server, as a lost machine would
        killed.wait()
    assert json.loads((tmp_path / "prefect" / "test-gpu.holder").read_text())["pid"] == killed.pid
    for reclaims in (True, False):
        marker.unlink()
        run = subprocess.Popen([sys.executable, str(script), str(marker), "0"], env=env, cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out = run.communicate(timeout=300)[0]  # without the give-back it waits for the slot for ever
        finally:
            with suppress(ProcessLookupError):  # its temporary server too, should it outlive a failure
                os.killpg(run.pid, signal.SIGKILL)
        assert run.returncode == 0 and marker.exists(), out[-3000:]
        assert ("gave back the slot of concurrency limit 'test-gpu'" in out) == reclaims, out[-3000:]
        assert (tmp_path / "prefect" / "test-gpu.holder").read_text() == ""

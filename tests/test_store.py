"""Artifact store on both backends: a local folder, and S3 through boto3 against a real moto server
process on 127.0.0.1 (real HTTP; it can be paused to simulate an outage).

Every behavioural test runs on both backends through the parametrised `store` fixture. The input is
a real finished run: a tiny linear probe trained once per session on real Fashion-MNIST images.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from spottune.errors import SpotTuneError, StoreError
from spottune.settings import StoreSettings
from spottune.store import (
    MANIFEST,
    VERSION_FILES,
    ArtifactStore,
    Gate,
    IntegrityError,
    LocalBackend,
    PromotionRefused,
    S3Backend,
    load_production_model,
    open_store,
    sha256_file,
)

from support import DUMMY_AWS, MotoServer, clean_env, free_port, new_bucket, passed_gate, s3_client

NAME = "fashion"
PASS = passed_gate()


# ---------------------------------------------------------------------------------------------
# Stores on both backends (the session's real run and moto server come from conftest.py)


def s3_settings(moto: MotoServer, bucket: str, **kw: Any) -> StoreSettings:
    return StoreSettings(store_backend="s3", s3_bucket=bucket, s3_endpoint_url=moto.url, store_prefix="team/spottune",
                         s3_multipart_threshold_mb=5, s3_multipart_chunksize_mb=5, s3_max_attempts=2, **kw)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return open_store(StoreSettings(store_backend="local", store_root=tmp_path / "artifacts"))
    moto = request.getfixturevalue("moto")
    return open_store(s3_settings(moto, new_bucket(moto.url)))


# ---------------------------------------------------------------------------------------------
# Backend wrappers that inject faults and orderings


class Recording:
    """Delegates to a backend; records writes and can fail or pause at chosen points."""

    def __init__(self, inner: Any, fail_after_files: int | None = None, on_file: Any = None) -> None:
        self.inner = inner
        self.writes: list[str] = []
        self.fail_after_files = fail_after_files
        self.on_file = on_file

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put_file(self, key: str, src: Path, sha256: str) -> None:
        files = sum(1 for w in self.writes if not w.endswith(MANIFEST))
        if self.fail_after_files is not None and files >= self.fail_after_files:
            raise RuntimeError(f"injected failure before uploading {key}")
        if self.on_file is not None:
            self.on_file(files)
        self.inner.put_file(key, src, sha256)
        self.writes.append(key)

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> str:
        tag = self.inner.put_bytes(key, data, **kw)
        self.writes.append(key)
        return tag


def version_keys(store: ArtifactStore, version: str) -> set[str]:
    return set(store.backend.list_sizes(store.version_key(NAME, version) + "/"))


def expected_keys(store: ArtifactStore, version: str) -> set[str]:
    return {store.version_key(NAME, version, f) for f in (*VERSION_FILES, MANIFEST)}


# ---------------------------------------------------------------------------------------------
# Behaviour, on both backends


def test_publish_verifies_every_file_and_writes_the_manifest_last(store, finished_run, tmp_path):
    (tmp_path / "report.md").write_text("# SpotTune vs finetune\n")
    recorder = Recording(store.backend)
    store = ArtifactStore(recorder, store.prefix)
    result = store.publish(finished_run, NAME, gate=PASS, data_version="0123456789abcdef0123456789abcdef",
                           report=tmp_path / "report.md")

    assert result.version.startswith(sha256_file(finished_run / "model.safetensors")[:12] + "-")
    assert recorder.writes[-1] == store.version_key(NAME, result.version, MANIFEST)
    assert version_keys(store, result.version) == expected_keys(store, result.version)
    manifest, _ = store.read_manifest(NAME, result.version)
    for f in ("model.safetensors", "model.json", "metrics.json"):
        assert manifest["files"][f] == {"sha256": sha256_file(finished_run / f), "size": (finished_run / f).stat().st_size}

    [row] = store.list_versions(NAME)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert (row.complete, row.gate_passed, row.production) == (True, True, False)
    assert row.test_accuracy == metrics["test"]["accuracy"] and row.method == "linear"
    assert row.data_version == "0123456789abcdef0123456789abcdef"

    fetched = store.fetch_version(NAME, result.version, tmp_path / "fetched")
    assert (fetched / "report.md").read_text() == "# SpotTune vs finetune\n"
    assert sha256_file(fetched / "model.safetensors") == sha256_file(finished_run / "model.safetensors")
    if isinstance(store.backend.inner, S3Backend):  # the weights (> 5 MiB) went up in parts
        b = store.backend.inner
        etag = b.client.head_object(Bucket=b.bucket, Key=store.version_key(NAME, result.version, "model.safetensors"))["ETag"]
        assert "-" in etag, etag


def test_identical_weights_with_other_metrics_publish_as_a_distinct_version(store, finished_run, tmp_path):
    """A forced retrain (or another clone sharing the store) gives the same weights but new timings in
    metrics.json: its default version differs, so it publishes instead of clashing with the first; the
    same files again are still a no-op."""
    retrained = tmp_path / "retrained"
    shutil.copytree(finished_run, retrained)
    metrics = json.loads((retrained / "metrics.json").read_text())
    metrics["retimed"] = {"images_per_second": 1234.5}
    (retrained / "metrics.json").write_text(json.dumps(metrics))

    first = store.publish(finished_run, NAME, gate=PASS)
    second = store.publish(retrained, NAME, gate=PASS)
    assert not second.already_published and second.version != first.version
    assert second.version[:12] == first.version[:12] == sha256_file(finished_run / "model.safetensors")[:12]
    rows = {r.version: r for r in store.list_versions(NAME)}
    assert set(rows) == {first.version, second.version} and all(r.complete for r in rows.values())
    assert store.publish(finished_run, NAME, gate=PASS).already_published
    assert store.publish(retrained, NAME, gate=PASS).version == second.version
    store.promote(NAME, second.version)
    assert store.production(NAME)["version"] == second.version


def test_a_corrupted_object_is_refused_by_fetch_and_promote(store, finished_run, tmp_path):
    v = store.publish(finished_run, NAME, "v1", gate=PASS).version
    key = store.version_key(NAME, v, "model.safetensors")
    original = b"".join(store.backend.iter_chunks(key))
    store.backend.put_bytes(key, original[:-1] + bytes([original[-1] ^ 1]))  # one flipped bit, same size

    with pytest.raises(IntegrityError, match="model.safetensors"):
        store.fetch_version(NAME, v, tmp_path / "dest")
    assert not any((tmp_path / "dest").iterdir()), "nothing unverified may be left behind"
    with pytest.raises(IntegrityError, match="model.safetensors"):
        store.promote(NAME, v)
    assert store.production(NAME) is None


def test_promote_rollback_list_and_load(store, finished_run, other_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.publish(other_run, NAME, "v2", gate=PASS)
    assert store.production(NAME) is None
    store.promote(NAME, "v1", reason="first", actor="alice@ci")
    pointer = store.promote(NAME, "v2", reason="better", actor="bob@ci")
    assert pointer["version"] == "v2" and [h["version"] for h in pointer["history"]] == ["v1"]
    assert store.promote(NAME, "v2") == pointer, "promoting the production version again changes nothing"

    rows = {r.version: r for r in store.list_versions(NAME)}
    assert rows["v2"].production and not rows["v1"].production and all(r.complete for r in rows.values())

    model, _, classes, ptr = load_production_model(store, NAME, tmp_path / "prod-v2")
    expected = load_file(str(other_run / "model.safetensors"))
    assert ptr["version"] == "v2" and len(classes) == 10
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)

    assert store.rollback(NAME, reason="regression")["version"] == "v1"
    assert store.production(NAME)["history"] == []
    with pytest.raises(PromotionRefused, match="no earlier production version"):
        store.rollback(NAME)
    trail = store.audit_trail(NAME)
    assert [(a["action"], a["version"], a["previous_version"]) for a in trail] == [
        ("promote", "v1", None), ("promote", "v2", "v1"), ("rollback", "v1", "v2")]
    assert [a["by"] for a in trail[:2]] == ["alice@ci", "bob@ci"] and all(a["at"] for a in trail)


def test_a_rollback_from_a_named_version_is_safe_to_repeat(store, finished_run, other_run):
    """`rollback --from V`: a retry after an error it could not see the end of never rolls back twice."""
    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.publish(other_run, NAME, "v2", gate=PASS)
    store.promote(NAME, "v1")
    store.promote(NAME, "v2")
    store.promote(NAME, "v1")  # history v1, v2: rolling back twice would end on v1 again
    assert store.rollback(NAME, expect_current="v1")["version"] == "v2"
    again = store.rollback(NAME, expect_current="v1")
    assert again["version"] == "v2" and store.production(NAME)["version"] == "v2"
    assert [a["action"] for a in store.audit_trail(NAME)].count("rollback") == 1
    with pytest.raises(PromotionRefused, match="production is v2, not v9"):
        store.rollback(NAME, expect_current="v9")
    assert store.production(NAME)["version"] == "v2"


@pytest.mark.parametrize("tamper", [
    lambda p: {**p, "history": [{"version": p["history"][0]["version"]}]},
    lambda p: {**p, "history": [{**p["history"][0], "manifest_sha256": None}]},
    lambda p: {**p, "history": [{**p["history"][0], "version": "../v0"}]},
    lambda p: {**p, "history": [3]},
    lambda p: {**p, "history": "v1"},
    lambda p: {k: v for k, v in p.items() if k != "manifest_sha256"},
], ids=["no-manifest-sha", "sha-null", "version-climbs", "entry-not-object", "history-not-list", "pointer-no-sha"])
def test_a_tampered_pointer_history_is_an_integrity_error_not_a_key_error(store, finished_run, other_run, tamper,
                                                                           capsys, monkeypatch):
    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.publish(other_run, NAME, "v2", gate=PASS)
    store.promote(NAME, "v1")
    store.promote(NAME, "v2")
    key = store.model_key(NAME, "production.json")
    pointer = json.loads(store.backend.get_bytes(key)[0])
    store.backend.put_bytes(key, json.dumps(tamper(pointer)).encode())
    for action in (lambda: store.rollback(NAME), lambda: store.promote(NAME, "v1"), lambda: store.production(NAME)):
        with pytest.raises(IntegrityError, match="production.json is not a valid production pointer"):
            action()
    if isinstance(store.backend, LocalBackend):  # the command line: one line, exit 4 (the store)
        from spottune.cli import main

        monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "local")
        monkeypatch.setenv("SPOTTUNE_STORE_ROOT", str(store.backend.root))
        assert main(["rollback", NAME]) == 4
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "not a valid production pointer" in err, err
    assert [a["action"] for a in store.audit_trail(NAME)] == ["promote", "promote"]


def test_a_version_that_failed_the_gate_never_becomes_production(store, finished_run, other_run):
    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.promote(NAME, "v1")
    store.publish(other_run, NAME, "v2", gate=Gate(False, "0.2 points below the baseline"))

    with pytest.raises(PromotionRefused, match="failed its promotion gate"):
        store.promote(NAME, "v2")
    assert store.production(NAME)["version"] == "v1"
    rows = {r.version: r for r in store.list_versions(NAME)}
    assert rows["v2"].complete and rows["v2"].gate_passed is False and not rows["v2"].production
    with pytest.raises(StoreError, match="already published with other content"):
        store.publish(other_run, NAME, "v2", gate=PASS)  # the verdict cannot be flipped by re-publishing
    gate = json.loads(store.backend.get_bytes(store.version_key(NAME, "v2", "gate.json"))[0])
    assert gate["passed"] is False and "below the baseline" in gate["reason"]


def test_a_version_without_the_gate_record_needs_a_forced_promotion_which_is_audited(store, finished_run, other_run):
    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.promote(NAME, "v1", reason="gate passed")
    store.publish(other_run, NAME, "v2", gate=Gate(None, "published by hand"))
    assert {r.version: r.gate_passed for r in store.list_versions(NAME)} == {"v1": True, "v2": None}
    with pytest.raises(PromotionRefused, match="no record of the pipeline's gate"):
        store.promote(NAME, "v2")
    with pytest.raises(PromotionRefused, match="needs a reason"):
        store.promote(NAME, "v2", force=True, reason="  ")
    assert store.production(NAME)["version"] == "v1" and len(store.audit_trail(NAME)) == 1

    pointer = store.promote(NAME, "v2", force=True, reason="hotfix", actor="carol@ops")
    assert pointer["forced"] is True and pointer["history"][-1]["forced"] is False
    trail = store.audit_trail(NAME)
    assert [(a["version"], a["forced"], a["reason"], a["by"]) for a in trail][-1] == ("v2", True, "hotfix", "carol@ops")
    assert trail[0]["forced"] is False and all(a["at"] for a in trail)
    assert store.rollback(NAME, reason="undo the hotfix")["forced"] is False


def test_republish_after_a_failure_mid_upload_completes_without_duplicates(store, finished_run, other_run):
    broken = ArtifactStore(Recording(store.backend, fail_after_files=3), store.prefix)
    with pytest.raises(RuntimeError, match="injected failure"):
        broken.publish(finished_run, NAME, "v1", gate=PASS)
    [row] = store.list_versions(NAME)
    assert not row.complete and "MANIFEST" in row.problem
    with pytest.raises(PromotionRefused, match="incomplete"):
        store.promote(NAME, "v1")

    again = store.publish(finished_run, NAME, "v1", gate=PASS)
    assert len(again.skipped) == 3 and len(again.uploaded) == len(VERSION_FILES) - 3
    assert version_keys(store, "v1") == expected_keys(store, "v1")
    manifest_before = store.backend.get_bytes(store.version_key(NAME, "v1", MANIFEST))[0]
    third = store.publish(finished_run, NAME, "v1", gate=PASS)
    assert third.already_published and third.manifest_sha256 == again.manifest_sha256
    assert store.backend.get_bytes(store.version_key(NAME, "v1", MANIFEST))[0] == manifest_before
    with pytest.raises(StoreError, match="already published with other content.*model.safetensors"):
        store.publish(other_run, NAME, "v1", gate=PASS)
    assert [r.version for r in store.list_versions(NAME)] == ["v1"]
    store.promote(NAME, "v1")


def test_interleaved_promotions_serialise_and_both_are_audited(store, finished_run, other_run):
    """Both promoters read the pointer before either writes: the loser must retry, not overwrite."""
    for v, run in (("v0", finished_run), ("v1", finished_run), ("v2", other_run)):
        store.publish(run, NAME, v, gate=PASS)
    store.promote(NAME, "v0")
    pointer_key = store.model_key(NAME, "production.json")
    both_read = threading.Barrier(2, timeout=20)
    first_written = threading.Event()

    class Interleave(Recording):
        def get_bytes(self, key: str):
            out = self.inner.get_bytes(key)
            if key == pointer_key and not getattr(local, "read", False):
                local.read = True
                both_read.wait()
            return out

        def put_bytes(self, key: str, data: bytes, **kw: Any) -> str:
            if key == pointer_key and threading.current_thread().name == "second":
                first_written.wait(20)
            try:
                return self.inner.put_bytes(key, data, **kw)
            finally:
                if key == pointer_key and threading.current_thread().name == "first":
                    first_written.set()

    local = threading.local()
    racing = ArtifactStore(Interleave(store.backend), store.prefix)
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            racing.promote(NAME, version, actor=threading.current_thread().name)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=promote, args=("v1",), name="first"),
               threading.Thread(target=promote, args=("v2",), name="second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    pointer = store.production(NAME)
    assert pointer["version"] == "v2" and [h["version"] for h in pointer["history"]] == ["v0", "v1"]
    assert pointer["manifest_sha256"] == store.read_manifest(NAME, "v2")[1]
    trail = store.audit_trail(NAME)
    assert sorted((a["version"], a["previous_version"], a["by"]) for a in trail[1:]) == [
        ("v1", "v0", "first"), ("v2", "v1", "second")]


def test_free_running_concurrent_promotions_leave_a_consistent_pointer(store, finished_run, other_run):
    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.publish(other_run, NAME, "v2", gate=PASS)
    threads = [threading.Thread(target=store.promote, args=(NAME, v)) for v in ("v1", "v2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    pointer = store.production(NAME)
    assert pointer["version"] in ("v1", "v2")
    assert pointer["manifest_sha256"] == store.read_manifest(NAME, pointer["version"])[1]
    assert sorted(a["version"] for a in store.audit_trail(NAME)) == ["v1", "v2"]


MARKER = "pwned-by-pickle"


class _Payload:
    """Unpickling this runs os.system: a stand-in for a malicious model file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_planted_malicious_pickle_is_refused_without_running(store, finished_run, tmp_path):
    marker = tmp_path / MARKER
    evil = pickle.dumps(_Payload(marker))

    bad_run = tmp_path / "bad-run"
    shutil.copytree(finished_run, bad_run)
    (bad_run / "model.safetensors").write_bytes(evil)
    with pytest.raises(IntegrityError, match="not a safetensors file"):
        store.publish(bad_run, NAME, "evil", gate=PASS)
    assert store.list_versions(NAME) == [], "nothing is uploaded for a run that fails its checks"

    v = store.publish(finished_run, NAME, "v1", gate=PASS).version
    store.promote(NAME, v)
    weights_key = store.version_key(NAME, v, "model.safetensors")
    store.backend.put_bytes(weights_key, evil)  # planted in the store after promotion
    with pytest.raises(IntegrityError, match="model.safetensors"):
        load_production_model(store, NAME, tmp_path / "a")

    # An attacker who also rewrites the manifest: the pointer's manifest hash no longer matches.
    manifest_key = store.version_key(NAME, v, MANIFEST)
    manifest = json.loads(store.backend.get_bytes(manifest_key)[0])
    manifest["files"]["model.safetensors"] = {"sha256": __import__("hashlib").sha256(evil).hexdigest(), "size": len(evil)}
    forged = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    store.backend.put_bytes(manifest_key, forged)
    with pytest.raises(IntegrityError, match="manifest .* changed after it was promoted"):
        load_production_model(store, NAME, tmp_path / "b")

    # ... and the pointer too: the bytes reach the loader, which parses safetensors and never unpickles.
    pointer_key = store.model_key(NAME, "production.json")
    pointer = json.loads(store.backend.get_bytes(pointer_key)[0])
    pointer["manifest_sha256"] = __import__("hashlib").sha256(forged).hexdigest()
    store.backend.put_bytes(pointer_key, json.dumps(pointer).encode())
    with pytest.raises(IntegrityError, match="not a safetensors file"):
        load_production_model(store, NAME, tmp_path / "c")
    from spottune.training import load_model
    with pytest.raises(SpotTuneError):  # and the loader itself refuses it without unpickling
        load_model(tmp_path / "c")
    assert not marker.exists(), "the pickle's code ran"


def test_a_tampered_manifest_cannot_name_files_outside_the_version(store, finished_run, tmp_path):
    v = store.publish(finished_run, NAME, "v1", gate=PASS).version
    key = store.version_key(NAME, v, MANIFEST)
    manifest = json.loads(store.backend.get_bytes(key)[0])
    manifest["files"]["../../escape.txt"] = manifest["files"].pop("report.md")
    store.backend.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(IntegrityError, match="not a valid manifest"):
        store.fetch_version(NAME, v, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


# ---------------------------------------------------------------------------------------------
# S3 only: clear errors and an outage mid-upload


@pytest.mark.integration
def test_s3_misconfiguration_gives_a_clear_error(moto, monkeypatch):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        open_store(s3_settings(moto, "no-such-bucket"))
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreError, match=f"endpoint {closed} is unreachable"):
        open_store(StoreSettings(store_backend="s3", s3_bucket="models", s3_endpoint_url=closed, s3_max_attempts=1))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    with pytest.raises(StoreError, match="no S3 credentials found"):
        open_store(s3_settings(moto, "models"))


@pytest.mark.integration
def test_s3_outage_mid_upload_then_republish(moto, finished_run):
    """The server process is paused (SIGSTOP) after two files: the publish fails with a clear error,
    nothing is complete, and after the server resumes a re-run finishes the version exactly once."""
    settings = s3_settings(moto, new_bucket(moto.url), s3_read_timeout_s=0.5, s3_connect_timeout_s=0.5)
    store = open_store(settings.model_copy(update={"s3_max_attempts": 1}))

    def pause_after_two(done: int) -> None:
        if done == 2:
            moto.proc.send_signal(signal.SIGSTOP)

    try:
        broken = ArtifactStore(Recording(store.backend, on_file=pause_after_two), store.prefix)
        with pytest.raises(StoreError, match="unreachable|cannot upload"):
            broken.publish(finished_run, NAME, "v1", gate=PASS)
    finally:
        moto.proc.send_signal(signal.SIGCONT)
    assert not any(r.complete for r in store.list_versions(NAME))
    result = open_store(settings).publish(finished_run, NAME, "v1", gate=PASS)
    assert not result.already_published and len(result.skipped) >= 2
    assert version_keys(store, "v1") == expected_keys(store, "v1")
    store.promote(NAME, "v1")


# ---------------------------------------------------------------------------------------------
# CLI commands (wired through register) and import hygiene


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_cli_publish_promote_list_rollback(backend, finished_run, other_run, tmp_path, monkeypatch, capsys, request):
    from spottune.store_cli import register

    if backend == "s3":
        moto = request.getfixturevalue("moto")
        monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "s3")
        monkeypatch.setenv("SPOTTUNE_S3_BUCKET", new_bucket(moto.url))
        monkeypatch.setenv("SPOTTUNE_S3_ENDPOINT_URL", moto.url)
    else:
        monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "local")
        monkeypatch.setenv("SPOTTUNE_STORE_ROOT", str(tmp_path / "artifacts"))
    parser = argparse.ArgumentParser(prog="spottune")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> str:
        args = parser.parse_args([str(a) for a in argv])
        assert args.func(args, None) == 0
        return capsys.readouterr().out

    record = tmp_path / "gate.json"  # what the gate stage writes to metrics/gate.json
    record.write_text(json.dumps(PASS.details))
    run("publish", finished_run, "--name", NAME, "--version", "v1", "--data-version", "abcdef0123456789",
        "--gate", record)
    run("publish", other_run, "--name", NAME, "--version", "v2", "--candidate-only")
    assert "production is now v1" in run("promote", NAME, "v1", "--reason", "first")
    with pytest.raises(PromotionRefused):
        run("promote", NAME, "v2")
    rows = {r["version"]: r for r in json.loads(run("models", "list", NAME, "--json"))}
    assert rows["v1"]["production"] and rows["v2"]["gate_passed"] is False
    table = run("models", "list", NAME)
    assert "* v1" in table and "failed" in table
    assert "no gate record" in run("publish", other_run, "--name", NAME, "--version", "v3")  # by hand
    with pytest.raises(PromotionRefused, match="--force --reason"):
        run("promote", NAME, "v3")
    assert "forced" in run("promote", NAME, "v3", "--force", "--reason", "by hand")
    assert "* v3" in run("models", "list", NAME) and " none " in run("models", "list", NAME)
    assert "production is now v1" in run("rollback", NAME)


def test_cli_reports_bad_store_settings(monkeypatch):
    from spottune.errors import ConfigError
    from spottune.store_cli import store_settings

    monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "s3")
    monkeypatch.delenv("SPOTTUNE_S3_BUCKET", raising=False)
    with pytest.raises(ConfigError, match="SPOTTUNE_S3_BUCKET"):
        store_settings()
    monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "gcs")
    with pytest.raises(ConfigError, match="SPOTTUNE_STORE_BACKEND"):
        store_settings()


def test_store_modules_import_no_boto3():
    code = "import sys, spottune.store, spottune.store_cli; print('boto3' in sys.modules, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr


def test_local_backend_refuses_keys_that_climb_out(tmp_path):
    backend = LocalBackend(tmp_path / "store")
    with pytest.raises(StoreError, match="invalid store key"):
        backend.put_bytes("models/../../etc/x", b"x")
    with pytest.raises(StoreError, match="invalid model name"):
        ArtifactStore(backend).model_key("../x")


def test_names_and_versions_with_a_trailing_newline_are_refused(store, finished_run):
    """`$` matches before a final newline: names and versions are checked with fullmatch."""
    for name, version in (("fashion\n", "v1"), (NAME, "v1\n"), ("fashion\nx", "v1")):
        with pytest.raises(StoreError, match="invalid (model name|version)"):
            store.publish(finished_run, name, version, gate=PASS)
    with pytest.raises(StoreError, match="invalid version"):
        store.promote(NAME, "v1\n")
    assert store.backend.list_sizes(store.prefix + "/" if store.prefix else "") == {}


@pytest.mark.integration
@pytest.mark.parametrize("prefix", ["../esc", "team/../../esc", "./x", "a//b", "/abs"])
def test_a_store_prefix_that_climbs_out_or_has_empty_parts_is_refused(moto, finished_run, tmp_path, prefix):
    """SPOTTUNE_STORE_PREFIX=../esc was accepted and written as S3 keys ('../esc/models/...')."""

    bucket = new_bucket(moto.url)
    env = clean_env(**DUMMY_AWS, SPOTTUNE_STORE_BACKEND="s3", SPOTTUNE_S3_BUCKET=bucket, SPOTTUNE_S3_ENDPOINT_URL=moto.url,
                    SPOTTUNE_STORE_PREFIX=prefix)
    r = subprocess.run([sys.executable, "-m", "spottune.cli", "publish", str(finished_run), "--name", NAME],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 3 and "SPOTTUNE_STORE_PREFIX" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 2, r.stderr
    with pytest.raises(StoreError, match="invalid store prefix"):
        ArtifactStore(LocalBackend(tmp_path / "store"), prefix)
    assert s3_client(moto.url).list_objects_v2(
        Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_local_store_files_follow_the_umask(finished_run, tmp_path, umask, mode):
    """Atomic writes go through mkstemp (always 0600): a shared store read by a serving user or a backup
    could not read them. Files get 0666 & ~umask, as any other file the process creates."""

    env = clean_env(SPOTTUNE_STORE_BACKEND="local", SPOTTUNE_STORE_ROOT=str(tmp_path / "artifacts"))
    for argv in (["publish", str(finished_run), "--name", NAME, "--version", "v1"],
                 ["promote", NAME, "v1", "--force", "--reason", "by hand"]):
        r = subprocess.run([sys.executable, "-m", "spottune.cli", *argv], env=env, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path, umask=umask)
        assert r.returncode == 0, r.stderr
    files = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert len(files) == len(VERSION_FILES) + 3  # the version's files, its manifest, production.json, one audit record
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tmp_path).as_posix(): oct(mode) for p in files}


@pytest.mark.integration
def test_a_multipart_upload_cut_off_by_an_outage_is_aborted_and_leaves_no_parts(moto, finished_run):
    """The weights (> 5 MiB) go up in 5 MiB parts. The endpoint drops while a part is sent and is still down
    when s3transfer tries to abort the upload, so its parts stay stored (and billed) with no object. The
    store aborts its unfinished uploads when the upload fails and again before the next one (the retry):
    once the publish succeeds, the bucket holds no multipart upload."""
    from botocore.exceptions import EndpointConnectionError

    bucket = new_bucket(moto.url)
    store = open_store(s3_settings(moto, bucket))
    backend = store.backend
    assert isinstance(backend, S3Backend) and (finished_run / "model.safetensors").stat().st_size > 5 * 1024 * 1024
    state = {"parts": 0, "fail_from_part": 2, "abort_down": True}

    def part(**_: Any) -> None:
        state["parts"] += 1
        if state["parts"] >= state["fail_from_part"]:  # the connection drops while this part is sent
            raise EndpointConnectionError(endpoint_url=moto.url)

    def abort(**_: Any) -> None:
        if state["abort_down"]:
            raise EndpointConnectionError(endpoint_url=moto.url)

    backend.client.meta.events.register("before-call.s3.UploadPart", part)
    backend.client.meta.events.register("before-call.s3.AbortMultipartUpload", abort)
    s3 = s3_client(moto.url)

    with pytest.raises(StoreError, match="model.safetensors.*unreachable"):
        store.publish(finished_run, NAME, "v1", gate=PASS)
    [orphan] = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])  # the outage hid every abort
    assert orphan["Key"] == store.version_key(NAME, "v1", "model.safetensors")

    state.update(fail_from_part=10**9, abort_down=False)  # the endpoint is back: the retry publishes
    store.publish(finished_run, NAME, "v1", gate=PASS)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    store.verify_version(NAME, "v1")

    state.update(parts=0, fail_from_part=2)  # a part fails with the endpoint up: aborted at once
    with pytest.raises(StoreError):
        store.publish(finished_run, NAME, "v2", gate=PASS)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# ---------------------------------------------------------------------------------------------
# Region: SPOTTUNE_S3_REGION, else AWS_REGION, else boto3's chain; what a request is signed for


class _SignatureRecorder:
    """An HTTP server on 127.0.0.1 that answers 200 to everything and keeps each Authorization header."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.authorizations = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                seen.append(self.headers.get("Authorization", ""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def scopes(self) -> list[str]:
        """The credential scope's region of each request: Credential=KEY/DATE/REGION/s3/aws4_request."""
        return [a.split("Credential=", 1)[1].split("/")[2] for a in self.authorizations if "Credential=" in a]


@pytest.mark.parametrize("env,expected", [
    ({"AWS_REGION": "eu-west-3"}, "eu-west-3"),
    ({"AWS_DEFAULT_REGION": "ap-southeast-2"}, "ap-southeast-2"),
    ({"AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "ap-southeast-2"}, "eu-west-3"),
    ({"AWS_REGION": "eu-west-3", "SPOTTUNE_S3_REGION": "ca-central-1"}, "ca-central-1"),
    ({}, "us-east-1"),
])
def test_s3_requests_are_signed_for_the_region_of_the_environment(env, expected, monkeypatch):
    from spottune.store_cli import store_settings

    recorder = _SignatureRecorder()
    try:
        for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "SPOTTUNE_S3_REGION", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("SPOTTUNE_STORE_BACKEND", "s3")
        monkeypatch.setenv("SPOTTUNE_S3_BUCKET", "models")
        monkeypatch.setenv("SPOTTUNE_S3_ENDPOINT_URL", recorder.url)
        monkeypatch.setenv("SPOTTUNE_S3_MAX_ATTEMPTS", "1")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        store = open_store(store_settings())  # HEAD bucket: one real signed request
        assert store.backend.client.meta.region_name == expected
        assert recorder.scopes() == [expected]
    finally:
        recorder.server.shutdown()
        recorder.server.server_close()


@pytest.mark.integration
def test_s3_store_works_against_moto_with_the_region_from_aws_region(moto, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    store = open_store(s3_settings(moto, new_bucket(moto.url)))
    assert store.backend.client.meta.region_name == "eu-west-3"
    store.backend.put_bytes("probe.txt", b"hello")
    assert store.backend.get_bytes("probe.txt")[0] == b"hello"

"""Helpers shared by the tests, each defined here once: child processes (`sh`, `dvc`, `spottune`, `clean_env`), the CLI in-process (`cli`), a moto
S3 server process and a client of the tests' own for its buckets, throwaway git + DVC pipeline repos,
Prefect's test server, and `requires` (the one way a test skips for a missing package)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
# Credentials moto accepts (unless told to check them), for boto3's standard chain: the environment only.
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
             "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
_OTHER_AWS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def requires(*modules: str) -> None:
    """Skip the calling test, or the whole module when called at its top, unless every module can be
    imported. find_spec only, so nothing is imported early (Prefect must not be imported before
    PREFECT_HOME is set). Tests marked `gpu` skip without CUDA by their marker (conftest.py)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -e '.[test]')", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """`python -m moto.server` as a child process on a free loopback port (real HTTP; can be paused)."""

    def __init__(self, log: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        """env: extra variables for the server process (INITIAL_NO_AUTH_ACTION_COUNT=0 makes it check credentials).
        port: restart a server on the address of one that was stopped or killed."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as out:  # the server keeps its own copy of the file
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on {self.url}: see {log}")
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)  # a paused server must wake up to terminate
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crashed host: connections are refused at once, and everything moto held is lost."""
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def dummy_aws_env() -> Iterator[None]:
    """DUMMY_AWS in this process's environment, and no other AWS setting of the machine, for the block."""
    with pytest.MonkeyPatch.context() as mp:
        for k in _OTHER_AWS:
            mp.delenv(k, raising=False)
        for k, v in DUMMY_AWS.items():
            mp.setenv(k, v)
        yield


def s3_client(url: str):
    """The tests' own boto3 client for a moto server: explicit credentials, whatever the environment holds
    (and never the code under test)."""
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", aws_session_token=None)


def new_bucket(url: str) -> str:
    """A bucket with a fresh name on the server at url."""
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    s3_client(url).create_bucket(Bucket=bucket)
    return bucket


def bucket_names(url: str) -> set[str]:
    return {b["Name"] for b in s3_client(url).list_buckets()["Buckets"]}


def snapshot_bucket(url: str, bucket: str) -> dict[str, bytes]:
    """Every object of a bucket, read through the tests' own client."""
    s3 = s3_client(url)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def restore_bucket(url: str, bucket: str, objects: dict[str, bytes]) -> None:
    """Create the bucket on a fresh (in-memory) moto server and put a snapshot back, as durable storage keeps it."""
    s3 = s3_client(url)
    s3.create_bucket(Bucket=bucket)
    for key, data in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1, in a thread, that keeps every POSTed JSON body (an alert webhook)."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received: list[dict] = []
        self.received = received
        self.arrived = threading.Condition()
        arrived = self.arrived

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(204)
                self.end_headers()
                with arrived:
                    received.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                     "body": json.loads(body)})
                    arrived.notify_all()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/spottune?token=not-logged"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        """The first `count` requests, waiting up to `timeout` seconds for them."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def new_pipeline_repo(path: Path, *, with_flows: bool = False) -> Path:
    """A git + DVC repository holding this project's pipeline files (not its data or runs): dvc.yaml, params.yaml,
    the code, the GX project gx/, .dvc/config and its offline plots template."""
    path.mkdir()
    files = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"] + (["prefect.yaml"] if with_flows else [])
    for name in files:
        shutil.copy(PROJECT / name, path / name)
    for name in ["spottune", "gx"] + (["flows"] if with_flows else []):
        shutil.copytree(PROJECT / name, path / name, ignore=shutil.ignore_patterns("__pycache__", "uncommitted"))
    (path / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(PROJECT / ".dvc" / name, path / ".dvc" / name)
    shutil.copytree(PROJECT / ".dvc" / "plots-offline", path / ".dvc" / "plots-offline")  # config's plots.html_template
    return path


def git_pipeline_repo(path: Path, *, with_flows: bool = False) -> Path:
    """new_pipeline_repo() with `git init` done (branch main): what `dvc` and the flow run in."""
    repo = new_pipeline_repo(path, with_flows=with_flows)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    return repo


def tiny_flow_project(path: Path, name: str, *, per_class: tuple[int, int], steps_per_epoch: int) -> Path:
    """A git_pipeline_repo(with_flows=True) with tiny real data (Fashion-MNIST, per_class = (train, test)
    images per class, tracked by DVC) and tiny params whose gate any model passes, all committed."""
    repo = git_pipeline_repo(path, with_flows=True)
    sh(sys.executable, "-m", "spottune.cli", "data", "fashion-mnist", "--out", "data/fashion-mnist",
       "--train-per-class", str(per_class[0]), "--test-per-class", str(per_class[1]), "--track", cwd=repo,
       timeout=600)
    set_params(repo, prepare={"val_fraction": 0.25}, validate={"min_images_per_class": 2, "min_rows": 10},
               data={"image_size": 32, "batch_size": 16, "eval_batch_size": 64},
               optim={"epochs": 1, "max_steps_per_epoch": steps_per_epoch},
               gate={"rule": "non_inferiority", "margin": 1.0, "floor": 0.0},  # any tiny model passes
               publish={"model_name": name, "promote": True})
    sh("git", "add", ".", cwd=repo)
    sh("git", "commit", "-q", "-m", "pipeline on a tiny dataset", cwd=repo)
    return repo


def set_params(repo: Path, **sections: dict) -> None:
    """Merge keys into sections of the repository's params.yaml."""
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child tool (dvc, spottune, prefect) without any AWS_*, DVC remote or
    Prefect API settings of the machine running the tests; this interpreter's scripts first on PATH."""
    drop = ("AWS_", "SPOTTUNE_REMOTE_", "SPOTTUNE_STORE_", "SPOTTUNE_S3_", "PREFECT_API")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
        "SPOTTUNE_DEVICE": "cpu", "SPOTTUNE_PROGRESS": "false", "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
        "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra,
    }


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None, ok: bool = True,
       timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a tool as a child process (clean_env() unless env is given); ok=True asserts it succeeded,
    showing its output."""
    r = subprocess.run(list(args), cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r


def spottune(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m spottune.cli ARGS` as a child process (clean_env() unless env is given), output captured."""
    return subprocess.run([sys.executable, "-m", "spottune.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or clean_env(), cwd=cwd, timeout=600)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """`spottune ARGS` in this process: exit status and everything it printed."""
    from spottune.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def dvc(*args: str, cwd: Path, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, env=env, ok=ok)


@contextlib.contextmanager
def prefect_test_server(home: Path, log_level: str = "WARNING", **extra: str) -> Iterator[str]:
    """Prefect's test server with PREFECT_HOME at `home` (and `extra` in this process's environment while it
    runs); yields its API URL. Prefect is imported only here, after PREFECT_HOME is set, so it never reads
    or writes the user's own ~/.prefect."""
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "SPOTTUNE_DEVICE": "cpu",
           "SPOTTUNE_PROGRESS": "false", "PREFECT_LOGGING_LEVEL": log_level, **extra}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60):
            yield str(PREFECT_API_URL.value())


def store_env(settings, **extra: str) -> dict[str, str]:
    """clean_env() for a `spottune` process that uses the store these StoreSettings describe (with moto's
    dummy credentials for S3)."""
    env = {"SPOTTUNE_STORE_BACKEND": settings.store_backend, "SPOTTUNE_STORE_ROOT": str(settings.store_root),
           "SPOTTUNE_STORE_PREFIX": settings.store_prefix}
    if settings.store_backend == "s3":
        env |= {"SPOTTUNE_S3_BUCKET": settings.s3_bucket, "SPOTTUNE_S3_ENDPOINT_URL": settings.s3_endpoint_url,
                **DUMMY_AWS}
    return clean_env(**env, **extra)


def shifted_run(run: Path, out: Path, class_index: int, shift: float) -> Path:
    """A copy of a finished run whose head favours one class by `shift` logits: another valid version
    that predicts differently."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, out)
    state = load_file(str(out / "model.safetensors"))
    bias = next(k for k in state if k.endswith("bias") and state[k].ndim == 1 and state[k].numel() == 10)
    state[bias][class_index] += shift
    save_file(state, str(out / "model.safetensors"), metadata={"format": "spottune-model/1"})
    return out


def comparison_with(difference: float, ci_low: float, ci_high: float, accuracy: float = 0.8,
                    classes: tuple[str, ...] = ("a", "b")) -> dict:
    """A comparison as `spottune compare --json` writes it (the fields the gate reads), with these statistics."""
    return {"classes": list(classes),
            "baseline": {"method": "finetune", "accuracy": accuracy - difference, "images": 1000},
            "candidate": {"method": "spottune", "accuracy": accuracy, "images": 1000},
            "bootstrap": {"difference": difference, "ci_low": ci_low, "ci_high": ci_high, "level": 0.95},
            "mcnemar": {"a_only": 10, "b_only": 20, "p_value": 0.05}}


def passed_gate():
    """A passed verdict as the gate stage makes it (spottune.gate.decide on a clear win, no champion): what a
    version needs to be promoted without force. Not bound to any weights."""
    from spottune.config import GateParams
    from spottune.gate import decide
    from spottune.store import Gate

    record = decide(comparison_with(0.05, 0.02, 0.08), GateParams(rule="superiority"),
                    {"status": "no_store", "reason": "test"})
    assert record["decision"] == "promote"
    return Gate.from_record(record)

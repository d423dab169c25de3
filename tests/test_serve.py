"""`spottune serve`: a real uvicorn process on a free 127.0.0.1 port, asked over real HTTP (httpx).

The model is a real run published into a local store (and into S3 on a moto server for the reload
test): health, model metadata, predictions equal to the run's own, bad uploads answered 4xx with a
JSON error, and a newly promoted version picked up without a restart while requests keep succeeding.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from spottune.settings import StoreSettings
from spottune.store import WEIGHTS, open_store

from support import free_port, new_bucket, passed_gate, shifted_run, store_env

NAME = "fashion"
PASS = passed_gate()


class Server:
    """`spottune serve` as a child process; its stderr goes to a log file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spottune.cli", "serve", "--model", f"{NAME}@production", "--host", "127.0.0.1",
                 "--port", str(self.port), *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 180
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"spottune serve did not start on {self.url}:\n{log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def predict(self, path: Path, **kw) -> httpx.Response:
        return self.client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")}, **kw)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(finished_run, tmp_path_factory) -> Iterator[tuple[Server, StoreSettings]]:
    """One server for the read-only tests: v1 in production of a local store, uploads limited to 1 MB."""
    tmp = tmp_path_factory.mktemp("serve")
    settings = StoreSettings(store_backend="local", store_root=tmp / "artifacts")
    store = open_store(settings)
    store.publish(finished_run, NAME, "v1", gate=PASS, data_version="0123456789abcdef")
    store.promote(NAME, "v1", reason="first model")
    server = Server(store_env(settings), tmp / "serve.log", "--cache-dir", str(tmp / "cache"), "--max-upload-mb", "1")
    yield server, settings
    server.stop()


@pytest.fixture(scope="module")
def sample(fashion_root) -> Path:
    return min((fashion_root / "test" / "trouser").glob("*.png"))


@pytest.mark.integration
def test_health_and_model_describe_the_production_version(served, finished_run):
    server, settings = served
    assert server.client.get("/health").json() == {"status": "ok", "version": "v1"}
    info = server.client.get("/model").json()
    pointer = open_store(settings).production(NAME)
    card = json.loads((finished_run / "model.json").read_text())
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert (info["name"], info["version"], info["ref"]) == (NAME, "v1", "production")
    assert info["classes"] == card["classes"]
    assert info["manifest_sha256"] == pointer["manifest_sha256"]
    assert info["promotion"]["reason"] == "first model" and info["promotion"]["at"] == pointer["at"]
    assert info["data_version"] == "0123456789abcdef" and info["gate"]["passed"] is True
    assert info["metrics"]["test"]["accuracy"] == metrics["test"]["accuracy"] and info["metrics"]["method"] == "linear"
    assert info["params"]["model"]["backbone"] == "efficientnet_lite0"
    assert set(info["files"]) >= {WEIGHTS, "model.json", "gate.json"}


@pytest.mark.integration
def test_predict_a_real_png_as_the_run_does(served, finished_run, sample):
    from spottune.inference import Predictor

    server, _ = served
    r = server.predict(sample, params={"top_k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    [expected] = Predictor.from_folder(finished_run).predict_paths([sample], top_k=4)
    assert body["version"] == "v1" and body["label"] == expected["label"]
    assert body["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert [t["label"] for t in body["top"]] == [t["label"] for t in expected["top"]] and len(body["top"]) == 4
    probabilities = [t["probability"] for t in body["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and body["top"][0]["label"] == body["label"]


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.integration
def test_bad_uploads_get_4xx_json_errors(served, sample):
    server, _ = served

    def post(name: str, data: bytes) -> httpx.Response:
        return server.client.post("/predict", files={"file": (name, data, "application/octet-stream")})

    cases = [
        (post("notes.txt", b"hello, I am not an image\n"), 415, ["notes.txt", "cannot decode image"]),
        (post("empty.png", b""), 400, ["empty.png", "empty"]),
        (post("bomb.png", png_header_only(10_000, 10_000)), 413, ["bomb.png", "10000x10000", "decompression bomb"]),
        (post("huge.png", png_header_only(30_000, 30_000)), 413, ["huge.png", "900000000 pixels", "decompression bomb"]),
        (post("big.png", b"\x89PNG" + b"\0" * 1_200_000), 413, ["upload limit", "1000000"]),
        (server.client.post("/predict", data={"other": "x"}), 422, ["file"]),
        (server.predict(sample, params={"top_k": 0}), 422, ["top_k"]),
    ]
    # The same oversized body streamed in chunks, without a Content-Length: refused as it arrives.
    body, content_type = _multipart("streamed.png", b"\0" * 1_200_000)
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    cases.append((server.client.post("/predict", content=chunks, headers={"Content-Type": content_type}), 413,
                  ["upload limit"]))
    for r, status, words in cases:
        assert r.status_code == status, (status, r.text)
        error = r.json()["error"]
        assert all(w in error for w in words), (words, error)
    assert server.client.get("/health").json()["status"] == "ok"  # and the server is still there
    assert server.predict(sample).status_code == 200


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_newly_promoted_version_is_served_without_restart(backend, finished_run, sample, tmp_path, request):
    if backend == "s3":
        moto = request.getfixturevalue("moto")
        bucket = new_bucket(moto.url)
        settings = StoreSettings(store_backend="s3", s3_bucket=bucket, s3_endpoint_url=moto.url, store_prefix="team")
    else:
        settings = StoreSettings(store_backend="local", store_root=tmp_path / "artifacts")
    store = open_store(settings)
    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.promote(NAME, "v1")
    classes = json.loads((finished_run / "model.json").read_text())["classes"]
    store.publish(shifted_run(finished_run, tmp_path / "v2", class_index=7, shift=50.0), NAME, "v2", gate=PASS)
    store.publish(shifted_run(finished_run, tmp_path / "v3", class_index=3, shift=50.0), NAME, "v3", gate=PASS)
    server = Server(store_env(settings), tmp_path / "serve.log", "--cache-dir", str(tmp_path / "cache"), "--poll-s", "0.5")
    try:
        answers: list[tuple[int, str | None, str | None]] = []
        stop = threading.Event()

        def keep_asking() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while not stop.is_set():
                    try:
                        r = client.post("/predict", files={"file": (sample.name, sample.read_bytes(), "image/png")})
                        body = r.json()
                        answers.append((r.status_code, body.get("version"), body.get("label")))
                    except Exception as e:  # noqa: BLE001 - recorded, so the test fails instead of waiting
                        answers.append((0, None, repr(e)))

        def wait_for_answers(n: int) -> None:
            deadline = time.monotonic() + 60
            while len(answers) < n:
                assert asker.is_alive() and time.monotonic() < deadline, (answers, server.log.read_text())
                time.sleep(0.05)

        asker = threading.Thread(target=keep_asking, daemon=True)
        asker.start()
        wait_for_answers(3)
        store.promote(NAME, "v2")
        deadline = time.monotonic() + 120
        while server.client.get("/health").json()["version"] != "v2":
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.2)
        wait_for_answers(len(answers) + 3)
        stop.set()
        asker.join()
        assert {status for status, _, _ in answers} == {200}, answers
        versions = [v for _, v, _ in answers]
        switch = versions.index("v2")
        assert switch >= 3 and set(versions[:switch]) == {"v1"} and set(versions[switch:]) == {"v2"}, versions
        assert {label for _, v, label in answers if v == "v2"} == {classes[7]}  # v2's head, not v1's
        assert server.proc.poll() is None

        # A production pointer naming a version whose weights were altered in the store: never served.
        key = store.version_key(NAME, "v3", WEIGHTS)
        data = bytearray(b"".join(store.backend.iter_chunks(key)))
        data[-1] ^= 1
        store.backend.put_bytes(key, bytes(data))
        _, manifest_sha = store.read_manifest(NAME, "v3")
        store.backend.put_bytes(store.model_key(NAME, "production.json"),
                                json.dumps({"version": "v3", "manifest_sha256": manifest_sha}).encode())
        deadline = time.monotonic() + 60
        while "still serving v2" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.2)
        assert WEIGHTS in server.log.read_text().split("still serving v2", 1)[1].splitlines()[0]
        assert server.client.get("/health").json()["version"] == "v2"
        r = server.predict(sample)
        assert r.status_code == 200 and r.json()["version"] == "v2" and r.json()["label"] == classes[7]
        assert not (tmp_path / "cache" / NAME / "v3").exists()
        time.sleep(2)  # four more checks: the refused version is not fetched again every time
        assert server.log.read_text().count("still serving v2") == 1, server.log.read_text()

        store.promote(NAME, "v1", reason="back to v1")  # the next good version is still picked up
        deadline = time.monotonic() + 60
        while server.client.get("/health").json()["version"] != "v1":
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.2)
        assert server.client.get("/model").json()["promotion"]["reason"] == "back to v1"
    finally:
        server.stop()


@pytest.mark.parametrize("args,message,code", [
    ([], f"{NAME} has no production version", 4),  # the store's answer
    (["--poll-s", "0"], "--poll-s must be positive (got 0.0)", 3),  # bad input
    (["--max-upload-mb", "-1"], "--max-upload-mb must be positive (got -1.0)", 3),
    (["--max-pixels", "0"], "--max-pixels must be positive (got 0)", 3),
])
def test_serve_refuses_to_start_with_one_clear_line(args, message, code, tmp_path):
    settings = StoreSettings(store_backend="local", store_root=tmp_path / "artifacts")
    r = subprocess.run([sys.executable, "-m", "spottune.cli", "serve", "--model", f"{NAME}@production",
                        "--port", str(free_port()), *args], capture_output=True, text=True, env=store_env(settings),
                       timeout=120)
    assert r.returncode == code and r.stderr.strip().startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

"""`spottune predict --model NAME@REF`: a published model fetched from the artifact store (a local folder,
and S3 on a moto server process), verified, cached, and run over image files and folders in batches."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from spottune.settings import StoreSettings
from spottune.store import WEIGHTS, Gate, open_store, sha256_file

from support import new_bucket, passed_gate, shifted_run, spottune, store_env

NAME = "fashion"
PASS = passed_gate()


@pytest.fixture
def images(fashion_root, tmp_path) -> Path:
    """A folder of real PNGs (one in a subfolder) and a file that is not an image."""
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for cls, dest in (("trouser", folder), ("sandal", folder), ("bag", folder / "more")):
        for p in sorted((fashion_root / "test" / cls).glob("*.png"))[:2]:
            shutil.copy(p, dest / f"{cls}-{p.name}")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def _settings(backend: str, tmp_path: Path, request) -> StoreSettings:
    if backend == "local":
        return StoreSettings(store_backend="local", store_root=tmp_path / "artifacts")
    moto = request.getfixturevalue("moto")
    bucket = new_bucket(moto.url)
    return StoreSettings(store_backend="s3", s3_bucket=bucket, s3_endpoint_url=moto.url, store_prefix="team")


def _rows(r: subprocess.CompletedProcess) -> list[dict]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_predict_by_name_fetches_once_and_reuses_the_verified_cache(backend, finished_run, images, tmp_path, request):
    settings = _settings(backend, tmp_path, request)
    store = open_store(settings)
    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.promote(NAME, "v1")
    cache = tmp_path / "cache"
    env = store_env(settings, SPOTTUNE_MODEL_CACHE_DIR=str(cache))

    r = spottune("predict", "--model", f"{NAME}@production", "--json", images, env=env)
    rows = _rows(r)
    assert "fetched and verified" in r.stderr
    expected_paths = sorted(str(p) for p in images.rglob("*.png"))
    assert [row["path"] for row in rows] == expected_paths  # the folder's images only, recursively
    classes = json.loads((finished_run / "model.json").read_text())["classes"]
    assert all(row["label"] in classes and 0 < row["probability"] <= 1 for row in rows)
    same = _rows(spottune("predict", "--run", finished_run, "--json", images, env=env))  # the run itself
    assert [(x["label"], x["probability"]) for x in rows] == [(x["label"], x["probability"]) for x in same]
    cached = cache / NAME / "v1"
    assert sha256_file(cached / WEIGHTS) == sha256_file(finished_run / WEIGHTS)

    # Second call: the cache is used. The store's weights are gone, so a download would fail.
    key = store.version_key(NAME, "v1", WEIGHTS)
    original = b"".join(store.backend.iter_chunks(key))
    if backend == "local":
        Path(store.backend.url(key)).unlink()
    else:
        store.backend.client.delete_object(Bucket=store.backend.bucket, Key=key)
    r = spottune("predict", "--model", f"{NAME}@production", "--json", images, env=env)
    assert _rows(r) == rows and "using the cached copy" in r.stderr and "fetched and verified" not in r.stderr

    # A tampered cached file is refused: with the store's copy gone, the command fails naming it.
    data = bytearray((cached / WEIGHTS).read_bytes())
    data[-1] ^= 1
    (cached / WEIGHTS).write_bytes(bytes(data))
    r = spottune("predict", "--model", f"{NAME}@production", images, env=env)
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert "cached copy refused" in r.stderr and WEIGHTS in r.stderr.splitlines()[-1], r.stderr
    assert r.stdout == ""

    # With the store's copy back, the tampered cache is fetched again and the predictions are the same.
    store.backend.put_bytes(key, original)
    r = spottune("predict", "--model", f"{NAME}@production", "--json", images, env=env)
    assert _rows(r) == rows and "cached copy refused" in r.stderr and "fetched and verified" in r.stderr
    assert sha256_file(cached / WEIGHTS) == sha256_file(finished_run / WEIGHTS)
    assert sorted(p.name for p in (cache / NAME).iterdir()) == ["v1"]  # no temporary folders left


@pytest.mark.slow
def test_predict_by_version_latest_and_clear_errors(finished_run, images, tmp_path):

    settings = StoreSettings(store_backend="local", store_root=tmp_path / "artifacts")
    store = open_store(settings)
    env = store_env(settings, SPOTTUNE_MODEL_CACHE_DIR=str(tmp_path / "cache"))
    image = next(images.glob("*.png"))

    r = spottune("predict", "--model", f"{NAME}@production", image, env=env)
    assert r.returncode == 4 and f"{NAME} has no production version" in r.stderr and "Traceback" not in r.stderr

    store.publish(finished_run, NAME, "v1", gate=PASS)
    store.promote(NAME, "v1")
    trouser_run = shifted_run(finished_run, tmp_path / "shifted", class_index=1, shift=50.0)
    store.publish(trouser_run, NAME, "v2", gate=Gate(False, "candidate"))  # newest, never promoted
    by_default = _rows(spottune("predict", "--model", NAME, "--json", image, env=env))  # bare NAME: production
    assert by_default == _rows(spottune("predict", "--model", f"{NAME}@v1", "--json", image, env=env))
    latest = _rows(spottune("predict", "--model", f"{NAME}@latest", "--json", image, env=env))
    classes = json.loads((finished_run / "model.json").read_text())["classes"]
    assert latest[0]["label"] == classes[1] and latest[0]["probability"] > 0.99  # v2's head: class 1 wins
    assert latest == _rows(spottune("predict", "--model", f"{NAME}@v2", "--json", image, env=env))
    assert by_default[0]["probability"] != latest[0]["probability"]

    for ref, message, code in ((f"{NAME}@v9", "no such version", 4), ("../etc@production", "invalid model name", 3),
                               (f"{NAME}@bad/version", "invalid version", 3)):
        r = spottune("predict", "--model", ref, image, env=env)
        assert r.returncode == code and message in r.stderr and "Traceback" not in r.stderr, (ref, r.stderr)


@pytest.mark.parametrize("args,message", [
    (["--top-k", "0"], "--top-k must be at least 1 (got 0)"),
    (["--top-k", "-3"], "--top-k must be at least 1 (got -3)"),
    (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
])
def test_bad_numbers_give_one_line_errors(args, message, finished_run, images, tmp_path):
    r = spottune("predict", "--run", finished_run, *args, images, env=store_env(StoreSettings()))
    assert r.returncode == 3 and r.stderr.strip() == f"error: {message}", r.stderr


def test_run_and_model_are_exclusive_and_one_is_required(finished_run, images):
    env = store_env(StoreSettings())
    for extra in (["--run", str(finished_run), "--model", f"{NAME}@production"], []):
        r = spottune("predict", *extra, images, env=env)
        assert r.returncode == 2 and "--run" in r.stderr and "--model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_csv_matches_json_and_is_written_atomically(finished_run, images, tmp_path):
    env = store_env(StoreSettings())
    out = tmp_path / "out" / "predictions.csv"
    rows = _rows(spottune("predict", "--run", finished_run, "--json", "--csv", out, "--batch-size", "2", images, env=env))
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["path"], t["label"], float(t["probability"])) for t in table] == \
        [(r["path"], r["label"], r["probability"]) for r in rows]
    assert rows == _rows(spottune("predict", "--run", finished_run, "--json", images, env=env))  # batch size 64

    before = out.read_bytes()
    bad = images / "more" / "zz-broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = spottune("predict", "--run", finished_run, "--csv", out, "--batch-size", "2", images, env=env)
    assert r.returncode == 3 and str(bad) in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == ["predictions.csv"]

    r = spottune("predict", "--run", finished_run, images / "missing.png", env=env)
    assert r.returncode == 3 and "missing.png does not exist" in r.stderr


def test_images_stream_through_in_batches(finished_run, fashion_root):
    """The predictor pulls paths batch by batch: a row comes out before later images are even listed."""
    from spottune.inference import Predictor

    paths = sorted((fashion_root / "test" / "coat").glob("*.png"))[:10]
    pulled = []

    def source():
        for p in paths:
            pulled.append(p)
            yield p

    predictor = Predictor.from_folder(finished_run)
    rows = predictor.predict_paths(source(), batch_size=3)
    first = next(rows)
    assert first["path"] == str(paths[0]) and len(pulled) <= 6, len(pulled)
    rest = list(rows)
    assert [r["path"] for r in [first, *rest]] == [str(p) for p in paths]
    assert [r["label"] for r in [first, *rest]] == [r["label"] for r in predictor.predict_paths(paths, batch_size=64)]


@pytest.mark.slow
def test_a_spottune_model_by_name_streams_batches_as_it_predicts_images_one_by_one(fashion_root, tmp_path):
    """SpotTune queues each batch's policy one batch ahead: rows still pair with their images, and
    the routing (tuned blocks) and classes equal those of one image at a time."""
    from spottune.config import validate_params
    from spottune.settings import RuntimeSettings
    from spottune.training import fit

    params = validate_params({
        "data": {"root": str(fashion_root), "image_size": 32, "batch_size": 32, "eval_batch_size": 128},
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "method": "spottune"},
        "optim": {"epochs": 1, "max_steps_per_epoch": 3},
    }, "test")
    fit(params, tmp_path / "run", RuntimeSettings(device="cpu", progress=False), log=lambda _: None)
    settings = StoreSettings(store_backend="local", store_root=tmp_path / "artifacts")
    store = open_store(settings)
    store.publish(tmp_path / "run", NAME, gate=PASS)
    version = store.list_versions(NAME)[0].version
    store.promote(NAME, version)
    folder = tmp_path / "images"
    folder.mkdir()
    for cls in ("coat", "sneaker", "bag"):
        for p in sorted((fashion_root / "test" / cls).glob("*.png"))[:3]:
            shutil.copy(p, folder / f"{cls}-{p.name}")
    env = store_env(settings, SPOTTUNE_MODEL_CACHE_DIR=str(tmp_path / "cache"))

    batched = _rows(spottune("predict", "--model", f"{NAME}@production", "--json", "--batch-size", "2", folder, env=env))
    single = _rows(spottune("predict", "--model", f"{NAME}@{version}", "--json", "--batch-size", "1", folder, env=env))
    assert [r["path"] for r in batched] == sorted(str(p) for p in folder.glob("*.png"))
    assert all("tuned_blocks" in r for r in batched)
    for b, s in zip(batched, single, strict=True):
        assert (b["path"], b["label"], b["tuned_blocks"]) == (s["path"], s["label"], s["tuned_blocks"])
        assert b["probability"] == pytest.approx(s["probability"], abs=1e-4)

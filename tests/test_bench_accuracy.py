"""The accuracy benchmark end to end on CPU (its smoke profile): every run, the learning-rate choice on
validation, the ResNet-26 pretrained by the pipeline, and tables rebuilt from the result files alone."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    """bench/accuracy.py as a module; importable by name in spawned processes too (they get sys.path)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return importlib.import_module("accuracy")


@pytest.mark.slow
def test_smoke_benchmark_runs_every_cell_and_rebuilds_its_tables(tmp_path):
    work = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accuracy.py"), "smoke", "--work", str(work)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = _bench()
    profile = bench.smoke_profile()
    done = bench.load_done(work / "results")

    expected = {"resnet26/source.json"}
    for suite_name, suite in profile.suites.items():
        for target in suite.targets:
            for method in suite.methods:
                grid = [done[f"{suite_name}/{target}/{method}/lr{s:g}-seed0.json"] for s in suite.grid]
                chosen = max(grid, key=lambda r: (r["val_accuracy"], -r["lr_scale"]))["lr_scale"]
                expected |= {r["key"] for r in grid}
                expected |= {f"{suite_name}/{target}/{method}/lr{chosen:g}-seed{s}.json" for s in range(1, profile.seeds)}
    assert set(done) == expected

    labels = {r["test_labels_sha256"] for r in done.values() if r["target"] == "digits"}
    assert len(labels) == 1, "every method is tested on the same images"
    for r in done.values():
        assert 0.0 <= r["test"]["accuracy"] <= 1.0
        assert r["params"]["model"]["method"] == (r["overrides"]["model.method"])
    routed = [r for r in done.values() if r["method"] == "spottune-k"]
    assert routed and all(r["params"]["policy"]["global_k"] is not None for r in routed)

    # The ResNet-26 suite starts from the network the benchmark trained on its source task.
    weights = bench.source_weights(work / "results")
    assert weights.is_file()
    resnet = [r for r in done.values() if r["suite"] == "resnet26" and r["target"] != profile.source]
    assert resnet and all(r["params"]["model"]["weights"] == str(weights) for r in resnet)
    assert done["resnet26/source.json"]["params"]["model"]["weights"] == "none"

    # The document's tables are exactly what the result files give.
    text = (work / "results.md").read_text()
    tables = text.split(bench.BEGIN, 1)[1].split(bench.END, 1)[0].strip("\n")
    assert tables == bench.report_markdown(done, profile, work).strip("\n")
    for method in profile.suites["lite0"].methods:
        assert f"| {method} |" in tables
    assert (work / "results-routing-lite0.png").stat().st_size > 1000


def test_paired_difference_refuses_different_test_images():
    bench = _bench()
    a = {"seed": 0, "key": "a", "test_labels_sha256": "x", "test": {"images": 8}, "test_correct_bits": "/w=="}
    b = {**a, "key": "b", "test_labels_sha256": "y"}
    with pytest.raises(ValueError, match="different images"):
        bench.paired_difference([a], [b])
    same = bench.paired_difference([a], [{**a, "test_correct_bits": "AA=="}])  # all right -> all wrong
    assert same["difference"] == -1.0 and same["losses"] == 1


def test_paired_difference_is_the_pipelines_bootstrap_over_seeds():
    """The benchmark's CI is spottune.stats' bootstrap on per-image counts over the seeds, scaled."""
    import base64

    import numpy as np
    import torch

    from spottune.stats import bootstrap_difference

    bench = _bench()
    rng = np.random.default_rng(1)
    right = {(m, s): rng.random(300) < p for m, p in (("a", 0.7), ("b", 0.8)) for s in (0, 1, 2)}

    def run(method: str, seed: int) -> dict:
        bits = base64.b64encode(np.packbits(right[method, seed]).tobytes()).decode()
        return {"seed": seed, "key": f"{method}{seed}", "test_labels_sha256": "x", "test": {"images": 300},
                "test_correct_bits": bits}

    got = bench.paired_difference([run("a", s) for s in range(3)], [run("b", s) for s in range(3)], seed=4)
    counts = {m: torch.from_numpy(sum(right[m, s].astype(np.int64) for s in range(3))) for m in "ab"}
    want = bootstrap_difference(counts["a"], counts["b"], seed=4)
    assert got["seeds"] == 3 and got["wins"] + got["losses"] == 3
    for key in ("difference", "ci_low", "ci_high"):
        assert got[key] == pytest.approx(want[key] / 3)
    assert got["difference"] == pytest.approx(np.mean([right["b", s].mean() - right["a", s].mean() for s in range(3)]))
    assert got["ci_low"] < got["difference"] < got["ci_high"]


def test_written_tables_keep_the_hand_written_reading(tmp_path):
    bench = _bench()
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\nreading before\n\n{bench.BEGIN}\nold\n{bench.END}\n\nreading after\n")
    bench.write_report(doc, "new tables")
    assert doc.read_text() == f"# Results\n\nreading before\n\n{bench.BEGIN}\nnew tables\n{bench.END}\n\nreading after\n"


def _start_method_and_threads() -> tuple[str, str | None, str | None]:
    import multiprocessing
    import os

    return multiprocessing.get_start_method(), os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")


def test_pool_workers_fork_their_data_loaders_and_take_one_gpu_each():
    """A spawned worker would otherwise start every DataLoader worker by spawning too: a fresh torch
    import per worker per epoch, which made GPU runs crawl."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bench = _bench()
    ctx = multiprocessing.get_context("spawn")
    slots = ctx.Queue()
    slots.put(1)
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=bench._pin_gpu, initargs=(slots,)) as pool:
        method, gpu, threads = pool.submit(_start_method_and_threads).result(timeout=120)
    assert (method, gpu, threads) == ("fork", "1", "1")


@pytest.mark.slow
def test_a_diverging_learning_rate_is_recorded_and_never_chosen(tmp_path):
    """A scale too large for a method is a result of the grid (kept, never chosen), not a crash of the benchmark."""
    bench = _bench()
    profile = bench.smoke_profile()
    bench.prepare(profile, tmp_path / "data")
    base = {"lr_net": 0.01, "lr_head": 0.1, "lr_policy": 0.01}
    job = bench.target_job(profile, tmp_path / "data", tmp_path / "results", base, "lite0", "digits", "finetune", 0, 1e30)
    result = bench.run_job(job, tmp_path / "results", tmp_path / "runs", "cpu")
    assert "not finite" in result["diverged"] and result["val_accuracy"] is None and result["test"] is None
    assert bench.load_done(tmp_path / "results")[job.key] == result
    assert not (tmp_path / "runs" / job.key.removesuffix(".json")).exists()
    finished = {**result, "lr_scale": 3.0, "val_accuracy": 0.1, "diverged": None}
    assert bench.choose_scale([result, finished]) == 3.0
    assert bench._finished([result, finished]) == [finished]

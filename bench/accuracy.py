"""Accuracy benchmark: SpotTune against fine-tuning and its peers on real data, with equal budgets.

Every run is the pipeline's own `spottune.training.fit` on an ImageFolder tree, followed by the
pipeline's own evaluation; the benchmark only chooses the settings, schedules the runs and reads
their results. Each finished run leaves one small JSON file (kept in the repository), so the tables
in docs/results.md can be rebuilt without a GPU.

    python bench/accuracy.py prepare --data-dir bench-data            materialise the datasets (CPU, once)
    python bench/accuracy.py run --data-dir bench-data --gpus 4 --jobs-per-gpu 3
    python bench/accuracy.py run --data-dir bench-data --suites lite0 --targets mnist-100 --methods spottune
    python bench/accuracy.py report                                   tables and figure into docs/results.md
    python bench/accuracy.py smoke --work DIR                         all of it on a tiny subset, on CPU

Protocol (the `full` profile):
  suites     lite0: EfficientNet-Lite0 with its ImageNet weights; resnet26: a ResNet-26 the pipeline
             first trains on Fashion-MNIST (not ImageNet), then transfers to the other targets;
             study: SpotTune variants (temperature, policy learning rate, annealing, global-k weight,
             BN statistics of the frozen copy), on the targets where SpotTune lost most;
             dev: variants compared on the development targets only (fashion-100, digits), chosen
             on validation; the choice then runs in lite0 (`spottune-lead`), whose other targets
             (mnist-100, mnist-1000, fashion-1000) confirm or refute it
  targets    MNIST and Fashion-MNIST with 100 and 1,000 training images per class, scikit-learn's
             digits (all of its train split); 28x28 or 8x8 grey images upsampled to 64 px, channels repeated
  budget     the same epochs, batch size and schedule for every method of a target
  lr         each method's learning rates (net, head, policy together) scaled by 0.3, 1, 3 or 10, the
             scale chosen on seed 0's validation accuracy (10% of the training images), never on test;
             a run whose loss diverges is kept as such (no accuracy) and never chosen
  seeds      0, 1, 2 at the chosen scale (a seed changes initialisation, order and the validation carve-out)
Runs are independent processes spread over the GPUs; finished runs are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spottune.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent
# Relative to the repository root, where the benchmark runs: result files name no machine's paths.
RESULTS = Path("bench/results/accuracy")
RESULTS_DOC = Path("docs/results.md")
BEGIN, END = "<!-- accuracy-tables:begin -->", "<!-- accuracy-tables:end -->"


@dataclass(frozen=True)
class Target:
    """A dataset tree and its training budget."""

    source: str  # a spottune data source
    train_per_class: int | None
    test_per_class: int | None
    epochs: int


@dataclass(frozen=True)
class Suite:
    backbone: str
    weights: str  # 'imagenet', or 'source' for the backbone pretrained by this benchmark
    targets: tuple[str, ...]
    methods: dict[str, dict[str, Any]]
    grid: tuple[float, ...]
    reference: str | None = None  # a suite whose fine-tuning runs this one is also compared with


@dataclass(frozen=True)
class Profile:
    targets: dict[str, Target]
    suites: dict[str, Suite]
    source: str  # the target tree the resnet26 suite pretrains on
    source_overrides: dict[str, Any]
    seeds: int
    overrides: dict[str, Any]  # for every run
    max_steps_per_epoch: int | None = None
    note: str = ""


# A method's settings are `--set` overrides, except `base.lr_*`: a base learning rate (instead of
# params.yaml's) that the grid scales like the others. An `optim.lr_*` override is fixed, not scaled.
PAPER = {"policy.temperature": 5.0, "base.lr_policy": 0.01,  # the 2019 paper's policy settings
         "policy.init_tune_probability": 0.5}
LEAD = {"policy.temperature": 1.0, "base.lr_policy": 0.1,  # the study's lead, chosen by suite dev
        "policy.init_tune_probability": 0.5}


def _methods(blocks: int) -> dict[str, dict[str, Any]]:
    return {
        "linear": {"model.method": "linear"},
        "finetune": {"model.method": "finetune"},
        "l2sp": {"model.method": "l2sp"},
        "spottune": {"model.method": "spottune"},
        "spottune-k": {"model.method": "spottune", "policy.global_k": blocks // 2},
        # params.yaml's settings before the second development round (the paper's: every block starts undecided)
        "spottune-paper": {"model.method": "spottune", **PAPER},
        "spottune-k-paper": {"model.method": "spottune", "policy.global_k": blocks // 2, **PAPER},
        # the development suite's lead, confirmed here on the targets that did not choose it
        "spottune-lead": {"model.method": "spottune", **LEAD},
        "spottune-k-lead": {"model.method": "spottune", "policy.global_k": blocks // 2, **LEAD},
    }


# The study of the paper's settings (run before the defaults changed): each variant changes them.
STUDY = {name: {"model.method": "spottune", **PAPER, **change} for name, change in {
    "spottune": {},
    "temperature-1": {"policy.temperature": 1.0},
    "anneal-0.9": {"policy.temperature_decay": 0.9},
    "policy-lr-x10": {"optim.lr_policy": 0.1},
    "k-weak": {"policy.global_k": 8, "policy.k_weight": 0.1},
    "frozen-bn-target": {"policy.frozen_bn": "target"},
    "t1-policy-lr-x10": {"policy.temperature": 1.0, "optim.lr_policy": 0.1},
}.items()}

# Development of the defaults, on the development targets only (choice on validation accuracy): the
# study's lead (temperature 1, policy learning rate 0.1, scaled with the grid) and what may make the
# routing per image (the usage term) or start it as fine-tuning (init_tune_probability).
_LEAD = {"model.method": "spottune", **LEAD}
DEV = {
    "lead": _LEAD,
    "usage-0.1": {**_LEAD, "policy.usage_weight": 0.1},
    "usage-1": {**_LEAD, "policy.usage_weight": 1.0},
    "start-0.9": {**_LEAD, "policy.init_tune_probability": 0.9},
    "start-0.9-usage-0.1": {**_LEAD, "policy.init_tune_probability": 0.9, "policy.usage_weight": 0.1},
    # The usage term has no gradient at a start where every image has the same logits: break the symmetry.
    "random-init": {**_LEAD, "policy.init_weight_std": 0.1},
    "random-init-usage-1": {**_LEAD, "policy.init_weight_std": 0.1, "policy.usage_weight": 1.0},
    "random-init-usage-3": {**_LEAD, "policy.init_weight_std": 0.1, "policy.usage_weight": 3.0},
}
# The second development round, from the paper's settings: what reconciles training's sampled
# decisions with evaluation's (the expected output at test, or Gumbel noise annealed to zero), the
# tuned copy pulled toward the pretrained weights (L2-SP inside SpotTune), and per-image routing
# (usage term from a random start) evaluated by expectation.
_PAPER = {"model.method": "spottune", **PAPER}
_K = {"policy.global_k": 8}
_EXPECT = {"policy.eval_decisions": "expectation"}
_ANNEAL = {"policy.noise_schedule": "cosine"}
_SP = {"model.tuned_l2sp_alpha": 0.001}
DEV2 = {
    "expectation": {**_PAPER, **_EXPECT},
    "noise-anneal": {**_PAPER, **_ANNEAL},
    "k-expectation": {**_PAPER, **_K, **_EXPECT},
    "k-noise-anneal": {**_PAPER, **_K, **_ANNEAL},
    "l2sp": {**_PAPER, **_SP},
    "expectation-l2sp": {**_PAPER, **_EXPECT, **_SP},
    "t1-expectation": {**_PAPER, **_EXPECT, "policy.temperature": 1.0},
    "usage-expectation": {**_PAPER, **_EXPECT, "policy.usage_weight": 1.0, "policy.init_weight_std": 0.1},
    # added after the eight above had run: start as fine-tuning (each block tuned with probability 0.9),
    # so that the frozen copy takes over only where it does better
    "start-0.9": {**_PAPER, "policy.init_tune_probability": 0.9},
    "start-0.9-noise-anneal": {**_PAPER, "policy.init_tune_probability": 0.9, **_ANNEAL},
    "start-0.9-expectation": {**_PAPER, "policy.init_tune_probability": 0.9, **_EXPECT},
}
DEV_TARGETS = ("fashion-100", "digits")
CONFIRM_TARGETS = ("mnist-100", "mnist-1000", "fashion-1000")  # never used to choose a setting


def full_profile() -> Profile:
    targets = {
        "mnist-100": Target("mnist", 100, None, 20),
        "mnist-1000": Target("mnist", 1000, None, 6),
        "fashion-100": Target("fashion-mnist", 100, None, 20),
        "fashion-1000": Target("fashion-mnist", 1000, None, 6),
        "digits": Target("digits", None, None, 20),
        # confirmation targets added after the first two rounds had seen the five above
        "mnist-300": Target("mnist", 300, None, 10),
        "fashion-300": Target("fashion-mnist", 300, None, 10),
        "fashion-source": Target("fashion-mnist", 2000, 100, 15),
    }
    grid = (0.3, 1.0, 3.0, 10.0)
    return Profile(
        targets=targets,
        suites={
            "lite0": Suite("efficientnet_lite0", "imagenet",
                           ("mnist-100", "mnist-1000", "fashion-100", "fashion-1000", "digits"), _methods(16), grid),
            "resnet26": Suite("resnet26", "source", ("mnist-100", "digits", "mnist-1000"), _methods(12),
                              (*grid, 30.0)),  # its fine-tuning chose 10, the top of `grid`, on every target
            "study": Suite("efficientnet_lite0", "imagenet", DEV_TARGETS, STUDY, grid, reference="lite0"),
            "dev": Suite("efficientnet_lite0", "imagenet", DEV_TARGETS, DEV, grid, reference="lite0"),
            "fresh": Suite("efficientnet_lite0", "imagenet", ("mnist-300", "fashion-300"),
                           {k: v for k, v in _methods(16).items() if k in ("finetune", "spottune", "spottune-k")}, grid),
            "dev2": Suite("efficientnet_lite0", "imagenet", DEV_TARGETS, DEV2, (1.0, 3.0, 10.0), reference="lite0"),
        },
        source="fashion-source",
        source_overrides={"optim.lr_net": 0.1, "optim.lr_head": 0.1, "data.batch_size": 128},
        seeds=3,
        overrides={"data.image_size": 64, "data.batch_size": 128, "data.eval_batch_size": 500, "data.val_fraction": 0.1},
    )


def smoke_profile() -> Profile:
    targets = {"digits": Target("digits", 12, 6, 1), "fashion-source": Target("fashion-mnist", 12, 4, 1)}
    methods = {k: v for k, v in _methods(16).items() if not k.endswith("-lead")}
    return Profile(
        targets=targets,
        suites={
            "lite0": Suite("efficientnet_lite0", "imagenet", ("digits",), methods, (0.3, 1.0)),
            "resnet26": Suite("resnet26", "source", ("digits",), {k: methods[k] for k in ("finetune", "spottune")},
                              (1.0,)),
        },
        source="fashion-source",
        source_overrides={"optim.lr_net": 0.1},
        seeds=2,
        overrides={"data.image_size": 32, "data.batch_size": 16, "data.eval_batch_size": 64, "data.val_fraction": 0.25},
        max_steps_per_epoch=2,
        note="smoke profile: a tiny subset on CPU; these numbers say nothing about accuracy",
    )


PROFILES = {"full": full_profile, "smoke": smoke_profile}


# --- jobs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One training run; `key` is its result file relative to the results folder."""

    key: str
    suite: str
    target: str
    method: str
    seed: int
    lr_scale: float
    overrides: dict[str, Any] = field(hash=False)


def _scaled_lrs(scale: float, base: dict[str, float]) -> dict[str, Any]:
    return {f"optim.{k}": round(v * scale, 6) for k, v in base.items()}


def source_job(profile: Profile, data_dir: Path) -> Job:
    t = profile.targets[profile.source]
    overrides = {**profile.overrides, "data.root": str(data_dir / profile.source), "model.backbone": "resnet26",
                 "model.weights": "none", "model.method": "finetune", "optim.epochs": t.epochs, "optim.seed": 0,
                 **profile.source_overrides}
    return Job("resnet26/source.json", "resnet26", profile.source, "finetune", 0, 1.0, overrides)


def source_weights(results: Path) -> Path:
    """Where the pretrained ResNet-26 is kept: beside the results, never committed (see .gitignore)."""
    return results / "resnet26" / "source.safetensors"


def target_job(profile: Profile, data_dir: Path, results: Path, base_lrs: dict[str, float],
               suite_name: str, target: str, method: str, seed: int, scale: float) -> Job:
    suite, t = profile.suites[suite_name], profile.targets[target]
    weights = str(source_weights(results)) if suite.weights == "source" else suite.weights
    method_overrides = {k: v for k, v in suite.methods[method].items() if not k.startswith("base.")}
    base_lrs = {**base_lrs, **{k.removeprefix("base."): v for k, v in suite.methods[method].items()
                               if k.startswith("base.")}}
    lrs = _scaled_lrs(scale, {k: v for k, v in base_lrs.items() if f"optim.{k}" not in method_overrides})
    overrides = {**profile.overrides, "data.root": str(data_dir / target), "model.backbone": suite.backbone,
                 "model.weights": weights, "optim.epochs": t.epochs, "optim.seed": seed, **lrs, **method_overrides}
    if profile.max_steps_per_epoch:
        overrides["optim.max_steps_per_epoch"] = profile.max_steps_per_epoch
    return Job(f"{suite_name}/{target}/{method}/lr{scale:g}-seed{seed}.json", suite_name, target, method, seed, scale,
               overrides)


def ready_jobs(profile: Profile, data_dir: Path, results: Path, done: dict[str, dict], base_lrs: dict[str, float],
               only: dict[str, set[str] | None]) -> list[Job]:
    """Every job whose inputs exist: grid runs at seed 0, then the other seeds at the chosen scale."""
    jobs: list[Job] = []
    for suite_name, suite in profile.suites.items():
        if only["suites"] and suite_name not in only["suites"]:
            continue
        if suite.weights == "source":
            src = source_job(profile, data_dir)
            # The weights are not committed: a checkout without them trains the source again, and the
            # suite's runs made from the old weights are moved aside first (see `superseded`).
            if src.key not in done or not source_weights(results).is_file():
                jobs.append(src)
                continue
        for target in suite.targets:
            if only["targets"] and target not in only["targets"]:
                continue
            for method in suite.methods:
                if only["methods"] and method not in only["methods"]:
                    continue
                grid = [target_job(profile, data_dir, results, base_lrs, suite_name, target, method, 0, s)
                        for s in suite.grid]
                jobs += [j for j in grid if j.key not in done]
                if all(j.key in done for j in grid):
                    scale = choose_scale([done[j.key] for j in grid])
                    jobs += [j for seed in range(1, profile.seeds)
                             if (j := target_job(profile, data_dir, results, base_lrs, suite_name, target, method,
                                                 seed, scale)).key not in done]
    return jobs


def choose_scale(grid_results: list[dict]) -> float:
    """The learning-rate scale with the best validation accuracy (ties: the smaller scale; diverged: never)."""
    best = max(grid_results, key=lambda r: (-1.0 if r["val_accuracy"] is None else r["val_accuracy"], -r["lr_scale"]))
    return best["lr_scale"]


def run_job(job: Job, results: Path, work: Path, device: str) -> dict:
    """Train and evaluate one run with the pipeline's code; write its JSON; drop the heavy run folder."""
    import numpy as np
    import torch

    from spottune.compare import evaluate_run
    from spottune.config import load_params
    from spottune.settings import RuntimeSettings
    from spottune.training import export_backbone, fit

    started = time.perf_counter()
    params = load_params(ROOT / "params.yaml", [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                                for k, v in job.overrides.items()])
    runtime = RuntimeSettings(device=device, progress=False)
    run_dir = work / job.key.removesuffix(".json")
    head = {"key": job.key, "suite": job.suite, "target": job.target, "method": job.method, "seed": job.seed,
            "lr_scale": job.lr_scale, "overrides": job.overrides, "params": params.model_dump(mode="json")}
    try:
        metrics = fit(params, run_dir, runtime, overwrite=True, log=lambda _: None)
    except FloatingPointError as e:  # a learning rate too large for this method: a result, not a crash
        shutil.rmtree(run_dir, ignore_errors=True)
        return _write_result(results, job, {
            **head, "diverged": str(e), "val_accuracy": None, "test": None,
            "wall_seconds": time.perf_counter() - started, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else device})
    evaluation = evaluate_run(run_dir, runtime)
    p = evaluation["predictions"]
    correct = (p["predictions"] == p["labels"]).numpy()
    history = metrics["history"]
    out = {
        **head,
        "val_accuracy": history[-1]["val"].get("accuracy") if history[-1]["val"] else None,
        "val_history": [h["val"].get("accuracy") for h in history],
        "train_accuracy": history[-1]["train"]["accuracy"],
        "test": evaluation["metrics"],
        "test_labels_sha256": hashlib.sha256(p["labels"].numpy().astype("int64").tobytes()).hexdigest(),
        "test_correct_bits": base64.b64encode(np.packbits(correct).tobytes()).decode(),
        "classes": evaluation["classes"],
        "train_images_per_s": metrics["train_images_per_s"],
        "wall_seconds": time.perf_counter() - started,
        "device": metrics["device"], "torch": torch.__version__,
    }
    if job.key.endswith("source.json"):
        info = export_backbone(run_dir, source_weights(results))
        out["exported"] = {"sha256": hashlib.sha256(Path(info["path"]).read_bytes()).hexdigest(),
                           "tensors": info["tensors"]}
    shutil.rmtree(run_dir, ignore_errors=True)
    return _write_result(results, job, out)


def _write_result(results: Path, job: Job, out: dict) -> dict:
    write_json(results / job.key, out, indent=1)
    return out


def _pin_gpu(slots) -> None:
    """Process-pool initializer: each worker takes one GPU (of those visible) before torch is imported."""
    import multiprocessing

    gpu = slots.get()
    # A spawned process's own children default to 'spawn' too: every DataLoader would then re-import
    # torch in each of its workers at every epoch (seconds each, measured: 5 s against 0.1 s per
    # epoch of digits). This process is still single-threaded here, so forking later is as safe as
    # in a plain `spottune train`.
    multiprocessing.set_start_method("fork", force=True)
    # Several runs share the machine's cores: one compute thread each, as torchrun does.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)


SUPERSEDED = "superseded"  # runs kept for the record whose inputs are gone (a source backbone trained again)


def load_done(results: Path) -> dict[str, dict]:
    """Every run's result file (those in suite folders; summary.json beside them is no run)."""
    return {str(p.relative_to(results)): json.loads(p.read_text()) for p in sorted(results.rglob("*.json"))
            if p.parent != results and p.relative_to(results).parts[0] != SUPERSEDED}


def run_all(profile: Profile, data_dir: Path, results: Path, work: Path, *, gpus: int, jobs_per_gpu: int,
            only: dict[str, set[str] | None], device: str = "cuda", log=print) -> dict[str, dict]:
    """Schedule every ready job on a pool of processes (GPUs x jobs per GPU, or one inline on CPU)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from spottune.config import load_params

    optim = load_params(ROOT / "params.yaml", []).optim
    base_lrs = {"lr_net": optim.lr_net, "lr_head": optim.lr_head, "lr_policy": optim.lr_policy}
    done = load_done(results)
    started = time.perf_counter()
    if gpus == 0:  # inline, on CPU: the smoke profile inside the test suite
        while jobs := ready_jobs(profile, data_dir, results, done, base_lrs, only):
            for job in jobs:
                done[job.key] = run_job(job, results, work, "cpu")
                log(f"{job.key}: {_outcome(done[job.key])}")
        return done
    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for i in range(gpus * jobs_per_gpu):
        slots.put(i % gpus)
    running: dict = {}
    failed: set[str] = set()  # tried again by the next `run`, not by this one
    workers = gpus * jobs_per_gpu
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pin_gpu, initargs=(slots,)) as pool:
        while True:
            # No queue beyond the free slots: the next free slot takes the first ready job, so the
            # suites finish in order (a cut-short run leaves whole suites, not a bit of each).
            busy = {j.key for j in running.values()} | failed
            for job in [j for j in ready_jobs(profile, data_dir, results, done, base_lrs, only)
                        if j.key not in busy][: workers - len(running)]:
                running[pool.submit(run_job, job, results, work, device)] = job
            if not running:
                return done
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                if fut.exception() is not None:  # one failed run ends neither the others nor the benchmark
                    failed.add(job.key)
                    log(f"[{time.perf_counter() - started:6.0f} s] {job.key}: FAILED: {fut.exception()}")
                    continue
                done[job.key] = fut.result()
                log(f"[{time.perf_counter() - started:6.0f} s] {job.key}: {_outcome(done[job.key])} "
                    f"({done[job.key]['wall_seconds']:.0f} s)")


def _outcome(result: dict) -> str:
    if result.get("diverged"):
        return "diverged"
    return f"val {result['val_accuracy']:.4f}, test {result['test']['accuracy']:.4f}"


# --- data ---------------------------------------------------------------------------------------------


def prepare(profile: Profile, data_dir: Path, fashion_mnist_dir: Path | None = None) -> None:
    from spottune.data.sources import DATASET_CARD, materialise

    kwargs = {"fashion_mnist_dir": fashion_mnist_dir} if fashion_mnist_dir else {}
    for name, t in profile.targets.items():
        if (data_dir / name / DATASET_CARD).is_file():
            continue
        materialise(t.source, data_dir / name, train_per_class=t.train_per_class, test_per_class=t.test_per_class,
                    seed=0, **kwargs)


# --- report -------------------------------------------------------------------------------------------


def _correct(result: dict):
    import numpy as np

    bits = np.frombuffer(base64.b64decode(result["test_correct_bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: result["test"]["images"]].astype(bool)


def final_runs(done: dict[str, dict], profile: Profile) -> dict[tuple[str, str, str], list[dict]]:
    """(suite, target, method) -> the runs at the chosen scale, one per seed, in seed order (diverged ones too)."""
    cells: dict[tuple[str, str, str], list[dict]] = {}
    for suite_name, suite in profile.suites.items():
        for target in suite.targets:
            for method in suite.methods:
                grid = [r for r in done.values() if (r["suite"], r["target"], r["method"], r["seed"]) ==
                        (suite_name, target, method, 0)]
                if len(grid) < len(suite.grid):
                    continue
                scale = choose_scale(grid)
                runs = sorted((r for r in done.values() if (r["suite"], r["target"], r["method"], r["lr_scale"]) ==
                               (suite_name, target, method, scale)), key=lambda r: r["seed"])
                cells[(suite_name, target, method)] = runs
    return cells


def _finished(runs: list[dict] | None) -> list[dict]:
    """The runs that trained to the end (a diverged run has no test accuracy)."""
    return [r for r in runs or [] if not r.get("diverged")]


def paired_difference(a_runs: list[dict], b_runs: list[dict], samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean over seeds of accuracy(b) - accuracy(a), with the pipeline's paired bootstrap CI over test
    images, so both report one statistic. It resamples each image's count of right answers over the
    seeds (whole numbers: an exact zero stays zero), then divides by the number of seeds."""
    import numpy as np
    import torch

    from spottune.stats import bootstrap_difference

    seeds = sorted({r["seed"] for r in a_runs} & {r["seed"] for r in b_runs})
    a = {r["seed"]: r for r in a_runs}
    b = {r["seed"]: r for r in b_runs}
    for s in seeds:
        if a[s]["test_labels_sha256"] != b[s]["test_labels_sha256"]:
            raise ValueError(f"{a[s]['key']} and {b[s]['key']} were tested on different images")
    a_right = torch.from_numpy(np.sum([_correct(a[s]) for s in seeds], axis=0))
    b_right = torch.from_numpy(np.sum([_correct(b[s]) for s in seeds], axis=0))
    boot = bootstrap_difference(a_right, b_right, samples=samples, seed=seed)
    per_seed = [float(_correct(b[s]).mean() - _correct(a[s]).mean()) for s in seeds]
    return {"difference": boot["difference"] / len(seeds), "ci_low": boot["ci_low"] / len(seeds),
            "ci_high": boot["ci_high"] / len(seeds), "seeds": len(seeds),
            "wins": sum(d > 0 for d in per_seed), "losses": sum(d < 0 for d in per_seed)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report_markdown(done: dict[str, dict], profile: Profile, figure_dir: Path | None) -> str:
    """The tables of docs/results.md, rebuilt from the result files alone."""
    cells = final_runs(done, profile)
    lines: list[str] = []
    if profile.note:
        lines += [f"> {profile.note}", ""]
    for suite_name, suite in profile.suites.items():
        targets = [t for t in suite.targets if any((suite_name, t, m) in cells for m in suite.methods)]
        if not targets:
            continue
        suite = dataclasses.replace(suite, methods={m: v for m, v in suite.methods.items()
                                                    if any((suite_name, t, m) in cells for t in targets)})
        lines += [f"### Suite `{suite_name}`: {suite.backbone}, weights: "
                  + ("ImageNet" if suite.weights == "imagenet" else f"trained by the pipeline on {profile.source} (not ImageNet)"), ""]
        lines += ["Test top-1 (%), mean ± std over seeds; the chosen learning-rate scale in brackets.", ""]
        lines += ["| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
        for method in suite.methods:
            row = []
            for t in targets:
                runs = cells.get((suite_name, t, method))
                if not runs:
                    row.append("–")
                    continue
                ok, lost = _finished(runs), sum(bool(r.get("diverged")) for r in runs)
                note = f", {lost} diverged" if lost else ""
                if not ok:
                    row.append(f"diverged (n={len(runs)}) [{runs[0]['lr_scale']:g}]")
                    continue
                m, s = _mean_std([100 * r["test"]["accuracy"] for r in ok])
                row.append(f"{m:.2f} ± {s:.2f} (n={len(ok)}{note}) [{runs[0]['lr_scale']:g}]")
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        baseline = "finetune" if "finetune" in suite.methods else next(iter(suite.methods))
        lines += ["", (f"Paired difference against `{baseline}` (percentage points): mean over seeds, 95% "
                       "bootstrap CI over test images, seeds won / lost."), ""]
        lines += _difference_table(cells, suite_name, [m for m in suite.methods if m != baseline], targets,
                                   (suite_name, baseline))
        if suite.reference:
            lines += ["", f"Paired difference against `finetune` of suite `{suite.reference}` (the same test images).", ""]
            lines += _difference_table(cells, suite_name, list(suite.methods), targets, (suite.reference, "finetune"))
        routed = [m for m in suite.methods if suite.methods[m].get("model.method") == "spottune"]
        if routed:
            lines += ["", "Tuned blocks per test image (of the backbone's blocks), mean over seeds.", ""]
            lines += ["| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
            for method in routed:
                vals = []
                for t in targets:
                    runs = _finished(cells.get((suite_name, t, method)))
                    vals.append(f"{_mean_std([r['test']['tuned_blocks_per_image'] for r in runs])[0]:.1f}" if runs else "–")
                lines.append(f"| {method} | " + " | ".join(vals) + " |")
            lines += ["", ("How per image the routing is: blocks where 5-95% of test images tune (mixed blocks), "
                           "mean over seeds; in brackets the largest share of test images that take a block's less "
                           "common branch."), ""]
            lines += ["| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
            for method in routed:
                vals = []
                for t in targets:
                    runs = _finished(cells.get((suite_name, t, method)))
                    vals.append(f"{_mean_std([_mixed_blocks(r) for r in runs])[0]:.1f} "
                                f"[{max(max(_minority(r)) for r in runs):.2f}]" if runs else "–")
                lines.append(f"| {method} | " + " | ".join(vals) + " |")
            if figure_dir is not None:
                name = routing_figure(cells, suite_name, targets, routed[0], figure_dir)
                if name:
                    lines += ["", f"![which blocks {routed[0]} tunes per target]({name})"]
        lines.append("")
    runs = list(done.values())
    devices = sorted({r["device"] for r in runs})
    gpu_seconds = sum(r["wall_seconds"] for r in runs)
    lines += [(f"{len(runs)} runs on {', '.join(devices)}; {gpu_seconds / 3600:.2f} process-hours in all "
               "(runs share GPUs, so wall time is less: see the command log below)."), ""]
    return "\n".join(lines)


def _minority(result: dict) -> list[float]:
    """Per block, the share of test images that take the branch most images do not take."""
    return result["test"].get("minority_fraction_per_block") or [
        min(f, 1 - f) for f in result["test"]["tuned_fraction_per_block"]]


def _mixed_blocks(result: dict) -> int:
    """Blocks where 5% to 95% of the test images tune (recomputed for runs that predate the metric)."""
    from spottune.stats import mixed_blocks

    if "mixed_blocks" in result["test"]:
        return result["test"]["mixed_blocks"]
    return mixed_blocks(result["test"]["tuned_fraction_per_block"])


def summary(done: dict[str, dict], profile: Profile, suite_name: str = "lite0") -> dict[str, Any]:
    """SpotTune minus fine-tuning per target of a suite (percentage points, paired bootstrap CI) and routing."""
    import subprocess

    cells = final_runs(done, profile)
    targets: dict[str, Any] = {}
    for t in profile.suites[suite_name].targets:
        a = _finished(cells.get((suite_name, t, "finetune")))
        b = _finished(cells.get((suite_name, t, "spottune")))
        if not a or not b:
            continue
        d = paired_difference(a, b)
        targets[t] = {
            "spottune_minus_finetune": {"mean": 100 * d["difference"], "ci_low": 100 * d["ci_low"],
                                        "ci_high": 100 * d["ci_high"]},
            "seeds": d["seeds"],
            "mixed_blocks": _mean_std([_mixed_blocks(r) for r in b])[0],
            "blocks": len(b[0]["test"]["tuned_fraction_per_block"]),
        }
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,  # no git: no commit
                            check=False).stdout.strip() or None
    return {"suite": suite_name, "targets": targets, "commit": commit}


def _difference_table(cells, suite_name: str, methods: list[str], targets: list[str],
                      baseline: tuple[str, str]) -> list[str]:
    """Rows of `paired_difference` per method and target against the (suite, method) `baseline`."""
    lines = ["| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for method in methods:
        row = []
        for t in targets:
            a = _finished(cells.get((baseline[0], t, baseline[1])))
            b = _finished(cells.get((suite_name, t, method)))
            if not a or not b:
                row.append("–")
                continue
            d = paired_difference(a, b)
            row.append(f"{100 * d['difference']:+.2f} [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}] "
                       f"{d['wins']}/{d['losses']}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def routing_figure(cells, suite_name: str, targets: list[str], method: str, out_dir: Path) -> str | None:
    """A heatmap: per target, the fraction of test images for which each block runs its tuned copy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kept = [t for t in targets if _finished(cells.get((suite_name, t, method)))]
    rows = [np.mean([r["test"]["tuned_fraction_per_block"] for r in _finished(cells[(suite_name, t, method)])], axis=0)
            for t in kept]
    if not rows:
        return None
    data = np.array(rows)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * data.shape[1], 0.8 + 0.45 * len(rows)))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(data.shape[1]), [str(i) for i in range(data.shape[1])])
    ax.set_yticks(range(len(rows)), kept)
    ax.set_xlabel("block")
    ax.set_title(f"{suite_name}: fraction of test images tuned, {method}")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    name = f"results-routing-{suite_name}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def write_report(doc: Path, tables: str) -> None:
    """Replace the generated part of `doc` (between the markers), keeping the hand-written reading."""
    text = doc.read_text() if doc.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{tables}\n{END}{tail}")


# --- command line -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("prepare", "run", "report", "smoke"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-data"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="run folders while they train")
    parser.add_argument("--doc", type=Path, default=RESULTS_DOC)
    parser.add_argument("--gpus", type=int, default=None, help="default: every visible GPU (0: inline on CPU)")
    parser.add_argument("--jobs-per-gpu", type=int, default=3, help="runs sharing one GPU at a time")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to spread runs over processes without a GPU")
    parser.add_argument("--workers", type=int, default=3, help="data-loading processes per run")
    parser.add_argument("--suites", nargs="*")
    parser.add_argument("--targets", nargs="*")
    parser.add_argument("--methods", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "smoke":  # everything, tiny, on CPU, inside args.work
        profile = smoke_profile()
        args.data_dir, args.results, args.doc = args.work / "data", args.work / "results", args.work / "results.md"
        prepare(profile, args.data_dir)
        run_all(profile, args.data_dir, args.results, args.work / "runs", gpus=0, jobs_per_gpu=1,
                only={"suites": None, "targets": None, "methods": None})
        write_report(args.doc, report_markdown(load_done(args.results), profile, args.work))
        print(args.doc.read_text())
        return 0
    profile = PROFILES[args.profile]()
    if args.command == "prepare":
        prepare(profile, args.data_dir)
    elif args.command == "run":
        import torch  # only the parent: workers pin their GPU before importing it

        gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
        profile.overrides["data.num_workers"] = args.workers
        only = {"suites": set(args.suites or []) or None, "targets": set(args.targets or []) or None,
                "methods": set(args.methods or []) or None}
        started = time.perf_counter()
        run_all(profile, args.data_dir, args.results, args.work, gpus=gpus, jobs_per_gpu=args.jobs_per_gpu, only=only,
                device=args.device)
        print(f"all runs done in {time.perf_counter() - started:.0f} s wall on {gpus} GPU(s)")
    else:
        done = load_done(args.results)
        write_report(args.doc, report_markdown(done, profile, args.doc.parent))
        out = args.results / "summary.json"
        write_json(out, summary(done, profile), indent=1)
        print(f"wrote {args.doc} and {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

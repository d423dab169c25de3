"""Shared fixtures: small real datasets materialised once per test session, tiny run settings, one real
finished run and a moto S3 server per session. Helpers live in support.py.

Markers (registered in pyproject.toml; `make test` runs them all, `make test-fast` none of them):
  slow         the test itself trains (fit(), `spottune train` to the end, a DVC training stage, a flow
               run, the benchmark), or takes more than about 3 s on 2 cores (child processes that
               import torch, hypothesis fuzzing); the session's one tiny `finished_run` is shared setup
  integration  a real external part runs: dvc, the moto S3 server, Prefect's server, uvicorn
  gpu          CUDA code paths; skipped here without a GPU (pytest_collection_modifyitems)
A missing optional package skips through support.requires, a missing GPU through the marker."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import MotoServer, dummy_aws_env

os.environ.setdefault("SPOTTUNE_PROGRESS", "false")
# cuBLAS reads this when CUDA starts: deterministic kernels for the GPU test that compares two trainings exactly
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class _CurrentStderr:
    """Whatever sys.stderr is when written to: pytest gives each test its own and closes it after."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def _prefect_console_follows_stderr():
    """Prefect's console handler (on the root logger too) binds the sys.stderr of the test that first
    imports Prefect; a warning in any later test then went to that closed stream, and Python's logging
    printed '--- Logging error ---' and a traceback into that test's output. Rebind it to the current one."""
    yield
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is None:
        return
    loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    for handler in {h for l in loggers for h in l.handlers if isinstance(h, handlers.PrefectConsoleHandler)}:
        if not isinstance(handler.stream, _CurrentStderr):  # not setStream: it would flush the closed stream
            handler.stream = handler.console.file = _CurrentStderr()


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` are skipped where torch sees no CUDA device (CI has none)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def _hypothesis_profiles() -> None:
    """CI replays the same generated examples on every run (a red build is reproducible); elsewhere
    hypothesis explores new ones each time and keeps failures in its local database."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profiles()


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    """Real Fashion-MNIST images (Debian's package, read by torchvision), 40 train / 20 test per class."""
    from spottune.data.sources import materialise

    root = tmp_path_factory.mktemp("data") / "fashion-mnist"
    materialise("fashion-mnist", root, train_per_class=40, test_per_class=20, seed=0, log=lambda _: None)
    return root


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from spottune.data.sources import materialise

    root = tmp_path_factory.mktemp("data") / "digits"
    materialise("digits", root, seed=0, log=lambda _: None)
    return root


def _tiny_params(root: Path, **sections: dict[str, Any]):
    """Params for a seconds-long CPU run on `root`; keyword arguments override keys per section."""
    from spottune.config import validate_params

    raw: dict[str, dict[str, Any]] = {
        "data": {"root": str(root), "image_size": 32, "batch_size": 32, "eval_batch_size": 128},
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet"},
        "optim": {"epochs": 1, "lr_head": 0.02},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate_params(raw, "test")


@pytest.fixture
def runtime():
    from spottune.settings import RuntimeSettings

    return RuntimeSettings(device="cpu", progress=False)


@pytest.fixture
def tiny_params():
    return _tiny_params


# A real finished run, a second version of it, and a moto S3 server process: shared by the store,
# predict-by-name and serve tests (trained and started once per session).


@pytest.fixture(scope="session")
def finished_run(fashion_root, tmp_path_factory) -> Path:
    """A real finished run directory (model.safetensors, model.json, metrics.json, checkpoint.pt)."""
    from spottune.config import validate_params
    from spottune.settings import RuntimeSettings
    from spottune.training import fit

    params = validate_params({
        "data": {"root": str(fashion_root), "image_size": 32, "batch_size": 32, "eval_batch_size": 128},
        "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "method": "linear"},
        "optim": {"epochs": 1, "lr_head": 0.02, "max_steps_per_epoch": 2},
    }, "test")
    out = tmp_path_factory.mktemp("runs") / "linear"
    fit(params, out, RuntimeSettings(device="cpu", progress=False), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def other_run(finished_run, tmp_path_factory) -> Path:
    """The same run with its head's bias shifted: different, still valid, weights (a second version)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("runs") / "linear-b"
    shutil.copytree(finished_run, out)
    state = load_file(str(out / "model.safetensors"))
    bias = next(k for k in state if k.endswith("bias") and state[k].ndim == 1 and state[k].numel() == 10)
    state[bias] = state[bias] + 1.0
    save_file(state, str(out / "model.safetensors"), metadata={"format": "spottune-model/1"})
    return out


@pytest.fixture(scope="session")
def moto(tmp_path_factory) -> Iterator[MotoServer]:
    """A moto S3 server process, with dummy credentials in boto3's standard chain (environment)."""
    with dummy_aws_env():
        server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
        yield server
        server.stop()

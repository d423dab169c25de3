"""Shared fixtures: small real datasets materialised once per test session, tiny run settings."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("SPOTTUNE_PROGRESS", "false")


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
    from spottune.config import RuntimeSettings

    return RuntimeSettings(device="cpu", progress=False)


@pytest.fixture
def tiny_params():
    return _tiny_params

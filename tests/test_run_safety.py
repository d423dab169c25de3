"""What a run folder and a command's exit status promise: distinct exit codes per kind of failure, one
training per run folder at a time, and a resume only onto the data the checkpoint was made with.

Real `spottune` processes (the exit status and stderr are the point), real image trees, real locks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import PROJECT, clean_env, free_port

TINY = ["--set", "data.image_size=32", "--set", "optim.max_steps_per_epoch=2", "--set", "optim.epochs=2"]


def spottune(*args, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spottune.cli", *map(str, args)], capture_output=True, text=True,
                          env=clean_env(**(env or {})), cwd=cwd or PROJECT, timeout=600)


# ---------------------------------------------------------------------------------------------
# Exit codes: 2 usage, 3 bad input, 4 external service, 1 internal


def test_each_kind_of_failure_has_its_own_exit_code(tmp_path):
    usage = spottune("train", "--method", "linear")  # --out missing: argparse
    assert usage.returncode == 2 and "--out" in usage.stderr and "usage:" in usage.stderr, usage.stderr

    bad_params = spottune("train", "--out", tmp_path / "run", "--set", "optim.lr_net=-1")
    assert bad_params.returncode == 3 and "optim.lr_net" in bad_params.stderr, bad_params.stderr
    bad_env = spottune("evaluate", tmp_path / "run", env={"SPOTTUNE_CUDA_GRAPHS": "maybe"})
    assert bad_env.returncode == 3 and bad_env.stderr.startswith("error: invalid settings in the environment")
    assert "SPOTTUNE_CUDA_GRAPHS" in bad_env.stderr and "Traceback" not in bad_env.stderr, bad_env.stderr
    missing_data = spottune("train", "--out", tmp_path / "run", "--set", f"data.root={tmp_path / 'nowhere'}")
    assert missing_data.returncode == 3 and "nowhere" in missing_data.stderr, missing_data.stderr
    no_model = spottune("evaluate", tmp_path / "run")
    assert no_model.returncode == 3 and "holds no finished model" in no_model.stderr, no_model.stderr

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the store is unreachable
    store = spottune("models", "list", "fashion", env={
        "SPOTTUNE_STORE_BACKEND": "s3", "SPOTTUNE_S3_BUCKET": "models", "SPOTTUNE_S3_ENDPOINT_URL": closed,
        "SPOTTUNE_S3_MAX_ATTEMPTS": "1", "SPOTTUNE_S3_CONNECT_TIMEOUT_S": "1", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"})
    assert store.returncode == 4 and store.stderr.startswith("error: ") and "Traceback" not in store.stderr, store.stderr
    bad_store_setting = spottune("models", "list", "fashion", env={"SPOTTUNE_STORE_PREFIX": "../esc"})
    assert bad_store_setting.returncode == 3 and "SPOTTUNE_STORE_PREFIX" in bad_store_setting.stderr

    # an internal error (a bug): the traceback is kept and the code is 1, never one of the codes above
    bug = subprocess.run([sys.executable, "-c", "import sys, spottune.cli as c, spottune.evaluate as e\n"
                          "def broken(*a, **k): raise AssertionError('a bug')\n"
                          "e.evaluate_run = broken\nsys.exit(c.main(['evaluate', 'run']))"],
                         capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=120)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "AssertionError: a bug" in bug.stderr, bug.stderr

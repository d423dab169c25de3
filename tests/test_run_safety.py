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


@pytest.mark.slow
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
    bug = subprocess.run([sys.executable, "-c", ("import sys, spottune.cli as c, spottune.compare as e\n"
                          "def broken(*a, **k): raise AssertionError('a bug')\n"
                          "e.evaluate_run = broken\nsys.exit(c.main(['evaluate', 'run']))")],
                         capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=120)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "AssertionError: a bug" in bug.stderr, bug.stderr


# ---------------------------------------------------------------------------------------------
# --resume / --resume-unfinished: the same params and the same data, or nothing of the checkpoint


def _sliced_run(root: Path, out: Path, tiny_params, runtime):
    """Params of a 2-epoch linear run on `root`, and its checkpoint after epoch 0 in `out`."""
    from spottune.training import fit

    params = tiny_params(root, model={"method": "linear"}, optim={"epochs": 2, "max_steps_per_epoch": 1})
    assert fit(params, out, runtime, stop_after_epochs=1, log=lambda _: None) is None
    return params


@pytest.mark.slow
def test_resume_refuses_other_data_and_resume_unfinished_starts_over(fashion_root, tiny_params, runtime, tmp_path,
                                                                       capsys):
    """Images added under the same data.root, or a class removed: --resume refuses naming what changed,
    --resume-unfinished starts over (one line); the same data resumes."""
    from spottune.errors import CheckpointError
    from spottune.training import fit

    root = tmp_path / "data"
    shutil.copytree(fashion_root, root)
    run = tmp_path / "run"
    params = _sliced_run(root, run, tiny_params, runtime)
    extra = root / "train" / "coat" / "added.png"
    shutil.copy(next((root / "train" / "bag").glob("*.png")), extra)
    with pytest.raises(CheckpointError, match=r"was made with other data: train images \d+ -> \d+$"):
        fit(params, run, runtime, resume=True, log=lambda _: None)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 0  # refused: nothing changed

    logs: list[str] = []
    metrics = fit(params, run, runtime, resume_unfinished=True, log=logs.append)
    err = capsys.readouterr().err
    assert "cannot resume" in err and "other data" in err and err.count("\n") == 1, err
    assert not any("resuming" in line for line in logs) and [h["epoch"] for h in metrics["history"]] == [0, 1]

    extra.unlink()  # the same data again: a sliced run resumes
    fit(params, run, runtime, stop_after_epochs=1, overwrite=True, log=lambda _: None)
    for folder in (root / "train" / "bag", root / "test" / "bag"):
        shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match=r"other data: classes removed \['bag'\], added \[\]"):
        fit(params, run, runtime, resume=True, log=lambda _: None)
    metrics = fit(params, run, runtime, resume_unfinished=True, log=lambda _: None)
    assert "bag" not in metrics["classes"] and len(metrics["classes"]) == 9


def test_the_same_data_resumes_and_a_checkpoint_without_a_data_record_still_loads(fashion_root, tiny_params,
                                                                                  runtime, tmp_path):
    from spottune.engine import save_checkpoint
    from spottune.training import fit

    run = tmp_path / "run"
    params = _sliced_run(fashion_root, run, tiny_params, runtime)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(ckpt["data"]) == {"sha256", "classes", "images"} and len(ckpt["data"]["sha256"]) == 64
    del ckpt["data"]  # as checkpoints were written before the data was recorded
    save_checkpoint(run / "checkpoint.pt", ckpt)
    logs: list[str] = []
    metrics = fit(params, run, runtime, resume=True, log=logs.append)
    assert any("predates data records" in line for line in logs) and any("resuming" in line for line in logs)
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]


@pytest.mark.parametrize("content,words", [
    (["not", "a", "checkpoint"], "holds a list, not a mapping"),
    ({"epoch": 0}, "the key 'model' is missing"),
    ("broken-epoch", "'epoch' is a str, not an epoch number"),
    ("broken-model", "does not fit this run"),
    ("broken-rng", "'rng' lacks"),
])
def test_a_malformed_checkpoint_is_one_clear_error_or_a_fresh_start(content, words, fashion_root, tiny_params, runtime,
                                                                     tmp_path, capsys):
    from spottune.engine import save_checkpoint
    from spottune.errors import CheckpointError
    from spottune.training import fit

    run = tmp_path / "run"
    params = _sliced_run(fashion_root, run, tiny_params, runtime)
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    if content == "broken-epoch":
        content = good | {"epoch": "0"}
    elif content == "broken-model":
        content = good | {"model": {"head.0.weight": torch.zeros(3)}}
    elif content == "broken-rng":
        content = good | {"rng": {"torch": [1, 2]}}
    save_checkpoint(run / "checkpoint.pt", content)
    with pytest.raises(CheckpointError, match=words) as err:
        fit(params, run, runtime, resume=True, log=lambda _: None)
    assert str(run / "checkpoint.pt") in str(err.value) and "\n" not in str(err.value)
    metrics = fit(params, run, runtime, resume_unfinished=True, log=lambda _: None)
    assert [h["epoch"] for h in metrics["history"]] == [0, 1] and "starting over" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# One training per run folder


HOLD = ("import sys, time\nfrom spottune.runlock import RunLock\nwith RunLock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n")


def _holder(folder: Path) -> subprocess.Popen:
    """A real process that holds folder's run lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=clean_env(PYTHONPATH=str(PROJECT)), cwd=PROJECT)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_training_into_a_held_run_folder_fails_naming_the_holder_and_deletes_nothing(fashion_root,
                                                                                              tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"the first run's checkpoint")
    holder = _holder(run)
    try:
        args = ["train", "--method", "linear", "--out", run, "--set", f"data.root={fashion_root}", *TINY]
        for extra in (["--overwrite"], ["--resume-unfinished"], ["--resume"]):
            r = spottune(*args, *extra)
            assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
            assert r.stderr.strip() == (f"error: {run} is in use by another training (pid {holder.pid} on "
                                        f"{os.uname().nodename}): wait for it to end, or give another --out"), r.stderr
            assert (run / "checkpoint.pt").read_bytes() == b"the first run's checkpoint"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder was killed outright: the OS released its lock, and the next training runs
    assert (run / ".lock").exists()
    r = spottune(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.json", "model.json", "model.safetensors"]


@pytest.mark.slow
def test_two_trainings_started_together_into_one_folder_one_runs_the_other_is_refused(fashion_root, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--method", "linear", "--out", run, "--set", f"data.root={fashion_root}", "--overwrite", *TINY]
    procs = [subprocess.Popen([sys.executable, "-m", "spottune.cli", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=PROJECT) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the first ended before the second started (a slow machine): nothing to race
        pytest.skip("the two trainings did not overlap")
    assert codes == [0, 3], results
    assert "is in use by another training" in next(err for code, err in results if code == 3)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.json", "model.json", "model.safetensors"]


def test_the_run_lock_is_exclusive_and_its_file_goes_with_the_holder(tmp_path):
    from spottune.errors import RunLocked
    from spottune.runlock import RunLock

    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text().startswith(f"{os.getpid()} on ")
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on"):
            RunLock(tmp_path / "run").__enter__()
    assert not (tmp_path / "run" / ".lock").exists()
    with RunLock(tmp_path / "run"):  # free again
        pass
    with RunLock(tmp_path / "new"):  # a folder the lock made, left empty (a run that failed early): removed
        pass
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):  # a folder that was there before: kept
        pass
    assert not (tmp_path / "new").exists() and (tmp_path / "kept").is_dir()

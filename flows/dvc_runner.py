"""Running DVC for the retrain flow: a stage with `dvc repro`, or the whole pipeline as a DVC experiment.

Every command runs as `python -m dvc` of this interpreter, its output streamed line by line to the
Prefect log; a failure raises StageFailed naming what ran and ending with its last lines.

An experiment is `dvc exp run --name NAME -S ++KEY=VALUE ...` in the checkout it is given (the flow
gives it a private one, flows/checkout.py): DVC writes the overrides into that checkout's params.yaml,
runs what they change, and commits the result under refs/exps, where `dvc exp list` and `dvc exp show`
in the project find it. `dvc exp push` shares it where the project has a git remote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Log = Callable[[str], None]


class StageFailed(RuntimeError):
    """A DVC command exited non-zero; the message names it and ends with its last output lines."""


def stage_env(root: Path) -> dict[str, str]:
    """The environment of DVC and the stages it runs in checkout ROOT.

    The stages call `spottune`: this interpreter's scripts come first on PATH, and ROOT first on
    PYTHONPATH, so a stage runs the spottune package of the checkout it runs in (the code dvc.lock
    hashes), not whatever copy the interpreter has installed. No analytics, no progress bars.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("SPOTTUNE_PROGRESS", "false")
    return env


def run_dvc(root: Path, *args: str, what: str, log: Log, env: dict[str, str] | None = None) -> None:
    """Run `dvc ARGS` in ROOT, each output line to `log`; StageFailed names `what`. env: variables set
    for DVC and its stages on top of stage_env."""
    from spottune.data.versioning import stream_dvc

    log(f"{what}: {' '.join(['dvc', *args])}")
    rc, tail = stream_dvc(*args, cwd=root, env=stage_env(root) | (env or {}), log=lambda line: log(f"[{what}] {line}"))
    if rc != 0:
        raise StageFailed(f"{what} failed: `dvc {' '.join(args)}` exited with {rc} in {root}; last output:\n"
                          + "\n".join(tail))


def dvc_output(root: Path, *args: str) -> str:
    """stdout of a short DVC query (`dvc cache dir`, `dvc config core.remote`); '' when it fails."""
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(root), capture_output=True,
                       text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def git(root: Path, *args: str) -> str:
    """stdout of `git ARGS` in ROOT; StageFailed with git's own message when it fails."""
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise StageFailed(f"`git {' '.join(args)}` failed in {root}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


# ---------------------------------------------------------------------------------------------
# Experiments


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """{'optim.epochs': 1} -> ['-S', '++optim.epochs=1'].

    The value goes as JSON, which DVC's override grammar (Hydra's) reads back as the same value;
    `++` sets a key whether or not params.yaml already has it. The keys were validated against
    spottune.config before any work.
    """
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"++{key}={json.dumps(value, ensure_ascii=False)}"]
    return args


def experiment_names(root: Path) -> set[str]:
    """Names of every experiment the repository holds (refs/exps/XX/BASELINE/NAME), whatever its baseline."""
    refs = git(root, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    return {ref.split("/", 4)[4] for ref in refs if ref.count("/") == 4}


def unused_experiment_name(root: Path, wanted: str) -> str:
    """WANTED as a git ref name (the flow run's name), with -2, -3... when an experiment has it (a retried run)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", wanted).strip("-") or "flow-run"
    taken = experiment_names(root)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def run_experiment(root: Path, name: str, overrides: dict[str, Any], log: Log,
                   env: dict[str, str] | None = None) -> None:
    """The whole pipeline as DVC experiment NAME in checkout ROOT, with OVERRIDES on params.yaml.

    DVC checks the inputs and unchanged outputs out of the cache, runs the stages the overrides
    change (the gate stage too, whose record stays in ROOT), leaves the results in ROOT and commits
    them to the experiment's ref. env: as for run_dvc.
    """
    run_dvc(root, "exp", "run", "--name", name, *set_param_args(overrides), what=f"experiment {name}", log=log,
            env=env)


def git_remote(root: Path) -> str | None:
    """The git remote experiments go to: `origin`, else the only remote; None without one."""
    remotes = git(root, "remote").split()
    if "origin" in remotes:
        return "origin"
    return remotes[0] if len(remotes) == 1 else None


def push_experiment(root: Path, name: str, log: Log) -> str | None:
    """`dvc exp push REMOTE NAME`: the experiment's ref to the git remote and its outputs to the default
    DVC remote (when one is configured); returns the git remote, None when there is none to push to."""
    remote = git_remote(root)
    if remote is None:
        log(f"experiment {name} stays in this repository: it has no git remote to push it to")
        return None
    args = ["exp", "push", remote, name]
    if not dvc_output(root, "config", "core.remote"):
        args.insert(2, "--no-cache")  # no DVC remote: only the git ref travels
    run_dvc(root, *args, what=f"push experiment {name}", log=log)
    return remote

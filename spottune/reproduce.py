"""`spottune reproduce NAME@VERSION --out DIR`: rebuild a published version from its lineage and compare.

    1. the version's files from the store (sha256-verified, through the model cache); its lineage.json
    2. a git worktree of the repository at the recorded commit in DIR; the recorded git.diff applied
    3. the recorded params written to params.yaml (a flow run's overrides, an experiment's values
       included); the recorded data.dvc, its data from this checkout's DVC cache, else its remote
    4. `dvc repro --force --no-run-cache` with the recorded thread count (OMP_NUM_THREADS) and, when it
       trained on CPU, the CPU; the worktree's own `spottune` code (PYTHONPATH)
    5. the run's new metrics.json and weights compared with the recorded ones

Everything that is refused is refused before any work (no lineage, no commit, a commit this
repository lacks, a dirty version without its diff, a DIR that is not empty). On CPU at the same
thread count training is bit-identical, so the comparison is exact unless a tolerance is given;
timings (seconds, images per second) are not compared.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spottune.errors import ConfigError, SpotTuneError, StoreError

TIMING_KEYS = frozenset({"seconds", "images_per_s", "train_images_per_s"})


class ReproduceRefused(SpotTuneError):
    """The version cannot be rebuilt from what was recorded (nothing was run): bad input, exit 3."""


@dataclass
class Reproduction:
    """What `reproduce` did: where, and the differences from the record (empty: it matches)."""

    out: Path
    commit: str
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_lineage(folder: Path, label: str) -> dict[str, Any]:
    """The lineage.json of a fetched version; ReproduceRefused when it has none."""
    from spottune.store import LINEAGE

    path = folder / LINEAGE
    if not path.is_file():
        raise ReproduceRefused(f"{label} was published without a lineage ({LINEAGE}): it cannot be reproduced")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise ReproduceRefused(f"{label}: {LINEAGE} is not JSON ({e})") from None
    if not isinstance(record, dict):
        raise ReproduceRefused(f"{label}: {LINEAGE} is not a JSON object")
    return record


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=600)


def check_reproducible(record: dict[str, Any], folder: Path, repo: Path, out: Path, label: str) -> Path:
    """Refuse (ReproduceRefused) what cannot be rebuilt; return the repository's top folder."""
    from spottune.store import GIT_DIFF

    commit = record.get("git_commit")
    if not commit:
        raise ReproduceRefused(f"{label} records no git commit: it was not published from a git checkout")
    run = record.get("run")
    if not isinstance(run, str) or not run or Path(run).is_absolute() or ".." in Path(run).parts:
        raise ReproduceRefused(f"{label} records no run folder inside the project ({run!r}): nothing to compare")
    if record.get("git_dirty") and not (folder / GIT_DIFF).is_file():
        raise ReproduceRefused(f"{label} was published from a dirty checkout and its {GIT_DIFF} is not stored")
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise ReproduceRefused(f"{repo} is not inside a git repository (pass --repo)")
    if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise ReproduceRefused(f"{label} was built from commit {commit}, which is not in the repository "
                               f"{top.stdout.strip()}: fetch it, or pass --repo")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder")
    return Path(top.stdout.strip())


def metric_differences(recorded: Any, got: Any, tolerance: float = 0.0, path: str = "") -> list[str]:
    """Where two metrics.json documents differ, as 'key.path: recorded X, reproduced Y'; timings ignored."""
    where = path or "(top level)"
    if isinstance(recorded, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(recorded) | set(got), key=str):
            if key in TIMING_KEYS:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in got:
                out.append(f"{sub}: recorded {_short(recorded[key])}, missing from the reproduction")
            elif key not in recorded:
                out.append(f"{sub}: not recorded, reproduced {_short(got[key])}")
            else:
                out += metric_differences(recorded[key], got[key], tolerance, sub)
        return out
    if isinstance(recorded, list) and isinstance(got, list):
        if len(recorded) != len(got):
            return [f"{where}: recorded {len(recorded)} entries, reproduced {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(recorded, got)) for d in metric_differences(a, b, tolerance, f"{path}[{i}]")]
    if isinstance(recorded, bool) or isinstance(got, bool):  # True == 1 in Python, not in JSON
        same = recorded is got
    elif isinstance(recorded, (int, float)) and isinstance(got, (int, float)):
        same = recorded == got or math.isclose(recorded, got, rel_tol=0.0, abs_tol=tolerance)
    else:
        same = recorded == got
    return [] if same else [f"{where}: recorded {_short(recorded)}, reproduced {_short(got)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _stage_worktree(record: dict[str, Any], folder: Path, top: Path, out: Path, log: Callable[[str], None]) -> None:
    """The recorded commit checked out in out, with the recorded diff, params and data.dvc."""
    import yaml

    from spottune.store import DATA_DVC, GIT_DIFF

    commit = record["git_commit"]
    added = _git(top, "worktree", "add", "--detach", str(out), commit)
    if added.returncode != 0:
        raise StoreError(f"git worktree add {out} {commit} failed: {added.stderr.strip()}")
    log(f"worktree of {commit} in {out} (remove it with: git worktree remove --force {out})")
    if (folder / GIT_DIFF).is_file():
        applied = _git(out, "apply", "--binary", "--whitespace=nowarn", str(folder / GIT_DIFF))
        if applied.returncode != 0:
            raise StoreError(f"the recorded {GIT_DIFF} does not apply to {commit}: {applied.stderr.strip()}")
        log(f"applied the recorded {GIT_DIFF} (the checkout was dirty)")
    if record.get("params") is not None:
        (out / "params.yaml").write_text(yaml.safe_dump(record["params"], sort_keys=False))
    if (folder / DATA_DVC).is_file():
        shutil.copyfile(folder / DATA_DVC, out / DATA_DVC)
    for name in ("config", "config.local"):  # where this checkout keeps its data (remote, endpoint)
        if (top / ".dvc" / name).is_file():
            shutil.copyfile(top / ".dvc" / name, out / ".dvc" / name)


def stage_env(record: dict[str, Any], out: Path) -> dict[str, str]:
    """The stages' environment: the recorded threads and CPU, the worktree's spottune, no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(out), env.get("PYTHONPATH", "")) if p)
    env["DVC_NO_ANALYTICS"] = "1"
    env["SPOTTUNE_PROGRESS"] = "false"
    if isinstance(record.get("threads"), int):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(record["threads"])
    if record.get("device") == "cpu":
        env["SPOTTUNE_DEVICE"] = "cpu"
    return env


def _dvc(out: Path, env: dict[str, str], log: Callable[[str], None], *args: str) -> int:
    """`dvc ARGS` in the worktree, each output line to log; the exit status."""
    from spottune.data.versioning import stream_dvc

    return stream_dvc(*args, cwd=out, env=env, log=lambda line: log(f"[dvc {args[0]}] {line}"))[0]


def _fetch_data(top: Path, out: Path, env: dict[str, str], record: dict[str, Any], log: Callable[[str], None]) -> None:
    """The recorded data into the worktree: this checkout's DVC cache, else the remote."""
    from spottune.lineage import data_dvc_md5
    from spottune.store import DATA_DVC

    if not (out / DATA_DVC).is_file():
        raise ReproduceRefused(f"neither the version nor commit {record['git_commit']} has a {DATA_DVC}")
    recorded, found = record.get("data_version"), data_dvc_md5(out)
    if recorded and found != recorded:
        raise ReproduceRefused(f"{DATA_DVC} names data version {found}, the version records {recorded}")
    cache = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], check=False, cwd=top, env=env, capture_output=True,
                           text=True, timeout=120)
    if cache.returncode == 0 and cache.stdout.strip():
        _dvc(out, env, log, "cache", "dir", "--local", cache.stdout.strip())
    if _dvc(out, env, log, "checkout", DATA_DVC) != 0:
        log("the data is not in this checkout's DVC cache: pulling it from the DVC remote")
        if _dvc(out, env, log, "pull", DATA_DVC) != 0:
            raise StoreError(f"data version {recorded or found} is neither in the DVC cache nor on a DVC remote")


def reproduce(folder: Path, label: str, repo: Path, out: Path, *, tolerance: float = 0.0,
              log: Callable[[str], None] = print) -> Reproduction:
    """Rebuild the version whose verified files are in folder (see the module docstring) in out."""
    from spottune.lineage import package_versions
    from spottune.store import WEIGHTS, sha256_file

    record = read_lineage(folder, label)
    out = Path(out).resolve()
    top = check_reproducible(record, folder, Path(repo).resolve(), out, label)
    result = Reproduction(out, record["git_commit"])
    now = package_versions()
    for name, version in sorted((record.get("packages") or {}).items()):
        if now.get(name) != version:
            result.notes.append(f"{name} {now.get(name)} here, {version} recorded")
    _stage_worktree(record, folder, top, out, log)
    env = stage_env(record, out)
    _fetch_data(top, out, env, record, log)
    log(f"dvc repro with {env.get('OMP_NUM_THREADS', 'the default number of')} threads"
        + (" on the CPU" if env.get("SPOTTUNE_DEVICE") == "cpu" else ""))
    if _dvc(out, env, log, "repro", "--force", "--no-run-cache") != 0:
        raise StoreError(f"dvc repro failed in {out}: see the lines above")
    run = out / record["run"]
    try:
        got = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"the reproduction wrote no readable {run / 'metrics.json'}: {e}") from None
    recorded = json.loads((folder / "metrics.json").read_text())
    found = metric_differences(recorded, got, tolerance)
    if (run / WEIGHTS).is_file() and sha256_file(run / WEIGHTS) != sha256_file(folder / WEIGHTS):
        result.differences.append(f"{WEIGHTS}: the reproduced weights differ from the recorded ones")
    # the test metrics first: what a reader checks, before the per-epoch history
    result.differences += sorted(found, key=lambda d: not d.startswith("test."))
    return result

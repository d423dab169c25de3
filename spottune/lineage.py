"""A published version's lineage: what it takes to rebuild it (`spottune reproduce`) and to trust it.

    lineage.json   git_commit, git_dirty, dvc_lock_sha256, data_version, params, experiment, packages,
                   threads, device, run, flow_run
    dvc.lock       the pipeline's state when the version was published
    data.dvc       the data version's DVC file (where `dvc checkout` / `dvc pull` find the data)
    git.diff       only when git_dirty: `git diff` of the tracked files against git_commit

Files the pipeline itself writes (PIPELINE_WRITTEN: dvc.lock, data.dvc, metrics/, plots/, live/, .dvc/config) do
not make a checkout dirty: a run rewrites them, and dvc.lock and data.dvc are stored with the version anyway.
The record is deterministic (no timestamps), so publishing the same run again gives the same bytes;
only flow_run changes from one flow run to the next, and the store leaves it out of a version's identity
(spottune.store.values.lineage_identity).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spottune.errors import ConfigError
from spottune.store.hashing import sha256_bytes
from spottune.store.values import DATA_DVC, DVC_LOCK, GIT_DIFF, Lineage

if TYPE_CHECKING:
    from spottune.config import Params

LINEAGE_FORMAT = "spottune-lineage/1"
# .dvc/config: `spottune data --track` and the flow make the configured remote DVC's default (where data is
# stored, not what a run computes); `spottune reproduce` uses the current checkout's remote settings.
PIPELINE_WRITTEN: tuple[str, ...] = (DVC_LOCK, DATA_DVC, "metrics", "plots", "live", ".dvc/config")
PACKAGES: tuple[str, ...] = (
    "torch", "torchvision", "spottune", "dvc", "prefect", "numpy", "pillow", "safetensors", "pydantic",
    "great-expectations", "boto3",
)


def package_versions() -> dict[str, str | None]:
    """python and PACKAGES' installed versions (None for a package that is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(project: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], check=False, cwd=project, capture_output=True, timeout=120)


def git_state(project: Path) -> tuple[str | None, bool | None, bytes]:
    """(HEAD commit, dirty, diff) of the project's git checkout; (None, None, b'') outside one.

    Dirty means a tracked file other than PIPELINE_WRITTEN differs from HEAD (staged or not); the diff
    is `git diff --binary HEAD` of exactly those files, so `git apply` on a checkout of HEAD restores them.
    """
    head = _git(project, "rev-parse", "--verify", "HEAD^{commit}")
    if head.returncode != 0:
        return None, None, b""
    exclude = [f":(exclude){p}" for p in PIPELINE_WRITTEN]  # relative to the project, like dvc.yaml's paths
    diff = _git(project, "diff", "--binary", "--no-color", "--no-ext-diff", "HEAD", "--", ":(top)", *exclude)
    if diff.returncode != 0:
        raise ConfigError(f"git diff in {project} failed: {diff.stderr.decode(errors='replace').strip()}")
    return head.stdout.decode().strip(), bool(diff.stdout), diff.stdout


def params_record(params: Params) -> dict[str, Any]:
    """Every params.yaml section as the pipeline used it (with a run's overrides), including the sections
    that Params leaves out of run cards (remote, gate, publish): what `spottune reproduce` writes back."""
    record = params.model_dump(mode="json", by_alias=True)
    for section in ("remote", "gate", "publish"):
        record[section] = getattr(params, section).model_dump(mode="json", by_alias=True)
    return record


def data_dvc_md5(project: Path) -> str | None:
    """The md5 that the project's data.dvc records (the data version), or None without one."""
    from spottune.data.versioning import recorded_md5

    return recorded_md5(Path(project) / DATA_DVC)


def find_project(run_dir: Path) -> Path | None:
    """The nearest folder above run_dir holding dvc.yaml (the pipeline that made the run), or None."""
    start = Path(run_dir).resolve()
    return next((p for p in start.parents if (p / "dvc.yaml").is_file()), None)


def _run_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run_dir / 'metrics.json'}: unreadable ({e}): is {run_dir} a finished run?") from None
    return metrics if isinstance(metrics, dict) else {}


def collect_lineage(project: Path, run_dir: Path, params: Params, *, data_version: str | None,
                    experiment: str | None = None, flow_run: dict[str, Any] | None = None) -> Lineage:
    """The lineage of run_dir, published from the project (git + DVC repository) with these params.

    threads and device are the training's own (the run's metrics.json), not this process's: a run
    published later, or by a flow that retrained nothing, still records what it was trained with.
    """
    project, run_dir = Path(project).resolve(), Path(run_dir).resolve()
    commit, dirty, diff = git_state(project)
    files: dict[str, bytes] = {}
    for name in (DVC_LOCK, DATA_DVC):
        if (project / name).is_file():
            files[name] = (project / name).read_bytes()
    if dirty:
        files[GIT_DIFF] = diff
    metrics = _run_metrics(run_dir)
    try:
        run = str(run_dir.relative_to(project))
    except ValueError:
        run = None
    record = {
        "format": LINEAGE_FORMAT,
        "git_commit": commit,
        "git_dirty": dirty,
        "dvc_lock_sha256": sha256_bytes(files[DVC_LOCK]) if DVC_LOCK in files else None,
        "data_version": data_version or None,
        "params": params_record(params),
        "experiment": experiment or None,
        "packages": package_versions(),
        "threads": metrics.get("threads"),
        "device": metrics.get("device"),
        "run": run,
        "flow_run": flow_run,
    }
    return Lineage(record, files)


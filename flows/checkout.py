"""A flow run's own checkout of the project: a git worktree under .dvc/tmp/checkouts/, removed afterwards.

The user's checkout is only ever changed by a plain run (`dvc repro` of params.yaml as it is). A run
with overrides, and every run of a deployment, works in a private worktree of the same repository:

- `carry_workspace=True` (a run with overrides started in the user's checkout): HEAD plus the
  checkout's changes to files git sees (modified, deleted and untracked-but-not-ignored files), so
  the experiment starts from the workspace as it is, as `dvc exp run --temp` would. The data and
  the stages' outputs (ignored by git) come out of the shared DVC cache.
- `carry_workspace=False` (a deployment's run): HEAD as committed, its data from the DVC cache
  (pulled from the default DVC remote when the cache lacks it).

Why not `dvc exp run --temp` in the user's checkout: to queue the experiment, DVC stashes the
checkout's changes, detaches HEAD, writes the overrides into params.yaml and resets the checkout
before putting the stash back; a flow killed meanwhile (or a user editing then) would find the
checkout changed. In a private worktree nothing of the user's checkout is written but git's shared
object store and refs (the experiment's ref lands in refs/exps, so `dvc exp list` there shows it).

The worktree shares the project's DVC cache (`cache.dir` in its .dvc/config.local) and git objects,
so it costs a copy of the data and outputs it checks out, not of their history. Each checkout is
locked (flock) while its run lives; one whose lock is free was left by a run that was killed, and
the next run removes it.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.dvc_runner import StageFailed, dvc_output, git, run_dvc

CHECKOUTS = Path(".dvc") / "tmp" / "checkouts"
Log = Callable[[str], None]


@contextmanager
def private_checkout(project: Path, name: str, *, carry_workspace: bool, data_root: Path,
                     log: Log) -> Iterator[Path]:
    """A git worktree of PROJECT at HEAD (plus the workspace's changes if asked), ready for DVC; removed on exit.

    data_root (relative to the project) must be there afterwards: checked out of the DVC cache, or
    pulled from the default DVC remote.
    """
    head = _head(project)
    parent = project / CHECKOUTS
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / ".lock"):  # one run at a time creates checkouts or removes abandoned ones
        remove_abandoned(project, log)
        root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        lock = (parent / f"{root.name}.lock").open("a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        git(project, "worktree", "add", "--detach", str(root), head)
        log(f"own checkout {root.relative_to(project)} at {head[:12]}"
            + (" with the workspace's uncommitted changes" if carry_workspace else ""))
        if carry_workspace:
            carry_changes(project, root)
        share_dvc_cache(project, root)
        run_dvc(root, "checkout", "--allow-missing", what="checkout", log=log)
        if not (root / data_root).exists() and dvc_output(root, "config", "core.remote"):
            run_dvc(root, "pull", "--allow-missing", what="pull", log=log)
        if not (root / data_root).exists():
            raise StageFailed(f"{data_root} of commit {head[:12]} is neither in the DVC cache of {project} nor on a "
                              "DVC remote: run `dvc push` (or `dvc add` and commit) in the project")
        yield root
    finally:
        remove_checkout(project, root)
        (parent / f"{root.name}.lock").unlink(missing_ok=True)
        lock.close()


def _head(project: Path) -> str:
    try:
        return git(project, "rev-parse", "--verify", "HEAD^{commit}").strip()
    except StageFailed:
        raise StageFailed(f"{project} has no git commit: a run with overrides and a deployment's run work in a "
                          "git worktree of the project at HEAD (commit the pipeline first)") from None


def carry_changes(project: Path, root: Path) -> None:
    """Copy what git sees changed in PROJECT (modified and untracked, not ignored) into ROOT; delete what it deleted."""
    listed = git(project, "ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")
    for rel in sorted({p for p in listed if p}):
        src, dst = project / rel, root / rel
        if src.is_file() or src.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.is_file():
                dst.unlink()
            shutil.copy2(src, dst, follow_symlinks=False)
        elif not src.exists():
            dst.unlink(missing_ok=True)


def share_dvc_cache(project: Path, root: Path) -> None:
    """The project's machine-local DVC settings (remote endpoints) and its cache, for the checkout."""
    cache = dvc_output(project, "cache", "dir")
    if not cache:
        raise StageFailed(f"`dvc cache dir` failed in {project}: is it a DVC repository?")
    local = project / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, root / ".dvc" / "config.local")
    run_dvc(root, "config", "--local", "cache.dir", str(Path(cache).resolve()), what="share the DVC cache",
            log=lambda _: None)


def remove_checkout(project: Path, root: Path) -> None:
    """The worktree and everything in it (data, outputs), and git's record of it."""
    try:
        git(project, "worktree", "remove", "--force", "--force", str(root))
    except StageFailed:
        pass  # never registered, or already half gone: the folder and git's record go below
    shutil.rmtree(root, ignore_errors=True)
    try:
        git(project, "worktree", "prune")
    except StageFailed:
        pass


def remove_abandoned(project: Path, log: Log) -> None:
    """Remove the checkouts of runs that were killed: their lock is free (a live run holds its own)."""
    for lock_path in sorted((project / CHECKOUTS).glob("*.lock")):
        if lock_path.name == ".lock":
            continue
        with lock_path.open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's
            root = lock_path.with_suffix("")
            remove_checkout(project, root)
            lock_path.unlink(missing_ok=True)
            log(f"removed {root.relative_to(project)}, the checkout of a run that was killed")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

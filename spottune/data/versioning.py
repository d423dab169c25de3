"""Versioning the data tree with DVC: `dvc add`, the S3-compatible remote, `dvc push`.

DVC runs as a subprocess (`python -m dvc`) of the interpreter that runs spottune, so the library
never imports it and its output reaches the user unchanged. Remote credentials are never written
here: DVC's S3 backend asks boto3's standard chain (environment, profile, role).
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from spottune.errors import ConfigError, DataError, ServiceError
from spottune.settings import RemoteSettings


def dvc(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one DVC command; a failure raises ServiceError (an external tool, exit code 4) with DVC's own message."""
    try:
        r = subprocess.run([sys.executable, "-m", "dvc", *args], check=False, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:  # pragma: no cover - the interpreter itself vanished
        raise DataError(f"cannot run dvc: {e}") from None
    if r.returncode != 0 and "No module named dvc" in r.stderr:
        raise DataError("DVC is not installed: pip install 'spottune[pipeline]'")
    if check and r.returncode != 0:
        raise ServiceError(f"dvc {' '.join(args)} failed:\n{(r.stderr or r.stdout).strip()}")
    return r


def stream_dvc(*args: str, cwd: Path, env: dict[str, str], log: Callable[[str], None],
               keep: int = 30) -> tuple[int, list[str]]:
    """Run `dvc ARGS` in cwd, each non-empty output line (stdout and stderr) to log as it comes: for long
    commands (repro, exp run, pull) whose progress the user should see. Returns the exit status and the
    last `keep` lines, for an error message."""
    tail: deque[str] = deque(maxlen=keep)
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log(line)
        return proc.wait(), list(tail)


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 a .dvc file records for its data (the data version), or None when it records none."""
    import yaml

    try:
        md5 = yaml.safe_load(Path(dvc_file).read_text())["outs"][0]["md5"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    return str(md5) if md5 else None


def repo_root(start: Path) -> Path:
    """The nearest folder above `start` holding .dvc/; DataError when there is none."""
    start = Path(start).resolve()
    for p in (start, *start.parents):
        if (p / ".dvc").is_dir():
            return p
    raise DataError(f"{start} is not inside a DVC repository (run `dvc init` at the repository root)")


def tracked_root(path: Path, repo: Path) -> Path:
    """What `dvc add` tracks: the top folder under the repository (data/ for data/fashion-mnist)."""
    rel = Path(path).resolve().relative_to(repo)
    return repo / rel.parts[0]


def configure_remote(remote: RemoteSettings, repo: Path) -> bool:
    """Make `remote.url` DVC's default remote; endpoint and region go to .dvc/config.local (per machine)."""
    if remote.url is None:
        return False
    dvc("remote", "add", "--force", "--default", remote.name, remote.url, cwd=repo)
    for key, value in (("endpointurl", remote.endpoint_url), ("region", remote.region)):
        if value is not None:
            dvc("remote", "modify", "--local", remote.name, key, value, cwd=repo)
        else:
            dvc("remote", "modify", "--local", "--unset", remote.name, key, cwd=repo, check=False)
    return True


def describe_remote(remote: RemoteSettings) -> str:
    """'DVC remote 'storage' s3://bucket/prefix at http://host:port' for messages: where, never who."""
    from spottune.endpoints import redact_url_credentials

    if remote.url is None:
        return "the default DVC remote of .dvc/config"
    where = f"DVC remote {remote.name!r} {remote.url} at {remote.endpoint_url or 'AWS S3'}"
    return redact_url_credentials(where)


def has_default_remote(repo: Path) -> bool:
    r = dvc("config", "core.remote", cwd=repo, check=False)
    return r.returncode == 0 and bool(r.stdout.strip())


def version_data(path: Path, remote: RemoteSettings, *, push: bool | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """`dvc add` the top folder holding `path` (data/ -> data.dvc); push when a remote is configured.

    push=None pushes when a default remote exists, True requires one, False never pushes.
    """
    repo = repo_root(Path(path).parent if not Path(path).exists() else Path(path))
    target = tracked_root(path, repo)
    if target == repo:
        raise ConfigError(f"{path}: the data folder must be below the repository root, not the root itself")
    configure_remote(remote, repo)
    dvc("add", target.name, cwd=repo)
    log(f"versioned {target.name}/ -> {target.name}.dvc (commit it with git)")
    remote_ok = has_default_remote(repo)
    if push and not remote_ok:
        raise ConfigError("--push needs a remote: set remote.url in params.yaml or SPOTTUNE_REMOTE_URL")
    if push is not False and remote_ok:
        try:
            dvc("push", f"{target.name}.dvc", cwd=repo)
        except ServiceError as e:  # DVC's own message may name neither the bucket nor the endpoint
            raise ServiceError(f"cannot push {target.name}/ to {describe_remote(remote)}: {e}") from None
        log(f"pushed {target.name}/ to the default DVC remote")
    return repo / f"{target.name}.dvc"

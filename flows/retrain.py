"""The `retrain` flow: version the data -> validate -> train both methods -> evaluate -> gate -> publish -> promote.

What each stage computes is defined once, in dvc.yaml: the tasks here run `dvc repro STAGE` (its
output streamed to the Prefect log) or call the library (data versioning, the artifact store).
Prefect adds what DVC does not: retries with backoff on I/O (data versioning and push, publish,
promote; never on validation or the gate stage), a global concurrency limit so two flows never train on
one GPU at once, one-run parameter overrides recorded with the run, the report as a Prefect
artifact, and schedules (flows/serve.py, prefect.yaml).

    python -m flows.retrain                           # the main job (`make run`)
    python -m flows.retrain --set optim.epochs=1      # one run with params.yaml overridden

The gate is the DVC stage `gate` (spottune/gate.py): the flow promotes only on its record,
metrics/gate.json, and refuses overrides of `gate.*`. A refusal is not an error: the model is
published as a candidate that can never be promoted, and the flow completes with `not promoted: <reason>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

if TYPE_CHECKING:
    from spottune.config import Params, StoreSettings
    from spottune.store import Gate

GPU_LIMIT = "spottune-gpu"
PARAMS_FILE = "params.yaml"
# Where an override keeps the untouched params.yaml while stages run (DVC's own ignored tmp folder), so a
# run killed half-way is undone by the next one instead of leaking its overrides into later runs.
PARAMS_BACKUP = Path(".dvc") / "tmp" / "params.yaml.before-overrides"
# What the pipeline writes that the flow reads: these mirror dvc.yaml's evaluate and train_spottune outs.
COMPARISON_JSON = Path("reports/comparison.json")
COMPARISON_MD = Path("reports/comparison.md")
GATE_JSON = Path("metrics/gate.json")  # the gate stage's record
CANDIDATE_RUN = Path("runs/spottune")
REPORT_MD = Path("reports/retrain.md")
ROUTING_PNG = Path("reports/routing_per_class.png")
ARTIFACT_KEY = "spottune-retrain-report"


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O that may come back (an endpoint down, a lost connection), not what cannot change by
    itself: wrong settings, a missing bucket, refused credentials, a refused promotion."""
    from spottune.errors import ConfigError
    from spottune.store import PromotionRefused, StoreMisconfigured

    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a result that cannot be read: keep the retry policy
        return True
    return not isinstance(error, (ConfigError, StoreMisconfigured, PromotionRefused))


IO_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2),
              "retry_condition_fn": worth_retrying}


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message names the stage and ends with its last output lines."""


# ---------------------------------------------------------------------------------------------
# Edges: settings validated once, before any work


def override_pairs(overrides: dict[str, Any] | None) -> list[str]:
    """{'optim.epochs': 1} -> ['optim.epochs=1'] (values as JSON, which spottune.config parses as YAML);
    gate.* is refused (spottune.gate.refuse_gate_overrides)."""
    from spottune.gate import refuse_gate_overrides

    refuse_gate_overrides([k for k in (overrides or {}) if isinstance(k, str)], "flow override")
    pairs = []
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or "." not in key:
            raise _config_error(f"override key {key!r} is not SECTION.KEY (for example optim.epochs)")
        pairs.append(f"{key}={json.dumps(value)}")
    return pairs


def _config_error(message: str) -> Exception:
    from spottune.errors import ConfigError

    return ConfigError(message)


def load_settings(project: Path, overrides: dict[str, Any] | None) -> Params:
    """params.yaml plus this run's overrides, validated; ConfigError names the bad key before any work."""
    from spottune.config import load_params

    return load_params(project / PARAMS_FILE, override_pairs(overrides))


def load_store_settings(project: Path) -> StoreSettings:
    """SPOTTUNE_STORE_* / SPOTTUNE_S3_* from the environment; a relative local root is the project's."""
    from spottune.store_cli import store_settings

    settings = store_settings()
    if settings.store_backend == "local" and not settings.store_root.is_absolute():
        settings = settings.model_copy(update={"store_root": project / settings.store_root})
    return settings


# ---------------------------------------------------------------------------------------------
# Running DVC stages


def stage_env() -> dict[str, str]:
    """The stages call `spottune`: put this interpreter's scripts first; no analytics, no progress bars."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("SPOTTUNE_PROGRESS", "false")
    return env


def run_dvc(project: Path, *args: str, what: str) -> None:
    """Run `dvc ARGS` in the project, each output line to the Prefect log; StageFailed names `what`."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", *args]
    logger.info("%s: %s", what, " ".join(["dvc", *args]))
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(cmd, cwd=project, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info("[%s] %s", what, line)
        rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"{what} failed: `dvc {' '.join(args)}` exited with {rc} in {project}; last output:\n"
                          + "\n".join(tail))


def _set_dotted(doc: Any, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = doc
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
    node[leaf] = value


@contextmanager
def params_overridden(project: Path, overrides: dict[str, Any] | None) -> Iterator[None]:
    """params.yaml with this run's overrides while the stages run, then byte-for-byte what it was.

    `dvc repro` stays the single source of truth: it reads the overridden file, records the values
    in dvc.lock and the runs' model.json, and the next run (restored file) sees the change and
    retrains. ruamel (a DVC dependency) keeps the file's comments; the backup under .dvc/tmp lets
    `restore_interrupted_override` undo a run that was killed before it could restore.
    """
    if not overrides:
        yield
        return
    from ruamel.yaml import YAML

    path, backup = project / PARAMS_FILE, project / PARAMS_BACKUP
    original = path.read_bytes()
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_bytes(original)
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(original.decode())
    for key, value in overrides.items():
        _set_dotted(doc, key, value)
    try:
        with open(path, "w") as f:
            yaml.dump(doc, f)
        yield
    finally:
        path.write_bytes(original)
        backup.unlink(missing_ok=True)


def restore_interrupted_override(project: Path) -> bool:
    """Put back the params.yaml an interrupted run left overridden; True when there was one."""
    backup = project / PARAMS_BACKUP
    if not backup.is_file():
        return False
    (project / PARAMS_FILE).write_bytes(backup.read_bytes())
    backup.unlink()
    return True


@contextmanager
def gpu_slot(name: str) -> Iterator[None]:
    """Hold one slot of the global concurrency limit NAME (created with 1 slot if missing).

    Prefect ignores a limit that does not exist (strict=False) and refuses with strict=True, so the
    flow creates it first: a fresh server then serialises training without any set-up step.

    A holder killed while it trains (SIGKILL, a lost machine) cannot give its slot back. A real
    server is to revoke the slot once its lease expires (not tested here); Prefect's temporary
    server keeps leases in its own memory, gone with it, so no later server would, and every later
    run would wait for ever. So the holder is also recorded in a file beside Prefect's database
    (slot_holder), and with the temporary server a run that finds the record of a holder that is
    gone gives that slot back.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import get_current_settings

    logger = get_run_logger()
    settings = get_current_settings()
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another flow created it meanwhile
                pass
    logger.info("waiting for a slot of concurrency limit %r", name)
    with slot_holder(Path(settings.home) / f"{name}.holder") as record:
        if record.gone and settings.api.url is None:  # the temporary server: nobody else will
            held = max(1.0, time.time() - record.gone.get("since", time.time()))
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots([name], 1, occupancy_seconds=held)
            logger.warning("gave back the slot of concurrency limit %r that a run killed while training kept "
                           "(pid %s on %s, %.0f s before)", name, record.gone.get("pid"), record.gone.get("host"), held)
        try:
            with concurrency(name, occupy=1, strict=True):
                record.hold()
                logger.info("holding concurrency limit %r", name)
                yield
        finally:  # the slot is given back (or was never taken): nothing left to reclaim
            record.clear()


class _HolderRecord:
    """What slot_holder yields: the record a holder that is gone left (empty if none), and the current one."""

    def __init__(self, file: Any) -> None:
        self._file = file
        text = file.read().strip()
        try:
            self.gone: dict[str, Any] = json.loads(text) if text else {}
        except json.JSONDecodeError:  # cut short by the kill
            self.gone = {"pid": "?", "host": "?"}

    def hold(self) -> None:
        self._write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}))

    def clear(self) -> None:
        self._write("")

    def _write(self, text: str) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())


@contextmanager
def slot_holder(path: Path) -> Iterator[_HolderRecord]:
    """Lock PATH for the slot's holder on this machine, and yield its record.

    The lock (flock) goes with its process, however that ends, so a record found under the lock was
    left by a holder that is gone: a holder that ends normally clears it after giving its slot back.
    Runs on one machine wait here for each other; the limit still serialises runs across machines.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            file.seek(0)
            yield _HolderRecord(file)
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Tasks: thin; DVC stages or library calls


@task(name="version-data", cache_policy=NO_CACHE, **IO_RETRIES)
def version_data(project: Path, params: Params) -> str:
    """`dvc add` the data tree (push when a DVC remote is configured); the data.dvc md5 is the data version."""
    import yaml

    from spottune.config import RemoteSettings
    from spottune.data import versioning

    logger = get_run_logger()
    dvc_file = versioning.version_data(project / params.data.root, RemoteSettings.resolve(params.remote),
                                       log=logger.info)
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    md5 = outs[0].get("md5")
    if not md5:
        raise StageFailed(f"{dvc_file} records no md5: cannot name the data version")
    logger.info("data version %s (%s)", md5, dvc_file.name)
    return str(md5)


@task(name="validate", cache_policy=NO_CACHE)
def validate(project: Path) -> None:
    """prepare + validate (the data contract). Bad data does not get better on retry: no retries."""
    run_dvc(project, "repro", "validate", what="stage validate")


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{stage}")
def train(project: Path, stage: str) -> None:
    """One training stage (train_finetune or train_spottune); DVC skips it when nothing it reads changed.

    A rerun after a crash (a retried or rescheduled flow run) resumes: dvc.yaml keeps the stage's run
    directory (persist) and its command continues an unfinished checkpoint made with the same params.
    """
    run_dvc(project, "repro", stage, what=f"stage {stage}")


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(project: Path) -> tuple[dict[str, Any], str]:
    """The evaluate stage, then its comparison (JSON) and Markdown report."""
    run_dvc(project, "repro", "evaluate", what="stage evaluate")
    try:
        return json.loads((project / COMPARISON_JSON).read_text()), (project / COMPARISON_MD).read_text()
    except (OSError, ValueError) as e:
        raise StageFailed(f"stage evaluate finished but its outputs are unreadable: {e}") from None


@task(name="gate", cache_policy=NO_CACHE)
def gate(project: Path, store_settings: StoreSettings, name: str) -> Gate:
    """The gate stage, then its record; rerun when the store's production version (the champion, which DVC
    cannot see) is not the one the record describes. A refusal is a verdict, not an exception (no retry)."""
    from spottune.gate import read_record, record_is_current
    from spottune.store import Gate

    run_dvc(project, "repro", "gate", what="stage gate")
    if not record_is_current(read_record(project / GATE_JSON), store_settings, name):
        get_run_logger().info("production changed since %s was made: the gate runs again", GATE_JSON)
        run_dvc(project, "repro", "--force", "--single-item", "gate", what="stage gate")
    verdict = Gate.from_record(read_record(project / GATE_JSON), str(GATE_JSON))
    get_run_logger().info("gate %s: %s", "passed" if verdict.passed else "REFUSED", verdict.reason)
    return verdict


@task(name="report", cache_policy=NO_CACHE)
def report(project: Path, comparison: dict[str, Any], comparison_md: str, verdict: Gate, data_version: str,
           overrides: dict[str, Any]) -> Path:
    """The Markdown report with the per-class routing picture: a file, a PNG, and a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    from flows.report import retrain_report, routing_heatmap_png, routing_matrix

    found = routing_matrix(comparison)
    png = routing_heatmap_png(*found) if found else None
    if png:
        (project / ROUTING_PNG).write_bytes(png)
    text = retrain_report(comparison_md, comparison, verdict, data_version, overrides, png)
    (project / REPORT_MD).write_text(text)
    create_markdown_artifact(markdown=text, key=ARTIFACT_KEY,
                             description="SpotTune vs fine-tuning: gate, statistics, routing per class")
    return project / REPORT_MD


@task(name="check-store", cache_policy=NO_CACHE, **IO_RETRIES)
def check_store(store_settings: StoreSettings) -> str:
    """Reach the artifact store before any training: a wrong bucket or credential fails in seconds, not
    after the GPU time."""
    from spottune.store import open_store

    store = open_store(store_settings)  # check=True: head_bucket / the folder exists
    return store.backend.url(store.prefix)


@task(name="publish", cache_policy=NO_CACHE, **IO_RETRIES)
def publish(project: Path, store_settings: StoreSettings, name: str, verdict: Gate, data_version: str,
            report_path: Path) -> dict[str, Any]:
    """Upload SpotTune's run (candidate when the gate failed). Idempotent: a retry sends only what is missing."""
    from spottune.store import open_store

    logger = get_run_logger()
    run = project / CANDIDATE_RUN
    store = open_store(store_settings)
    # the version is the store's content_version: weights, metrics, gate verdict, report and data version
    result = store.publish(run, name, gate=verdict, data_version=data_version, report=report_path,
                           log=logger.info)
    version = result.version
    logger.info("%s %s: %s", name, version, "already published, unchanged" if result.already_published else
                f"{len(result.uploaded)} files uploaded, {len(result.skipped)} already there")
    return {"version": result.version, "manifest_sha256": result.manifest_sha256, "uploaded": result.uploaded,
            "skipped": result.skipped, "already_published": result.already_published,
            "url": store.backend.url(store.version_key(name, version))}


@task(name="promote", cache_policy=NO_CACHE, **IO_RETRIES)
def promote(store_settings: StoreSettings, name: str, version: str, reason: str) -> dict[str, Any]:
    """Verify and make VERSION production (pointer written last; a no-op when it already is)."""
    from spottune.store import open_store

    pointer = open_store(store_settings).promote(name, version, reason=reason)
    get_run_logger().info("%s: production is now %s", name, pointer["version"])
    return pointer


# ---------------------------------------------------------------------------------------------
# The flow


@flow(name="retrain", log_prints=True)
def retrain(overrides: dict[str, Any] | None = None, project_dir: str = ".", gpu_limit: str = GPU_LIMIT) -> dict[str, Any]:
    """Retrain SpotTune and its fine-tuning baseline, and promote SpotTune only if the gate stage says so.

    overrides: dotted params.yaml keys for this run only, e.g. {"optim.epochs": 1} (gate.* is refused);
    recorded as the flow run's parameters, in dvc.lock, the published params.json and the report.
    project_dir: the repository holding dvc.yaml and params.yaml. gpu_limit: the global concurrency
    limit the DVC stages hold (one per GPU host).
    """
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    overrides = dict(overrides or {})
    if restore_interrupted_override(project):
        logger.warning("restored params.yaml left overridden by an interrupted run")
    params = load_settings(project, overrides)  # fail fast, naming the key, before any work
    store_settings = load_store_settings(project)
    check_store(store_settings)
    name = params.publish.model_name

    data_version = version_data(project, params)
    with gpu_slot(gpu_limit), params_overridden(project, overrides):
        validate(project)
        train(project, "train_finetune")
        train(project, "train_spottune")
        comparison, comparison_md = evaluate(project)
        verdict = gate(project, store_settings, name)

    report_path = report(project, comparison, comparison_md, verdict, data_version, overrides)
    published = publish(project, store_settings, name, verdict, data_version, report_path)
    promoted = bool(verdict.passed and params.publish.promote)
    if promoted:
        promote(store_settings, name, published["version"], verdict.reason)
        status = f"promoted {name} {published['version']} to production: {verdict.reason}"
    elif verdict.passed:
        status = f"not promoted: publish.promote is false ({name} {published['version']} passed the gate)"
    else:
        status = f"not promoted: {verdict.reason} ({name} {published['version']} stored as a candidate)"
    logger.info(status)
    return {"status": status, "promoted": promoted, "gate_passed": verdict.passed, "reason": verdict.reason,
            "model": name, "data_version": data_version, "overrides": overrides, "report": str(report_path),
            "baseline_accuracy": verdict.details["baseline"]["accuracy"],
            "candidate_accuracy": verdict.details["candidate"]["accuracy"], **published}


# ---------------------------------------------------------------------------------------------
# Command line: `python -m flows.retrain [--set key=value ...]`


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value for this run (values parse as YAML); repeatable")
    p.add_argument("--project-dir", default=".", help="the repository holding dvc.yaml and params.yaml")
    return p.parse_args(argv)


def overrides_from_pairs(pairs: list[str]) -> dict[str, Any]:
    """['optim.epochs=1'] -> {'optim.epochs': 1}; values parse as YAML, like `spottune --set`."""
    from spottune.config import parse_override

    return dict(parse_override(pair) for pair in pairs)


def main(argv: list[str] | None = None) -> int:
    from spottune.errors import SpotTuneError

    args = parse_args(argv)
    try:
        result = retrain(overrides=overrides_from_pairs(args.overrides), project_dir=args.project_dir)
    except SpotTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(Path(result["report"]).read_text().split("\n## Which blocks")[0])
    print(result["status"])
    print(f"stored at {result['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

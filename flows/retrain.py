"""The `retrain` flow: version the data -> validate -> train both methods -> compare -> gate -> publish -> promote.

What each stage computes is defined once, in dvc.yaml: the tasks here run DVC (flows/dvc_runner.py,
its output streamed to the Prefect log) or call the library (data versioning, the artifact store).
Prefect adds what DVC does not: retries with backoff on I/O (data versioning and push, publish,
promote; never on validation or the gate stage), a global concurrency limit so two flows never train on
one GPU at once, one-run parameter overrides recorded with the run, the report as a Prefect
artifact, schedules (flows/serve.py, prefect.yaml), and alerts when a run fails or the gate refuses
(flows/alerts.py: a JSON POST to SPOTTUNE_ALERT_WEBHOOK).

Where the stages run:
- a plain run (no overrides) in the user's checkout: `dvc repro STAGE`, stage by stage, there;
- a run with overrides: a DVC experiment named after the flow run (`dvc exp run --name RUN -S ...`)
  in a private worktree holding the checkout's state (flows/checkout.py); params.yaml, dvc.lock and
  the outputs of the user's checkout stay as they were;
- a deployment's run (`own_checkout=True`, prefect.yaml and flows/serve.py): a DVC experiment in a
  private worktree at HEAD, overrides or not; the user's checkout is never touched.
An experiment is pushed (`dvc exp push`) where the repository has a git remote.

    python -m flows.retrain                           # the main job (`make run`)
    python -m flows.retrain --set optim.epochs=1      # one run with params.yaml overridden: an experiment

The gate is the DVC stage `gate` (spottune/gate.py): the flow promotes only on its record,
metrics/gate.json in the checkout the stages ran in, rerunning the stage there when the store's
production version is no longer the one the record describes; overrides of `gate.*` are refused
before any work. A refusal is not an error: the model is published as a candidate that can never be
promoted, and the flow completes with `not promoted: <reason>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import dvc_runner
from flows.alerts import describe_alerts, on_flow_completion, on_flow_failure
from flows.checkout import private_checkout
from flows.dvc_runner import StageFailed
from flows.gpu_slot import gpu_slot
from flows.lineage import flow_lineage

if TYPE_CHECKING:
    from spottune.config import Params
    from spottune.settings import StoreSettings
    from spottune.store import Gate, Lineage

GPU_LIMIT = "spottune-gpu"
PARAMS_FILE = "params.yaml"
# What the pipeline writes that the flow reads: these mirror dvc.yaml's compare and train_spottune outs.
COMPARISON_JSON = Path("reports/comparison.json")
COMPARISON_MD = Path("reports/comparison.md")
GATE_JSON = Path("metrics/gate.json")  # the gate stage's record
CANDIDATE_RUN = Path("runs/spottune")
REPORT_MD = Path("reports/retrain.md")
ROUTING_PNG = Path("reports/routing_per_class.png")
DATA_DOCS = Path("reports/validation/data_docs/index.html")  # the validate stage's Great Expectations Data Docs
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
    """SPOTTUNE_STORE_* / SPOTTUNE_S3_* from the environment; a relative local root or model cache is the project's."""
    from spottune.store_cli import store_settings

    settings = store_settings()
    update: dict[str, Path] = {}
    if not settings.store_root.is_absolute():
        update["store_root"] = project / settings.store_root
    if settings.model_cache_dir is not None and not settings.model_cache_dir.is_absolute():
        update["model_cache_dir"] = project / settings.model_cache_dir
    return settings.model_copy(update=update)


def store_env(settings: StoreSettings) -> dict[str, str]:
    """The store's folders as absolute paths for DVC's stages (the gate stage reads the store): a stage
    in a private checkout would resolve a relative SPOTTUNE_STORE_ROOT inside that checkout instead."""
    env = {"SPOTTUNE_STORE_ROOT": str(settings.store_root)}
    if settings.model_cache_dir is not None:
        env["SPOTTUNE_MODEL_CACHE_DIR"] = str(settings.model_cache_dir)
    return env


# ---------------------------------------------------------------------------------------------
# Tasks: thin; DVC stages or library calls


@task(name="version-data", cache_policy=NO_CACHE, **IO_RETRIES)
def version_data(project: Path, params: Params) -> str:
    """`dvc add` the data tree (push when a DVC remote is configured); the data.dvc md5 is the data version."""
    from spottune.data import versioning
    from spottune.settings import RemoteSettings

    logger = get_run_logger()
    dvc_file = versioning.version_data(project / params.data.root, RemoteSettings.resolve(params.remote),
                                       log=logger.info)
    md5 = versioning.recorded_md5(dvc_file)
    if not md5:
        raise StageFailed(f"{dvc_file} records no md5: cannot name the data version")
    logger.info("data version %s (%s)", md5, dvc_file.name)
    return md5


def _log(message: str) -> None:
    get_run_logger().info("%s", message)


@task(name="validate", cache_policy=NO_CACHE)
def validate(root: Path) -> None:
    """prepare + validate (the data contract). Bad data does not get better on retry: no retries."""
    dvc_runner.run_dvc(root, "repro", "validate", what="stage validate", log=_log)


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{stage}")
def train(root: Path, stage: str) -> None:
    """One training stage (train_finetune or train_spottune); DVC skips it when nothing it reads changed.

    A rerun after a crash (a retried or rescheduled flow run) resumes: dvc.yaml keeps the stage's run
    directory (persist) and its command continues an unfinished checkpoint made with the same params.
    """
    dvc_runner.run_dvc(root, "repro", stage, what=f"stage {stage}", log=_log)


@task(name="compare", cache_policy=NO_CACHE)
def compare(root: Path) -> None:
    """The compare stage: both runs on the same test images, with the paired statistics."""
    dvc_runner.run_dvc(root, "repro", "compare", what="stage compare", log=_log)


@task(name="experiment", cache_policy=NO_CACHE, task_run_name="experiment-{name}")
def experiment(root: Path, name: str, overrides: dict[str, Any], env: dict[str, str]) -> None:
    """Every stage (validate, train_finetune, train_spottune, compare, gate) as DVC experiment NAME in ROOT,
    a private checkout; DVC skips what the overrides do not change. No retries, as for the stages."""
    dvc_runner.run_experiment(root, name, overrides, log=_log, env=env)


@task(name="push-experiment", cache_policy=NO_CACHE, **IO_RETRIES)
def push_experiment(root: Path, name: str) -> str | None:
    """`dvc exp push` to the git remote (and the outputs to the DVC remote), where there is one."""
    return dvc_runner.push_experiment(root, name, log=_log)


def read_comparison(root: Path) -> tuple[dict[str, Any], str]:
    """The compare stage's comparison (JSON) and Markdown report, from the checkout the stages ran in."""
    try:
        return json.loads((root / COMPARISON_JSON).read_text()), (root / COMPARISON_MD).read_text()
    except (OSError, ValueError) as e:
        raise StageFailed(f"stage compare finished but its outputs are unreadable: {e}") from None


def experiment_name() -> str:
    """The flow run's name (Prefect's, e.g. 'amber-fox'), which names its DVC experiment."""
    from prefect.runtime import flow_run

    return str(flow_run.name or "flow-run")


@task(name="gate", cache_policy=NO_CACHE)
def gate(root: Path, store_settings: StoreSettings, name: str, stage_ran: bool) -> Gate:
    """The gate stage's record in ROOT, the checkout the stages ran in. stage_ran: the stage has run there
    already (an experiment runs every stage); else `dvc repro gate` first. Rerun when the store's production
    version (the champion, which DVC cannot see) is not the one the record describes. A refusal is a
    verdict, not an exception (no retry)."""
    from spottune.gate import read_record, record_is_current
    from spottune.store import Gate

    env = store_env(store_settings)
    if not stage_ran:
        dvc_runner.run_dvc(root, "repro", "gate", what="stage gate", log=_log, env=env)
    if not record_is_current(read_record(root / GATE_JSON), store_settings, name):
        _log(f"production changed since {GATE_JSON} was made: the gate runs again")
        dvc_runner.run_dvc(root, "repro", "--force", "--single-item", "gate", what="stage gate", log=_log, env=env)
    verdict = Gate.from_record(read_record(root / GATE_JSON), str(GATE_JSON))
    get_run_logger().info("gate %s: %s", "passed" if verdict.passed else "REFUSED", verdict.reason)
    return verdict


@task(name="report", cache_policy=NO_CACHE)
def report(project: Path, comparison: dict[str, Any], comparison_md: str, verdict: Gate, data_version: str,
           overrides: dict[str, Any]) -> tuple[Path, str]:
    """The Markdown report with the per-class routing picture and a link to the validation's Data Docs: a
    file, a PNG, and a Prefect artifact. Returns the file and the report's summary (everything before the routing section)."""
    from prefect.artifacts import create_markdown_artifact

    from flows.report import retrain_report, routing_heatmap_png, routing_matrix

    found = routing_matrix(comparison)
    png = routing_heatmap_png(*found) if found else None
    if png:
        (project / ROUTING_PNG).write_bytes(png)
    docs = DATA_DOCS.as_posix() if (project / DATA_DOCS).is_file() else None
    text, summary = retrain_report(comparison_md, comparison, verdict, data_version, overrides, png, docs)
    (project / REPORT_MD).write_text(text)
    create_markdown_artifact(markdown=text, key=ARTIFACT_KEY,
                             description="SpotTune vs fine-tuning: gate, statistics, routing per class")
    return project / REPORT_MD, summary


@task(name="check-store", cache_policy=NO_CACHE, **IO_RETRIES)
def check_store(store_settings: StoreSettings) -> str:
    """Reach the artifact store before any training: a wrong bucket or credential fails in seconds, not
    after the GPU time."""
    from spottune.store import open_store

    store = open_store(store_settings)  # check=True: head_bucket / the folder exists
    return store.backend.url(store.prefix)


@task(name="publish", cache_policy=NO_CACHE, **IO_RETRIES)
def publish(root: Path, store_settings: StoreSettings, name: str, verdict: Gate, data_version: str,
            report_path: Path, experiment: str | None = None, lineage: Lineage | None = None) -> dict[str, Any]:
    """Upload SpotTune's run (candidate when the gate failed). Idempotent: a retry sends only what is missing.

    root: the checkout the stages ran in; experiment: the DVC experiment that made the run (None for a
    plain run in the user's checkout); lineage: what the version is replayed from (spottune reproduce).
    """
    from spottune.store import open_store

    logger = get_run_logger()
    run = root / CANDIDATE_RUN
    store = open_store(store_settings)
    if experiment:
        logger.info("publishing the run of DVC experiment %s", experiment)
    # the version is the store's content_version: weights, metrics, gate verdict, report and data version
    result = store.publish(run, name, gate=verdict, data_version=data_version, report=report_path,
                           lineage=lineage, log=logger.info)
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


def run_stages(project: Path, params: Params, overrides: dict[str, Any], exp: str | None, own_checkout: bool,
               gpu_limit: str, store_settings: StoreSettings, checkouts: ExitStack) -> tuple[Path, str, Gate]:
    """Version the data and run every stage under the GPU slot, the gate last; returns (the checkout they ran
    in, the data version, the gate's verdict).

    exp None: `dvc repro` stage by stage in the user's checkout. Otherwise DVC experiment EXP in a
    private checkout entered on CHECKOUTS (it lives until the version is published): at HEAD for a
    deployment's run (own_checkout), else holding the user's checkout as it is, data versioned there first.
    """
    root = project
    if own_checkout:
        assert exp is not None, "a run in its own checkout is always an experiment"
        root = checkouts.enter_context(private_checkout(project, exp, carry_workspace=False,
                                                        data_root=params.data.root, log=_log))
    with gpu_slot(gpu_limit):
        data_version = version_data(root, params)
        if exp is None:
            validate(root)
            train(root, "train_finetune")
            train(root, "train_spottune")
            compare(root)
        else:
            if not own_checkout:
                root = checkouts.enter_context(private_checkout(project, exp, carry_workspace=True,
                                                                data_root=params.data.root, log=_log))
            experiment(root, exp, overrides, store_env(store_settings))
        verdict = gate(root, store_settings, params.publish.model_name, stage_ran=exp is not None)
    return root, data_version, verdict


@flow(name="retrain", log_prints=True, on_failure=[on_flow_failure], on_completion=[on_flow_completion])
def retrain(overrides: dict[str, Any] | None = None, project_dir: str = ".", gpu_limit: str = GPU_LIMIT,
            own_checkout: bool = False) -> dict[str, Any]:
    """Retrain SpotTune and its fine-tuning baseline, and promote SpotTune only if the gate stage says so.

    overrides: dotted params.yaml keys for this run only, e.g. {"optim.epochs": 1} (gate.* is refused);
    the run is then a DVC experiment named after the flow run, and the overrides are recorded as the
    flow run's parameters, in the experiment (`dvc exp show`) and in the report.
    project_dir: the repository holding dvc.yaml and params.yaml. gpu_limit: the global concurrency
    limit the DVC stages hold (one per GPU host). own_checkout: work in a private worktree at HEAD
    (deployments), never in the checkout at project_dir. A failed run, and a gate that refuses, are POSTed
    to SPOTTUNE_ALERT_WEBHOOK when it is set (flows/alerts.py: Prefect hooks, after the run ends).
    """
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    overrides = dict(overrides or {})
    logger.info(describe_alerts())
    params = load_settings(project, overrides)  # fail fast, naming the key, before any work
    store_settings = load_store_settings(project)
    check_store(store_settings)
    name = params.publish.model_name
    exp = dvc_runner.unused_experiment_name(project, experiment_name()) if overrides or own_checkout else None

    with ExitStack() as checkouts:
        root, data_version, verdict = run_stages(project, params, overrides, exp, own_checkout, gpu_limit,
                                                 store_settings, checkouts)
        comparison, comparison_md = read_comparison(root)
        pushed_to = push_experiment(root, exp) if exp else None
        report_path, summary_md = report(root, comparison, comparison_md, verdict, data_version, overrides)
        report_md = report_path.read_text()
        lineage = flow_lineage(root, root / CANDIDATE_RUN, params, data_version, experiment=exp)
        published = publish(root, store_settings, name, verdict, data_version, report_path, experiment=exp,
                            lineage=lineage)
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
            "model": name, "data_version": data_version, "overrides": overrides, "experiment": exp,
            "experiment_pushed_to": pushed_to, "report": str(report_path) if root == project else None,
            "report_md": report_md, "summary_md": summary_md, "baseline_accuracy": verdict.details["baseline"]["accuracy"],
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
        return e.exit_code  # 3 bad input, 4 an external service (spottune/errors.py)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result["summary_md"])
    print(result["status"])
    print(f"stored at {result['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`spottune publish | promote | rollback | models list`: the artifact store from the command line.

    spottune publish runs/spottune --name fashion [--gate metrics/gate.json | --candidate-only] [--version V]
                     [--data-version HASH] [--report FILE] [--project DIR] [--experiment NAME]
    spottune promote fashion V [--reason "..."]            (a version with the gate stage's passed record)
    spottune promote fashion V --force --reason "hotfix"  (one without: audited as forced)
    spottune rollback fashion [--from VERSION] [--reason ...]
    spottune models list fashion [--json]
    spottune models show fashion@latest|fashion@production|fashion@VERSION [--json]
    spottune reproduce fashion@VERSION --out DIR [--repo .] [--tolerance 0]

The backend comes from the environment (StoreSettings: SPOTTUNE_STORE_BACKEND=local|s3,
SPOTTUNE_STORE_ROOT, SPOTTUNE_STORE_PREFIX, SPOTTUNE_S3_BUCKET, SPOTTUNE_S3_ENDPOINT_URL,
SPOTTUNE_S3_REGION); credentials from boto3's standard chain only. `register(subparsers)` adds the
commands to spottune's parser; each command function takes (args, runtime) like the others.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from spottune.errors import ConfigError


def store_settings():
    """StoreSettings from the environment, validation errors turned into a ConfigError naming the variable."""
    from spottune.settings import StoreSettings, from_environment

    return from_environment(StoreSettings, "store settings")


def _store():
    from spottune.store import open_store

    return open_store(store_settings())


def publish_lineage(run: Path, project: Path | None, data_version: str | None, experiment: str | None):
    """(lineage, data version) of a run published by hand: the project is --project, else the nearest folder
    above the run holding dvc.yaml; without one, no lineage (None). The data version defaults to data.dvc's."""
    from spottune.config import load_params
    from spottune.lineage import collect_lineage, data_dvc_md5, find_project

    project = project if project is not None else find_project(run)
    if project is None:
        return None, data_version
    data_version = data_version or data_dvc_md5(project)
    params = load_params(project / "params.yaml" if (project / "params.yaml").is_file() else None)
    return collect_lineage(project, run, params, data_version=data_version, experiment=experiment), data_version


def publish_gate(args: argparse.Namespace):
    """The verdict to publish with: the gate stage's record (--gate FILE), a failure (--candidate-only), or none."""
    from spottune.store import Gate

    if args.candidate_only:
        return Gate(False, args.gate_reason or "published with --candidate-only")
    if args.gate is not None:
        try:
            record = json.loads(Path(args.gate).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--gate {args.gate}: not a readable gate record: {e}") from None
        return Gate.from_record(record, f"--gate {args.gate}")
    return Gate(None, args.gate_reason or "published by hand, without the pipeline's gate record")


def cmd_publish(args: argparse.Namespace, runtime: Any = None) -> int:
    """Upload a finished run with its lineage and its verdict: the gate stage's record, a failure, or none
    (promotion then needs --force --reason)."""
    if args.candidate_only and args.gate is not None:
        raise ConfigError("--candidate-only and --gate exclude each other: the gate record holds the verdict")
    gate = publish_gate(args)
    lineage, data_version = publish_lineage(args.run, args.project, args.data_version, args.experiment)
    if lineage is None:
        print(f"no lineage recorded: no dvc.yaml above {args.run} (pass --project)")
    elif lineage.record["git_dirty"]:
        print(f"lineage: {lineage.record['git_commit']} with uncommitted changes (stored as git.diff)")
    result = _store().publish(args.run, args.name, args.version, gate=gate, data_version=data_version,
                              report=args.report, lineage=lineage, log=print)
    state = "already published (unchanged)" if result.already_published else (
        f"published: {len(result.uploaded)} files uploaded, {len(result.skipped)} already there")
    kind = {True: "passed the gate", False: "candidate (never promotable)",
            None: "no gate record (promotion needs --force --reason)"}[gate.passed]
    print(f"{args.name} {result.version}: {state}; {kind}; manifest sha256 {result.manifest_sha256}")
    if gate.passed is not False:
        print(f"promote with: spottune promote {args.name} {result.version}"
              + (" --force --reason TEXT" if gate.passed is None else ""))
    return 0


def cmd_promote(args: argparse.Namespace, runtime: Any = None) -> int:
    pointer = _store().promote(args.name, args.version, reason=args.reason, force=args.force)
    forced = " (forced: recorded in the audit trail)" if pointer.get("forced") else ""
    print(f"{args.name}: production is now {pointer['version']} (manifest sha256 {pointer['manifest_sha256']}){forced}")
    return 0


def cmd_rollback(args: argparse.Namespace, runtime: Any = None) -> int:
    pointer = _store().rollback(args.name, reason=args.reason, expect_current=args.expect_current)
    print(f"{args.name}: rolled back, production is now {pointer['version']}")
    return 0


def cmd_models_list(args: argparse.Namespace, runtime: Any = None) -> int:
    rows = _store().list_versions(args.name)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    if not rows:
        print(f"{args.name}: no versions")
        return 0
    print(f"{'':2}{'version':<20} {'complete':<9} {'gate':<7} {'test acc':<9} {'method':<10} created")
    for r in rows:
        acc = f"{r.test_accuracy:.4f}" if r.test_accuracy is not None else "-"
        gate = {True: "passed", False: "failed", None: "none" if r.complete else "-"}[r.gate_passed]
        line = (f"{'*' if r.production else ' ':2}{r.version:<20} {'yes' if r.complete else 'NO':<9} {gate:<7} "
                f"{acc:<9} {r.method or '-':<10} {r.created_at or '-'}")
        print(line + (f"  ({r.problem})" if r.problem else ""))
    print("* = production")
    return 0


def fetch_model(ref: str, cache_dir: Path | None, *, option: str = "--model", log=None):
    """NAME@production|latest|VERSION from the store of SPOTTUNE_STORE_*: (folder of verified files, Resolved).
    option names the argument in errors; log gets the cache's messages (default: stderr)."""
    import sys

    from spottune.model_cache import fetch_cached, parse_model_ref, resolve
    from spottune.store import open_store

    name, what = parse_model_ref(ref, option=option)
    settings = store_settings()
    store = open_store(settings)
    resolved = resolve(store, name, what)
    folder = fetch_cached(store, resolved, cache_dir or settings.model_cache_dir,
                          log=log or (lambda m: print(m, file=sys.stderr)))
    return folder, resolved


def show_record(store: Any, name: str, ref: str) -> dict[str, Any]:
    """What `models show` prints: the version, its lineage, metrics (without the per-epoch history) and gate
    record, each file read from the store and checked against the version's manifest."""
    from spottune.model_cache import resolve
    from spottune.store import GATE, LINEAGE, MODEL_CARD_JSON

    resolved = resolve(store, name, ref)
    manifest, _ = store.read_manifest(name, resolved.version)

    def read(fname: str) -> Any:
        return json.loads(store.read_verified(name, resolved.version, fname)) if fname in manifest["files"] else None

    metrics = read("metrics.json") or {}
    pointer = store.production(name)
    return {
        "name": name, "ref": ref, "version": resolved.version, "manifest_sha256": resolved.manifest_sha256,
        "production": pointer is not None and pointer["version"] == resolved.version,
        "created_at": manifest.get("created_at"), "created_by": manifest.get("created_by"),
        "files": sorted(manifest["files"]), "gate": read(GATE), "lineage": read(LINEAGE),
        "metrics": {k: v for k, v in metrics.items() if k != "history"}, "card": read(MODEL_CARD_JSON),
    }


def show_text(shown: dict[str, Any]) -> str:
    """The human-readable form of a show_record: the summary and lineage, then the model card (when the version
    has model_card.json; versions published before it have only the summary)."""
    from spottune.store.cards import model_card_markdown

    text = show_summary(shown)
    return text if shown.get("card") is None else f"{text}\n\n{model_card_markdown(shown['card'])}"


def show_summary(shown: dict[str, Any]) -> str:
    """The version, its gate, top-1 and lineage in a few lines."""
    from spottune.store.cards import verdict

    gate, lineage, test = shown["gate"] or {}, shown["lineage"], shown["metrics"].get("test") or {}
    acc = test.get("accuracy")
    lines = [
        f"{shown['name']} {shown['version']}" + (" (production)" if shown["production"] else ""),
        f"  published   {shown['created_at']} by {shown['created_by']}",
        f"  gate        {verdict(gate.get('passed'))}: {gate.get('reason') or '-'}",
        f"  test top-1  {acc:.4f}" if isinstance(acc, (int, float)) else "  test top-1  -",
        f"  method      {shown['metrics'].get('method', '-')} on {shown['metrics'].get('backbone', '-')}",
    ]
    if lineage is None:
        lines.append("  lineage     none recorded (published before lineage existed)")
        return "\n".join(lines)
    dirty = {True: " + uncommitted changes (git.diff)", False: "", None: ""}[lineage.get("git_dirty")]
    flow = lineage.get("flow_run") or {}
    packages = lineage.get("packages") or {}
    lines += [
        f"  git commit  {lineage.get('git_commit') or '- (not a git checkout)'}{dirty}",
        f"  dvc.lock    sha256 {lineage.get('dvc_lock_sha256') or '-'}",
        f"  data        {lineage.get('data_version') or '-'}",
        f"  experiment  {lineage.get('experiment') or '-'}",
        (f"  run         {lineage.get('run') or '-'} on {lineage.get('device') or '-'}, "
         f"{lineage.get('threads') or '?'} threads"),
        f"  flow run    {flow.get('name') or flow.get('id') or '-'}"
        + (f" (deployment {flow['deployment']})" if flow.get("deployment") else ""),
        "  packages    " + ", ".join(f"{k} {v}" for k, v in packages.items() if v is not None),
    ]
    return "\n".join(lines)


def cmd_models_show(args: argparse.Namespace, runtime: Any = None) -> int:
    from spottune.model_cache import parse_model_ref

    name, ref = parse_model_ref(args.ref, option="NAME@REF")
    shown = show_record(_store(), name, ref)
    print(json.dumps(shown, indent=2) if args.json else show_text(shown))
    return 0


def cmd_reproduce(args: argparse.Namespace, runtime: Any = None) -> int:
    """Rebuild a published version from its lineage; exit 1 naming what differs from the record."""
    import sys

    from spottune.reproduce import reproduce

    if args.tolerance < 0:
        raise ConfigError(f"--tolerance must be at least 0 (got {args.tolerance})")
    folder, resolved = fetch_model(args.ref, args.cache_dir, option="NAME@REF", log=lambda _: None)
    label = f"{resolved.name} {resolved.version}"
    result = reproduce(folder, label, args.repo, args.out, tolerance=args.tolerance)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.differences:
        print(f"{label} NOT reproduced in {result.out} ({len(result.differences)} differences from the record):",
              file=sys.stderr)
        for line in result.differences[:12]:
            print(f"  {line}", file=sys.stderr)
        if len(result.differences) > 12:
            print(f"  ... and {len(result.differences) - 12} more", file=sys.stderr)
        return 1
    print(f"{label} reproduced in {result.out} from {result.commit}: the metrics and weights match the record")
    return 0


def register(subparsers: Any) -> None:
    """Add publish, promote, rollback and `models list` to spottune's subparsers."""
    p = subparsers.add_parser("publish", help="upload a finished run to the artifact store as a model version")
    p.add_argument("run", type=Path, help="finished run directory")
    p.add_argument("--name", required=True, help="model name in the store")
    p.add_argument("--version", default=None, help="version (default: 12 hex of the weights' sha256, then 6 of all published files)")
    p.add_argument("--data-version", default=None, help="the data.dvc md5 the run was trained on")
    p.add_argument("--report", type=Path, default=None, help="evaluation report (Markdown) to publish with it")
    p.add_argument("--gate", type=Path, default=None, metavar="FILE",
                   help="the gate stage's record for this run (metrics/gate.json); without it the version has no "
                        "gate verdict and only a forced promotion makes it production")
    p.add_argument("--candidate-only", action="store_true",
                   help="record a failed gate: the version is stored and listed but never promotable")
    p.add_argument("--gate-reason", default=None, help="why it has no verdict or failed (recorded in gate.json)")
    p.add_argument("--project", type=Path, default=None, help="the git + DVC project the run was made in, for the "
                   "lineage (default: the nearest folder above the run holding dvc.yaml)")
    p.add_argument("--experiment", default=None, help="the DVC experiment the run belongs to (recorded in the lineage)")
    p.set_defaults(func=cmd_publish)

    p = subparsers.add_parser("promote", help="make a verified, gate-passed version the production model")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", default="", help="recorded in the pointer and the audit trail")
    p.add_argument("--force", action="store_true",
                   help="promote a version without the pipeline's gate record (needs --reason; audited as forced); "
                        "a version whose gate failed is never promoted")
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser("rollback", help="make the previous production version production again")
    p.add_argument("name")
    p.add_argument("--from", dest="expect_current", default=None, metavar="VERSION",
                   help="roll back only if VERSION is production (safe to repeat after an error)")
    p.add_argument("--reason", default="")
    p.set_defaults(func=cmd_rollback)

    p = subparsers.add_parser("models", help="inspect models in the artifact store")
    models = p.add_subparsers(dest="models_command", required=True)
    q = models.add_parser("list", help="versions of a model: completeness, gate, metrics, production")
    q.add_argument("name")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_models_list)
    q = models.add_parser("show", help="one version: lineage, metrics and gate record")
    q.add_argument("ref", metavar="NAME@REF", help="NAME@VERSION, NAME@latest (newest complete) or NAME@production")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_models_show)

    p = subparsers.add_parser("reproduce", help="rebuild a published version from its lineage and compare its metrics")
    p.add_argument("ref", metavar="NAME@REF", help="NAME@VERSION, NAME@latest or NAME@production")
    p.add_argument("--out", type=Path, required=True, help="new or empty folder: a git worktree at the recorded commit")
    p.add_argument("--repo", type=Path, default=Path("."), help="the git repository holding the commit (default: .)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="largest absolute difference allowed per number (default 0: exact, as on CPU)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (as for predict)")
    p.set_defaults(func=cmd_reproduce)

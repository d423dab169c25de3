"""`spottune publish | promote | rollback | models list`: the artifact store from the command line.

    spottune publish runs/spottune --name fashion [--gate metrics/gate.json | --candidate-only] [--version V]
                     [--data-version HASH] [--report FILE]
    spottune promote fashion V [--reason "..."]            (a version with the gate stage's passed record)
    spottune promote fashion V --force --reason "hotfix"  (one without: audited as forced)
    spottune rollback fashion [--from VERSION] [--reason ...]
    spottune models list fashion [--json]

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
    from pydantic import ValidationError

    from spottune.config import StoreSettings

    try:
        return StoreSettings()
    except ValidationError as e:
        lines = ["invalid store settings in the environment:"]
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            var = f"SPOTTUNE_{field.upper()}" if field else "(settings)"
            lines.append(f"  {var}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("\n".join(lines)) from None


def _store():
    from spottune.store import open_store

    return open_store(store_settings())


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
    """Upload a finished run with its verdict: the gate stage's record, a failure, or none (promotion then
    needs --force --reason)."""
    if args.candidate_only and args.gate is not None:
        raise ConfigError("--candidate-only and --gate exclude each other: the gate record holds the verdict")
    gate = publish_gate(args)
    result = _store().publish(args.run, args.name, args.version, gate=gate, data_version=args.data_version,
                              report=args.report, log=print)
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

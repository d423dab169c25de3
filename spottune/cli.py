"""`spottune <command>`: parse and validate settings, call the library, write outputs.

    spottune data fashion-mnist --out data/fashion-mnist --train-per-class 100 [--track]
    spottune prepare                       (data.root -> prepare.manifest, seeded stratified splits)
    spottune validate --out-dir reports/validation   (non-zero exit on bad data)
    spottune remote                        (DVC remote from `remote` + SPOTTUNE_REMOTE_*)
    spottune train --method spottune --out runs/spottune [--params params.yaml] [--set optim.epochs=5]
    spottune evaluate runs/spottune
    spottune export-backbone runs/finetune --out weights/source.safetensors   (pretrain inside the pipeline)
    spottune compare runs/finetune runs/spottune --report runs/comparison.md
    spottune gate [--comparison reports/comparison.json] [--out metrics/gate.json]   (the promotion gate)
    spottune predict --run runs/spottune IMAGE...   (or --model NAME@production [--json] [--csv FILE] PATH...)
    spottune serve --model NAME@production --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spottune.config import BACKBONES, METHODS, load_params
from spottune.errors import SpotTuneError
from spottune.outputs import output_dir, output_file
from spottune.settings import RuntimeSettings


def _params(args: argparse.Namespace):
    overrides = list(args.set or [])
    if getattr(args, "method", None):
        overrides.append(f"model.method={args.method}")
    if getattr(args, "backbone", None):
        overrides.append(f"model.backbone={args.backbone}")
    path = args.params if args.params is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
    return load_params(path, overrides)


def _runtime_settings() -> RuntimeSettings:
    """RuntimeSettings (SPOTTUNE_DEVICE, ...) from the environment; a bad value is a ConfigError naming the
    variable (exit 3), not a pydantic traceback."""
    from spottune.settings import from_environment

    return from_environment(RuntimeSettings, "settings")


def _write_json(path: Path | None, obj) -> None:
    if path is not None:
        from spottune.atomic import write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, obj)


def cmd_data(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.data.sources import DATASET_CARD, materialise

    output_dir(args.out, "--out")
    remote = None
    if args.track or args.push:  # validate the remote settings before any work
        from spottune.settings import RemoteSettings

        remote = RemoteSettings.resolve(_params(args).remote)
    if args.keep_existing and (args.out / DATASET_CARD).is_file():
        print(f"{args.out} already holds a dataset: kept as it is")
    else:
        materialise(args.source, args.out, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                    seed=args.seed, fashion_mnist_dir=runtime.fashion_mnist_dir, overwrite=args.overwrite)
    if remote is not None:
        from spottune.data.versioning import version_data

        version_data(args.out, remote, push=True if args.push else None)
    return 0


def cmd_prepare(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    params = _params(args)
    output_file(params.prepare.manifest, "prepare.manifest")
    from spottune.data.manifest import build_manifest, split_counts, write_manifest
    rows = build_manifest(params.data.root, params.prepare)
    write_manifest(rows, params.prepare.manifest)
    counts = {s: sum(c.values()) for s, c in split_counts(rows).items()}
    print(f"{params.prepare.manifest}: {len(rows)} images ({', '.join(f'{n} {s}' for s, n in counts.items())}) "
          f"from {params.data.root}")
    return 0


def cmd_validate(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    params = _params(args)
    output_dir(args.out_dir, "--out-dir")
    output_file(args.metrics, "--metrics")
    from spottune.data.validation import (
        expected_classes,
        find_gx_root,
        gx_workspace,
        validate_manifest,
        write_reports,
    )
    from spottune.errors import DataError

    classes = expected_classes(params.validate_, params.data.root)
    gx_root = args.gx_root if args.gx_root is not None else find_gx_root(Path.cwd())
    with gx_workspace(args.out_dir) as work:
        report = validate_manifest(params.prepare.manifest, params.data.root, params.validate_, classes,
                                   gx_root=gx_root, work=work)
        paths = write_reports(report, args.out_dir, params.prepare.manifest)
    if args.metrics is not None:
        from spottune.atomic import atomic_write

        summary = paths["summary"].read_bytes()
        atomic_write(args.metrics, lambda tmp: tmp.write_bytes(summary))
    if not report.success:
        raise DataError(f"{report.summary()}\n  report: {paths['html']}; GX Data Docs: {paths['data_docs'] / 'index.html'}")
    print(f"{report.summary()} -> {paths['html']}, {paths['data_docs'] / 'index.html'}")
    return 0


def cmd_remote(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.data.versioning import configure_remote, repo_root
    from spottune.settings import RemoteSettings

    remote = RemoteSettings.resolve(_params(args).remote)
    if not configure_remote(remote, repo_root(Path.cwd())):
        print("no remote: set remote.url in params.yaml or SPOTTUNE_REMOTE_URL (s3://BUCKET/PREFIX)")
        return 0
    print(f"DVC remote {remote.name!r} -> {remote.url}" + (f" at {remote.endpoint_url}" if remote.endpoint_url else "")
          + " (credentials: boto3's standard chain)")
    return 0


def cmd_train(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    params = _params(args)
    output_dir(args.out, "--out")
    output_file(args.metrics, "--metrics")
    output_file(args.plots, "--plots")
    output_dir(args.live, "--live")
    from spottune.training import fit

    metrics = fit(params, args.out, runtime, resume=args.resume, overwrite=args.overwrite,
                  resume_unfinished=args.resume_unfinished, stop_after_epochs=args.stop_after_epochs,
                  live_dir=args.live)
    if metrics is not None and (args.metrics or args.plots):
        from spottune.training import learning_curve, training_metrics

        _write_json(args.metrics, training_metrics(metrics))
        _write_json(args.plots, learning_curve(metrics))
    return 0


def cmd_export_backbone(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.training import export_backbone

    output_file(args.out, "--out")
    info = export_backbone(args.run, args.out)
    print(f"{info['path']}: {info['backbone']} weights ({info['tensors']} tensors) from {args.run}; "
          f"use it with --set model.weights={info['path']}")
    return 0


def cmd_evaluate(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.compare import evaluate_run

    output_file(args.out, "--out")
    result = evaluate_run(args.run, runtime, data_root=args.data_root, split=args.split)
    text = json.dumps(result["metrics"], indent=2)
    if args.out:
        from spottune.atomic import write_json

        write_json(args.out, result["metrics"])
    print(text)
    return 0


def cmd_compare(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.atomic import atomic_write, write_json
    from spottune.compare import compare_runs, comparison_markdown

    for option, path in (("--report", args.report), ("--json", args.json), ("--metrics", args.metrics)):
        output_file(path, option)
    output_dir(args.plots_dir, "--plots-dir")
    comparison = compare_runs(args.baseline, args.candidate, runtime, data_root=args.data_root)
    report = comparison_markdown(comparison)
    if args.report:
        atomic_write(args.report, lambda tmp: tmp.write_text(report))
    if args.json:
        write_json(args.json, comparison)
    if args.metrics or args.plots_dir:
        from spottune.compare import comparison_metrics, per_class_rows, routing_rows

        _write_json(args.metrics, comparison_metrics(comparison))
        if args.plots_dir:
            _write_json(args.plots_dir / "per_class.json", per_class_rows(comparison))
            _write_json(args.plots_dir / "routing.json", routing_rows(comparison))
    print(report)
    return 0


def cmd_predict(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    import csv

    from spottune.errors import ConfigError

    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        from spottune.errors import DataError

        raise DataError(f"{', '.join(missing)} does not exist")
    from spottune.inference import Predictor, image_paths

    if args.run is not None:
        folder = args.run
    else:
        from spottune.store_cli import fetch_model

        folder = fetch_model(args.model, args.cache_dir)[0]
    predictor = Predictor.from_folder(folder, runtime.device)
    rows = predictor.predict_paths(image_paths(args.paths), top_k=args.top_k, batch_size=args.batch_size)
    collected: list[dict] = []
    count = [0]

    def consume(csv_file=None) -> None:
        writer = csv.writer(csv_file) if csv_file is not None else None
        if writer is not None:
            writer.writerow(["path", "label", "probability"])
        for row in rows:
            count[0] += 1
            if writer is not None:
                writer.writerow([row["path"], row["label"], row["probability"]])
            if args.json:
                collected.append(row)
            elif writer is None:
                best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in row["top"])
                print(f"{row['path']}: {best}")

    if args.csv is not None:
        from spottune.atomic import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                consume(f)

        atomic_write(args.csv, write)
        if not args.json:
            print(f"{args.csv}: {count[0]} images")
    else:
        consume()
    if args.json:
        print(json.dumps(collected, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.errors import ConfigError

    for flag, value, ok in (("--poll-s", args.poll_s, args.poll_s > 0),
                            ("--max-upload-mb", args.max_upload_mb, args.max_upload_mb > 0),
                            ("--max-pixels", args.max_pixels, args.max_pixels is None or args.max_pixels > 0),
                            ("--port", args.port, 0 < args.port < 65536)):
        if not ok:
            raise ConfigError(f"{flag} must be {'within 1..65535' if flag == '--port' else 'positive'} (got {value})")
    from spottune.serve import serve

    return serve(args, runtime)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spottune", description="SpotTune adaptive fine-tuning and its baselines.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, summary: str, *, params: bool = False) -> argparse.ArgumentParser:
        """A subcommand running func(args, runtime); params=True: it reads params.yaml (--params, --set)."""
        p = sub.add_parser(name, help=summary)
        if params:
            p.add_argument("--params", type=Path, default=None, help="params file (default: ./params.yaml if present)")
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. optim.epochs=2")
        p.set_defaults(func=func)
        return p

    p = command("data", cmd_data, "materialise a real dataset as an ImageFolder tree (and version it with DVC)", params=True)
    p.add_argument("source", help="fashion-mnist | digits | mnist | torchvision:NAME | PATH (ImageFolder) | decathlon:ROOT/TASK")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-existing", action="store_true", help="leave OUT as it is when it already holds a dataset")
    p.add_argument("--track", action="store_true",
                   help="version the top folder of OUT with DVC (dvc add data -> data.dvc); push when a remote is set")
    p.add_argument("--push", action="store_true", help="like --track, and fail when no remote is configured")

    p = command("prepare", cmd_prepare, "write the manifest (path, label, split, size, sha256) of data.root to prepare.manifest", params=True)

    p = command("validate", cmd_validate, "check the manifest and the images against the data contract", params=True)
    p.add_argument("--out-dir", type=Path, default=Path("reports/validation"), help="result.json, summary.json, report.html, data_docs/")
    p.add_argument("--gx-root", type=Path, default=None,
                   help="the folder holding the Great Expectations project gx/ (its suites and checkpoints); default: "
                        "the current folder or its nearest parent holding gx/, else the source checkout")
    p.add_argument("--metrics", type=Path, default=None, help="also write the summary here (for dvc metrics)")

    p = command("remote", cmd_remote, "make params.yaml's remote (env SPOTTUNE_REMOTE_* wins) DVC's default remote", params=True)

    p = command("train", cmd_train, "train one method and write a run directory", params=True)
    p.add_argument("--method", help=f"one of: {', '.join(METHODS)} (overrides model.method)")
    p.add_argument("--backbone", help=f"one of: {', '.join(BACKBONES)} (overrides model.backbone)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--resume-unfinished", action="store_true",
                   help="continue OUT's unfinished run (a checkpoint, no model yet) when its params and data match; else "
                        "start over, replacing what OUT holds (what a retried pipeline stage wants)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="end this invocation after N epochs")
    p.add_argument("--metrics", type=Path, default=None, help="write the run's summary metrics here (dvc metrics)")
    p.add_argument("--plots", type=Path, default=None, help="write the per-epoch learning curve here (dvc plots)")
    p.add_argument("--live", type=Path, default=None, help="after every epoch, per-epoch metrics and learning rates in "
                   "DVCLive's layout here (LIVE/metrics.json, LIVE/plots/metrics/): dvc exp show follows the run")

    p = command("export-backbone", cmd_export_backbone, "a baseline run's trained backbone as a weights file for model.weights")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")

    p = command("evaluate", cmd_evaluate, "metrics of a finished run on its test (or val) split")
    p.add_argument("run", type=Path)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--data-root", type=Path, default=None, help="evaluate on another ImageFolder root")
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON")

    p = command("compare", cmd_compare, "a candidate run against a baseline run on the same test images")
    p.add_argument("baseline", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--json", type=Path, default=None, help="write the comparison as JSON here")
    p.add_argument("--metrics", type=Path, default=None, help="write summary metrics here (dvc metrics)")
    p.add_argument("--plots-dir", type=Path, default=None, help="write per_class.json and routing.json here (dvc plots)")

    p = command("predict", cmd_predict, "classify images with a finished run or a model from the artifact store")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files, or folders (searched recursively)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", type=Path, help="a finished run directory")
    which.add_argument("--model", metavar="NAME@REF", help="NAME@production, NAME@latest or NAME@VERSION from the "
                       "artifact store (SPOTTUNE_STORE_*), fetched once into the model cache")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="model cache (default: SPOTTUNE_MODEL_CACHE_DIR, else ~/.cache/spottune/models)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="images decoded and predicted at once")
    p.add_argument("--json", action="store_true", help="print a JSON list of {path, label, probability, top}")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE", help="write path,label,probability (atomically)")

    p = command("serve", cmd_serve, "an HTTP API (FastAPI) that classifies uploads with a model from the store")
    p.add_argument("--model", required=True, metavar="NAME@REF", help="NAME@production (followed as it is "
                   "promoted), NAME@latest or NAME@VERSION")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (as for predict)")
    p.add_argument("--poll-s", type=float, default=30.0,
                   help="check the production pointer (or latest) at most this often, in seconds")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads are refused (413)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="larger images are refused from their header (default: Pillow's MAX_IMAGE_PIXELS)")
    from spottune import (  # gate; publish, promote, rollback, models list (boto3 only for S3)
        gate,
        store_cli,
    )

    gate.register(sub)
    store_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code says what kind of failure it met (spottune/errors.py, README).

    argparse exits 2 on a command line that does not parse; bad input exits 3, a failing external
    service (store, S3, DVC) 4, an unexpected error 1 with its traceback.
    """
    from spottune.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED

    args = build_parser().parse_args(argv)
    try:
        return args.func(args, _runtime_settings())
    except SpotTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except FloatingPointError as e:  # training diverged: the params (learning rates) must change
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        if e.filename is None:  # not about a path the user named: a bug or the machine, keep the traceback
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

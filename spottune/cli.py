"""`spottune <command>`: parse and validate settings, call the library, write outputs.

    spottune data fashion-mnist --out data/fashion-mnist --train-per-class 100 [--track]
    spottune prepare                       (data.root -> prepare.manifest, seeded stratified splits)
    spottune validate --out-dir reports/validation   (non-zero exit on bad data)
    spottune remote                        (DVC remote from `remote` + SPOTTUNE_REMOTE_*)
    spottune train --method spottune --out runs/spottune [--params params.yaml] [--set optim.epochs=5]
    spottune evaluate runs/spottune
    spottune export-backbone runs/finetune --out weights/source.safetensors   (pretrain inside the pipeline)
    spottune compare runs/finetune runs/spottune --report runs/comparison.md
    spottune predict --run runs/spottune IMAGE...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spottune.config import BACKBONES, METHODS, RuntimeSettings, load_params
from spottune.errors import SpotTuneError
from spottune.outputs import output_dir, output_file


def _params(args: argparse.Namespace):
    overrides = list(args.set or [])
    if getattr(args, "method", None):
        overrides.append(f"model.method={args.method}")
    if getattr(args, "backbone", None):
        overrides.append(f"model.backbone={args.backbone}")
    path = args.params if args.params is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
    return load_params(path, overrides)


def _write_json(path: Path | None, obj) -> None:
    if path is not None:
        from spottune.training import write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, obj)


def cmd_data(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.data.sources import DATASET_CARD, materialise

    output_dir(args.out, "--out")
    remote = None
    if args.track or args.push:  # validate the remote settings before any work
        from spottune.config import RemoteSettings

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
    from spottune.data.validation import expected_classes, validate_manifest, write_reports
    from spottune.errors import DataError

    classes = expected_classes(params.validate_, params.data.root)
    report = validate_manifest(params.prepare.manifest, params.data.root, params.validate_, classes)
    paths = write_reports(report, args.out_dir, params.prepare.manifest)
    if args.metrics is not None:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_bytes(paths["summary"].read_bytes())
    if not report.success:
        raise DataError(f"{report.summary()}\n  report: {paths['html']}")
    print(f"{report.summary()} -> {paths['html']}")
    return 0


def cmd_remote(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.config import RemoteSettings
    from spottune.data.versioning import configure_remote, repo_root

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
    from spottune.errors import CheckpointError
    from spottune.training import fit

    resume, overwrite = args.resume, args.overwrite
    if args.resume_unfinished:
        from spottune.training import RunDir

        run = RunDir(args.out)
        resume = run.checkpoint.is_file() and not run.weights.is_file()
        overwrite = not resume
    try:
        metrics = fit(params, args.out, runtime, resume=resume, overwrite=overwrite,
                      stop_after_epochs=args.stop_after_epochs)
    except CheckpointError as e:
        if not (args.resume_unfinished and resume):
            raise
        print(f"cannot resume ({e}): starting over", file=sys.stderr)
        metrics = fit(params, args.out, runtime, overwrite=True, stop_after_epochs=args.stop_after_epochs)
    if metrics is not None and (args.metrics or args.plots):
        from spottune.evaluate import learning_curve, training_metrics

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
    from spottune.evaluate import evaluate_run

    output_file(args.out, "--out")
    result = evaluate_run(args.run, runtime, data_root=args.data_root, split=args.split)
    text = json.dumps(result["metrics"], indent=2)
    if args.out:
        from spottune.training import write_json

        write_json(args.out, result["metrics"])
    print(text)
    return 0


def cmd_compare(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    from spottune.engine import atomic_write
    from spottune.evaluate import compare_runs, comparison_markdown
    from spottune.training import write_json

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
        from spottune.evaluate import comparison_metrics, per_class_rows, routing_rows

        _write_json(args.metrics, comparison_metrics(comparison))
        if args.plots_dir:
            _write_json(args.plots_dir / "per_class.json", per_class_rows(comparison))
            _write_json(args.plots_dir / "routing.json", routing_rows(comparison))
    print(report)
    return 0


def cmd_predict(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    import torch

    from spottune.data.loaders import build_transform, load_rgb
    from spottune.engine import DeviceSetup
    from spottune.models.backbones import input_normalization
    from spottune.training import load_model

    model, params, classes = load_model(args.run)
    setup = DeviceSetup.resolve(runtime.device, params.optim.amp, params.optim.channels_last,
                                input_normalization(params.model.backbone))
    model = model.to(setup.device)
    tf = build_transform(params.data.image_size, train=False, augment=False)
    batch = torch.stack([tf(load_rgb(str(p))) for p in args.images])
    with torch.inference_mode(), setup.autocast():
        out = model(setup.images(batch))
    probs = out.logits.float().softmax(1).cpu()
    k = min(args.top_k, len(classes))
    rows = []
    for i, path in enumerate(args.images):
        top = probs[i].topk(k)
        row = {"image": str(path), "top": [{"class": classes[j], "probability": round(float(p), 4)}
                                           for p, j in zip(top.values, top.indices)]}
        if out.decisions is not None:
            row["tuned_blocks"] = [int(b) for b in out.decisions[i].nonzero().flatten().tolist()]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
            print(f"{row['image']}: {best}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spottune", description="SpotTune adaptive fine-tuning and its baselines.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_params(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", type=Path, default=None, help="params file (default: ./params.yaml if present)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter, e.g. optim.epochs=2")

    p = sub.add_parser("data", help="materialise a real dataset as an ImageFolder tree (and version it with DVC)")
    p.add_argument("source", help="fashion-mnist | digits | torchvision:NAME | PATH (ImageFolder) | decathlon:ROOT/TASK")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--test-per-class", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-existing", action="store_true", help="leave OUT as it is when it already holds a dataset")
    p.add_argument("--track", action="store_true",
                   help="version the top folder of OUT with DVC (dvc add data -> data.dvc); push when a remote is set")
    p.add_argument("--push", action="store_true", help="like --track, and fail when no remote is configured")
    with_params(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("prepare", help="write the manifest (path, label, split, size, sha256) of data.root to prepare.manifest")
    with_params(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("validate", help="check the manifest and the images against the data contract")
    with_params(p)
    p.add_argument("--out-dir", type=Path, default=Path("reports/validation"), help="result.json, report.html, gx.html")
    p.add_argument("--metrics", type=Path, default=None, help="also write the summary here (for dvc metrics)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("remote", help="make params.yaml's remote (env SPOTTUNE_REMOTE_* wins) DVC's default remote")
    with_params(p)
    p.set_defaults(func=cmd_remote)

    p = sub.add_parser("train", help="train one method and write a run directory")
    with_params(p)
    p.add_argument("--method", help=f"one of: {', '.join(METHODS)} (overrides model.method)")
    p.add_argument("--backbone", help=f"one of: {', '.join(BACKBONES)} (overrides model.backbone)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--resume-unfinished", action="store_true",
                   help="continue OUT's unfinished run (a checkpoint, no model yet) when its params match; else "
                        "start over, replacing what OUT holds (what a retried pipeline stage wants)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    p.add_argument("--stop-after-epochs", type=int, default=None, help="end this invocation after N epochs")
    p.add_argument("--metrics", type=Path, default=None, help="write the run's summary metrics here (dvc metrics)")
    p.add_argument("--plots", type=Path, default=None, help="write the per-epoch learning curve here (dvc plots)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export-backbone", help="a baseline run's trained backbone as a weights file for model.weights")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.set_defaults(func=cmd_export_backbone)

    p = sub.add_parser("evaluate", help="metrics of a finished run on its test (or val) split")
    p.add_argument("run", type=Path)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--data-root", type=Path, default=None, help="evaluate on another ImageFolder root")
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="a candidate run against a baseline run on the same test images")
    p.add_argument("baseline", type=Path)
    p.add_argument("candidate", type=Path)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--json", type=Path, default=None, help="write the comparison as JSON here")
    p.add_argument("--metrics", type=Path, default=None, help="write summary metrics here (dvc metrics)")
    p.add_argument("--plots-dir", type=Path, default=None, help="write per_class.json and routing.json here (dvc plots)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="classify image files with a finished run")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)
    from spottune import store_cli  # publish, promote, rollback, models list (boto3 only when S3 is used)

    store_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runtime = RuntimeSettings()
        return args.func(args, runtime)
    except SpotTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.filename is None:  # not about a path the user named: a bug or the machine, keep the traceback
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The data contract: the project's Great Expectations checkpoints over the manifest, plus the image checks GX cannot do.

The contract lives in the GX project `gx/` (file context, committed): two expectation suites, their
validation definitions and a checkpoint per table, whose `$PARAMETER`s come from params.yaml's
validate section. The `manifest` suite checks the manifest's table: fields present, labels in the
class set, sizes and modes in range, row counts, sha256 unique over all splits (an image in both
train and test is leakage); `class_counts` checks a derived table of images per (split, class):
per-class minimum counts and the class-imbalance bound. The checkpoints build GX's Data Docs site.
The image checks open the files themselves: links out of the tree, zero-byte files, files over the
pixel limit (never decoded: decompression bombs), and files that do not decode to the end.

`validate_manifest` returns a report; `write_reports` writes result.json, summary.json (metrics),
report.html (both parts) and data_docs/; the caller turns a failed report into a DataError whose
message names every failed check and its files. great_expectations and pandas are imported only in here.
"""
from __future__ import annotations

import html
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spottune.config import ValidateParams
from spottune.data.manifest import SPLITS, ManifestRow, read_manifest
from spottune.errors import DataError

MAX_LISTED = 20  # files named per failed check in the summary (all of them are in result.json)


@dataclass
class Failure:
    """One failed check: what was expected, and the files (or split/class cells) that broke it."""

    check: str
    detail: str
    where: list[str] = field(default_factory=list)

    def line(self) -> str:
        listed = ", ".join(self.where[:MAX_LISTED]) + (f" (+{len(self.where) - MAX_LISTED} more)" if len(self.where) > MAX_LISTED else "")
        return f"{self.check}: {self.detail}" + (f": {listed}" if listed else "")


@dataclass
class ValidationReport:
    success: bool
    failures: list[Failure]
    statistics: dict[str, Any]
    gx_results: list[dict[str, Any]]
    image_checks: dict[str, Any]
    data_docs: Path | None = None  # GX's Data Docs site as built, until write_reports moves it

    def summary(self) -> str:
        if self.success:
            return f"data validation passed: {self.statistics['expectations']} expectations, {self.statistics['rows']} images checked"
        head = (f"data validation failed: {len(self.failures)} check(s) of {self.statistics['expectations']} "
                f"expectations and {len(IMAGE_CHECKS)} image checks")
        return "\n  ".join([head, *(f.line() for f in self.failures)])


IMAGE_CHECKS = ("file_exists", "file_inside_root", "file_not_empty", "pixels_within_limit", "file_decodes")


def check_images(root: Path, rows: list[ManifestRow], max_pixels: int) -> dict[str, list[str]]:
    """{check: [failing paths]}: what only opening the file can tell. Big files are never decoded."""
    from PIL import Image

    from spottune.data.images import open_image
    from spottune.data.manifest import inside

    bad: dict[str, list[str]] = {c: [] for c in IMAGE_CHECKS}
    for r in rows:
        f = Path(root) / r.path
        if not f.is_file():
            bad["file_exists"].append(r.path)
            continue
        if not inside(root, f):  # a symlink (or a '..' path) out of the tree: never opened
            bad["file_inside_root"].append(f"{r.path} -> {f.resolve()}")
            continue
        if f.stat().st_size == 0:
            bad["file_not_empty"].append(r.path)
            continue
        if r.width is not None and r.height is not None and r.width * r.height > max_pixels:
            bad["pixels_within_limit"].append(f"{r.path} ({r.width}x{r.height})")
            continue
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels  # a header that lied about its size still cannot blow up memory
        try:
            with Image.open(f) as img:
                img.verify()  # structure and checksums
            open_image(f, r.path, max_pixels)  # every pixel, decoded as training decodes it: truncated files,
            # modes without a conversion (a float image outside 0..1) fail here
        except Exception as e:  # noqa: BLE001 - any decoder error means the file is unusable
            bad["file_decodes"].append(f"{r.path} ({type(e).__name__}: {e})")
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    return bad


GX_PARTS = ("great_expectations.yml", "expectations", "validation_definitions", "checkpoints", "plugins")
CHECKPOINTS = ("manifest", "class_counts")  # one per table: a checkpoint's batch parameters (the dataframe) are shared
DATA_DOCS = "data_docs"  # the Data Docs site, a folder in the report directory


def suite_parameters(params: ValidateParams, classes: list[str]) -> dict[str, Any]:
    """The `$PARAMETER` values the committed suites (gx/expectations/*.json) leave open: params.yaml's
    validate section and the class set, so one suite serves every dataset and every params change."""
    return {
        "classes": list(classes), "splits": list(SPLITS), "modes": list(params.modes),
        "min_rows": params.min_rows, "max_rows": params.max_rows, "min_side": params.min_side, "max_side": params.max_side,
        "min_images_per_class": params.min_images_per_class, "min_share_of_largest": 1.0 / params.max_imbalance,
    }


def find_gx_root(start: Path) -> Path:
    """The folder holding the GX project gx/: `start` or its nearest parent with gx/great_expectations.yml (as
    DVC finds dvc.yaml), else the source checkout this package was installed from; DataError when none has it."""
    start = Path(start).absolute()
    for folder in (start, *start.parents, Path(__file__).resolve().parents[2]):
        if (folder / "gx" / "great_expectations.yml").is_file():
            return folder
    raise DataError(f"no Great Expectations project (gx/great_expectations.yml) in {start} or above: run in the "
                    "project, or pass spottune validate --gx-root")


def copy_gx_project(gx_root: Path, work: Path) -> Path:
    """Copy the committed GX project (gx_root/gx: config, suites, validation definitions, checkpoints) to
    work/gx and return it. The checkpoints run there, so the committed folder is never written to and the
    Data Docs they build hold this run's results alone."""
    import shutil

    src = Path(gx_root) / "gx"
    if not (src / "great_expectations.yml").is_file():
        raise DataError(f"{src / 'great_expectations.yml'} does not exist: the Great Expectations project (gx/) "
                        "belongs in the project root (spottune validate --gx-root)")
    dst = Path(work) / "gx"
    for part in GX_PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part)
        elif (src / part).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / part, dst / part)
    return dst


def run_checkpoints(gx_root: Path, work: Path, tables: dict[str, Any], parameters: dict[str, Any]):
    """Run each checkpoint (gx/checkpoints/NAME.json) on its table through GX's public API, in a copy of
    the project under `work`. Returns [(suite result, the column that names a failing row)] and the Data
    Docs site the checkpoints' update_data_docs action built."""
    from urllib.parse import unquote, urlparse

    import great_expectations as gx

    copy_gx_project(gx_root, work)
    ctx = gx.get_context(mode="file", project_root_dir=str(work))
    results = []
    for name in CHECKPOINTS:
        checkpoint = ctx.checkpoints.get(name)
        index = (checkpoint.result_format or {}).get("unexpected_index_column_names") or [None]
        run = checkpoint.run(batch_parameters={"dataframe": tables[name]}, expectation_parameters=parameters)
        results += [(res, index[0]) for res in run.run_results.values()]
    site = Path(unquote(urlparse(ctx.get_docs_sites_urls()[0]["site_url"]).path)).parent
    return results, site


def class_count_table(rows: list[ManifestRow], classes: list[str]):
    """One row per (split, expected class), zeros included: an empty class must show up as 0."""
    import pandas as pd

    splits = ["train", "test"] + (["val"] if any(r.split == "val" for r in rows) else [])
    counts = {(s, c): 0 for s in splits for c in classes}
    for r in rows:
        if (r.split, r.label) in counts:
            counts[(r.split, r.label)] += 1
    df = pd.DataFrame([{"split": s, "label": c, "images": n} for (s, c), n in counts.items()])
    largest = df.groupby("split")["images"].transform("max").clip(lower=1)
    df["share_of_largest"] = df["images"] / largest
    df["cell"] = df["split"] + "/" + df["label"]
    return df


def _describe(cfg) -> str:
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format") and v is not None}
    if "value_set" in kwargs and len(kwargs["value_set"]) > 12:
        kwargs["value_set"] = f"<{len(kwargs['value_set'])} values>"
    return f"{cfg.type}(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")"


def _gx_failures(result, index_column: str, manifest) -> list[Failure]:
    """Readable failures, naming the files; for duplicate sha256, every file of each duplicate group with its split."""
    out = []
    for r in result.results:
        if r.success:
            continue
        cfg, res = r.expectation_config, r.result
        idx = res.get("unexpected_index_list") or []
        where = [str(row.get(index_column)) if isinstance(row, dict) else str(row) for row in idx]
        detail = f"{res.get('unexpected_count', '')} unexpected".strip() if idx else f"observed {res.get('observed_value')!r}"
        if cfg.kwargs.get("column") == "sha256" and cfg.type == "expect_column_values_to_be_unique":
            dup = manifest[manifest["sha256"].duplicated(keep=False)].sort_values(["sha256", "path"])
            where = [" == ".join(f"{p} [{s}]" for p, s in zip(g["path"], g["split"])) for _, g in dup.groupby("sha256")]
            cross = sum(g["split"].nunique() > 1 for _, g in dup.groupby("sha256"))
            detail = f"{len(where)} group(s) of identical images, {cross} across splits (train/test leakage)"
        elif cfg.kwargs.get("column") in ("label",) and idx:
            bad = sorted({str(row.get("label")) for row in idx if isinstance(row, dict)})
            detail = f"unexpected label(s) {bad} (allowed: the class set)"
        out.append(Failure(_describe(cfg), detail, where))
    return out


def validate_manifest(manifest_path: Path, root: Path, params: ValidateParams, classes: list[str],
                      gx_root: Path, work: Path) -> ValidationReport:
    """Run the project's GX checkpoints (in a copy of gx/ under `work`) and the image checks; never raises on
    bad data (the report says what failed). The Data Docs site is left under `work` for write_reports."""
    import pandas as pd

    rows = read_manifest(manifest_path)
    manifest = pd.read_csv(manifest_path, dtype={"path": str, "label": str, "split": str, "mode": str, "sha256": str},
                           keep_default_na=False, na_values={"width": [""], "height": [""], "mode": [""]})
    manifest["mode"] = manifest["mode"].where(manifest["mode"] != "", None)
    tables = {"manifest": manifest, "class_counts": class_count_table(rows, classes)}
    results, site = run_checkpoints(gx_root, work, tables, suite_parameters(params, classes))
    failures = [f for res, col in results for f in _gx_failures(res, col, manifest)]
    bad_images = check_images(root, rows, params.max_pixels)
    failures += [Failure(f"image check {check}", f"{len(paths)} file(s)", paths) for check, paths in bad_images.items() if paths]
    stats = {
        "rows": len(rows),
        "classes": len(classes),
        "expectations": sum(res.statistics["evaluated_expectations"] for res, _ in results),
        "failed_expectations": sum(res.statistics["unsuccessful_expectations"] for res, _ in results),
        "failed_image_files": sum(len(v) for v in bad_images.values()),
        "images": {s: sum(r.split == s for r in rows) for s in SPLITS},
    }
    return ValidationReport(
        success=not failures, failures=failures, statistics=stats,
        gx_results=[res.to_json_dict() for res, _ in results], image_checks=bad_images, data_docs=site,
    )


@contextmanager
def gx_workspace(out_dir: Path) -> Iterator[Path]:
    """A scratch folder beside the report directory (same filesystem: the Data Docs site moves out of it by a
    rename; beside, so that input refused before any check leaves no report directory), removed afterwards
    whatever happens."""
    import shutil
    import tempfile

    parent = Path(out_dir).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{Path(out_dir).name}.gx-run-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_reports(report: ValidationReport, out_dir: Path, manifest_path: Path) -> dict[str, Path]:
    """result.json (everything), summary.json (small, for `dvc metrics`), report.html and GX's Data Docs site
    (data_docs/), each replaced whole (temporary name, then rename): a killed validate leaves no half report."""
    from spottune.atomic import atomic_write, replace_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / n for k, n in (("result", "result.json"), ("summary", "summary.json"),
                                         ("html", "report.html"), ("data_docs", DATA_DOCS))}
    result = {
        "success": report.success, "manifest": str(manifest_path), "statistics": report.statistics,
        "failures": [f.__dict__ for f in report.failures], "image_checks": report.image_checks,
        "great_expectations": report.gx_results,
    }
    summary = {"success": int(report.success), **{k: v for k, v in report.statistics.items() if k != "images"},
               **{f"images_{s}": n for s, n in report.statistics["images"].items()}}
    texts = {"result": json.dumps(result, indent=2, default=str) + "\n", "summary": json.dumps(summary, indent=2) + "\n",
             "html": report_html(report, manifest_path)}
    if report.data_docs is not None:
        replace_dir(report.data_docs, paths["data_docs"])
    for key, text in texts.items():
        atomic_write(paths[key], lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    return paths


def report_html(report: ValidationReport, manifest_path: Path) -> str:
    """A self-contained page (no scripts, no network) a person can open in any browser."""
    e = html.escape
    status = "PASSED" if report.success else "FAILED"
    color = "#1a7f37" if report.success else "#cf222e"
    rows = []
    for res in report.gx_results:
        for r in res["results"]:
            cfg = r["expectation_config"]
            kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
            ok = r["success"]
            rows.append(f"<tr><td>{e(res['suite_name'])}</td><td>{e(cfg['type'])}</td><td><code>{e(json.dumps(kwargs, default=str)[:300])}</code></td>"
                        f"<td style='color:{'#1a7f37' if ok else '#cf222e'}'>{'pass' if ok else 'FAIL'}</td></tr>")
    for check, paths in report.image_checks.items():
        rows.append(f"<tr><td>images</td><td>{e(check)}</td><td></td><td style='color:{'#1a7f37' if not paths else '#cf222e'}'>"
                    f"{'pass' if not paths else 'FAIL'}</td></tr>")
    fails = "".join(f"<li><b>{e(f.check)}</b>: {e(f.detail)}<ul>{''.join(f'<li><code>{e(w)}</code></li>' for w in f.where[:200])}</ul></li>"
                    for f in report.failures)
    stats = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in report.statistics.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Data validation: {status}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}}code{{font-size:90%}}</style></head>
<body><h1>Data validation: <span style="color:{color}">{status}</span></h1>
<p>Manifest <code>{e(str(manifest_path))}</code>. Details in <code>result.json</code>; Great Expectations' Data Docs: <a href="{DATA_DOCS}/index.html">{DATA_DOCS}/index.html</a>.</p>
<table>{stats}</table>
{'<h2>Failures</h2><ul>' + fails + '</ul>' if fails else ''}
<h2>Checks</h2><table><tr><th>suite</th><th>check</th><th>arguments</th><th>result</th></tr>{''.join(rows)}</table>
</body></html>
"""


def expected_classes(params: ValidateParams, root: Path) -> list[str]:
    """The class set: validate.classes if given, else the dataset card's; refuse to guess from the folders."""
    from spottune.data.sources import read_card_classes

    if params.classes is not None:
        return sorted(params.classes)
    card = read_card_classes(root)
    if card is None:
        raise DataError(f"validate.classes is not set and {root}/dataset.json does not exist: "
                        "list the allowed labels in params.yaml (validate.classes)")
    return sorted(card)

"""The promotion gate: the `gate` DVC stage (`spottune gate`), which writes metrics/gate.json.

It reads the compare stage's comparison (SpotTune against fine-tuning on the same test images, with
the paired bootstrap confidence interval of the difference in top-1), params.yaml's `gate` section,
and the artifact store's production version of `publish.model_name` (the champion). All must hold to
promote:

- baseline: `superiority`: the CI's low end > 0; `non_inferiority`: > -margin (at the bound: refused);
- floor: SpotTune's test top-1 >= `gate.floor`;
- champion: where a production version with the same classes exists, SpotTune is not significantly
  worse than it on the same test images (the CI of SpotTune minus champion has its high end >= 0).

The record is a function of those inputs only (no clock, no run id), so `dvc repro` gives the same
decision from the same inputs; it names the champion version it used. Where the store is a local
folder that does not exist, or has no production version, or one with other classes, the record
says so and the decision rests on the baseline comparison. A store that cannot be read (S3 down,
refused credentials) fails the stage rather than silently skipping the champion.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from spottune.config import GateParams, Params
from spottune.errors import ConfigError, DataError
from spottune.settings import RuntimeSettings, StoreSettings
from spottune.store.values import GATE_RECORD_FORMAT

DEFAULT_COMPARISON = Path("reports/comparison.json")
DEFAULT_OUT = Path("metrics/gate.json")


def refuse_gate_overrides(keys: Iterable[str], where: str) -> None:
    """ConfigError when any KEY is the gate section or one of its keys: the gate is what params.yaml says.

    Why: a run that may loosen its own gate (gate.floor=0, a wide margin) can promote anything; a
    different gate is a change to params.yaml, committed and reviewed like any other."""
    found = sorted(k for k in keys if k == "gate" or k.startswith("gate."))
    if found:
        raise ConfigError(f"{where}: {', '.join(found)} refused: the promotion gate is params.yaml's `gate` "
                          "section as committed and cannot be overridden per run; change params.yaml instead")


# ---------------------------------------------------------------------------------------------
# The decision: pure functions of the comparison, the gate params and the champion's statistics


def baseline_check(comparison: dict[str, Any], gate: GateParams) -> dict[str, Any]:
    """The rule on the paired CI of candidate minus baseline: superiority (low > 0) or non-inferiority (low > -margin)."""
    base, cand, boot = comparison["baseline"], comparison["candidate"], comparison["bootstrap"]
    low, high = float(boot["ci_low"]), float(boot["ci_high"])
    bound = 0.0 if gate.rule == "superiority" else -gate.margin
    passed = low > bound
    level = float(boot.get("level", 0.95))
    reason = (f"{cand['method']} - {base['method']} top-1 {float(boot['difference']):+.4f}, {level:.0%} CI "
              f"[{low:+.4f}, {high:+.4f}]: low end {'>' if passed else '<='} {bound:+.4f} ({gate.rule.replace('_', '-')}"
              + (f", margin {gate.margin:.4f})" if gate.rule == "non_inferiority" else ")"))
    return {"passed": passed, "bound": bound, "difference": float(boot["difference"]), "ci_low": low,
            "ci_high": high, "level": level, "mcnemar_p": float(comparison["mcnemar"]["p_value"]),
            "test_images": int(base["images"]), "reason": reason}


def floor_check(comparison: dict[str, Any], gate: GateParams) -> dict[str, Any]:
    cand = comparison["candidate"]
    accuracy = float(cand["accuracy"])
    passed = accuracy >= gate.floor
    return {"passed": passed, "reason": f"{cand['method']} top-1 {accuracy:.4f} {'>=' if passed else '<'} "
                                        f"floor {gate.floor:.4f}"}


def champion_statistics(candidate_correct: Any, champion_correct: Any, method: str, version: str) -> dict[str, Any]:
    """Paired statistics of candidate minus champion on the same images; refused when the CI is wholly below 0."""
    from spottune.stats import bootstrap_difference, mcnemar_exact

    boot = bootstrap_difference(champion_correct, candidate_correct)
    passed = not boot["ci_high"] < 0
    reason = (f"{method} - production {version} top-1 {boot['difference']:+.4f}, {boot['level']:.0%} CI "
              f"[{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]: "
              + ("not significantly worse" if passed else "significantly worse than production"))
    return {"status": "compared", "passed": passed, "difference": boot["difference"], "ci_low": boot["ci_low"],
            "ci_high": boot["ci_high"], "level": boot["level"],
            "mcnemar_p": mcnemar_exact(champion_correct, candidate_correct)["p_value"], "reason": reason}


def decide(comparison: dict[str, Any], gate: GateParams, champion: dict[str, Any],
           weights_sha256: str | None = None) -> dict[str, Any]:
    """The gate record: decision (promote | refuse), reason, the rule and every statistic it used.

    champion: champion_statistics' result plus the version it names, or {"status": ..., "reason": ...}
    when none was compared (then it neither passes nor fails anything)."""
    base, cand = comparison["baseline"], comparison["candidate"]
    checks = {"baseline": baseline_check(comparison, gate), "floor": floor_check(comparison, gate)}
    if champion.get("status") == "compared":
        checks["champion"] = champion
    failed = [c["reason"] for c in checks.values() if not c["passed"]]
    promote = not failed
    reason = "; ".join(failed) if failed else "; ".join(c["reason"] for c in checks.values())
    if champion.get("status") != "compared":
        reason += f"; no champion: {champion.get('reason', 'none')}"
    return {
        "format": GATE_RECORD_FORMAT, "decision": "promote" if promote else "refuse", "passed": promote,
        "reason": reason, "rule": gate.rule, "margin": gate.margin, "floor": gate.floor,
        "baseline": {"method": base["method"], "accuracy": float(base["accuracy"])},
        "candidate": {"method": cand["method"], "accuracy": float(cand["accuracy"]), "weights_sha256": weights_sha256},
        "vs_baseline": checks["baseline"], "floor_check": checks["floor"], "champion": champion,
    }


# ---------------------------------------------------------------------------------------------
# The champion: the production version in the store, on the candidate's test images


def run_data(run_dir: Path) -> Any:
    """The data section (root, manifest) a finished run was trained and tested on, from its model.json."""
    from spottune.config import validate_params
    from spottune.training import read_model_card

    raw = read_model_card(Path(run_dir) / "model.json")["params"]
    raw["model"] = {**raw.get("model", {}), "weights": "none"}  # the weights file need not exist any more
    return validate_params(raw, str(Path(run_dir) / "model.json")).data


def open_existing_store(settings: StoreSettings) -> Any:
    """The store, or None when it is a local folder that does not exist (it is not created here)."""
    from spottune.store import open_store

    if settings.store_backend == "local" and not Path(settings.store_root).is_dir():
        return None
    return open_store(settings, check=settings.store_backend != "local")


def production_weights(store: Any, name: str, version: str) -> str:
    from spottune.store import WEIGHTS

    return store.read_manifest(name, version)[0]["files"][WEIGHTS]["sha256"]


def find_champion(settings: StoreSettings, name: str, classes: list[str], weights_sha256: str,
                  log: Callable[[str], None]) -> tuple[Path | None, dict[str, Any]]:
    """The production version's verified files (fetched into the model cache) and what it is, or (None, why not).

    Production holding the candidate's own weights is no champion: comparing a model with itself adds nothing."""
    from spottune.model_cache import fetch_cached, resolve
    from spottune.training import read_model_card

    store = open_existing_store(settings)
    if store is None:
        return None, {"status": "no_store", "reason": f"no artifact store at {settings.store_root}"}
    if store.production(name) is None:
        return None, {"status": "no_production", "model": name,
                      "reason": f"{name} has no production version in {store.backend.url(store.model_key(name))}"}
    resolved = resolve(store, name, "production")
    about = {"model": name, "version": resolved.version, "manifest_sha256": resolved.manifest_sha256}
    if production_weights(store, name, resolved.version) == weights_sha256:
        return None, {**about, "status": "same_weights",
                      "reason": f"production {resolved.version} holds these very weights"}
    folder = fetch_cached(store, resolved, settings.model_cache_dir, log=log)
    theirs = read_model_card(folder / "model.json")["classes"]
    if theirs != classes:
        return None, {**about, "status": "classes_differ",
                      "reason": f"production {resolved.version} has other classes ({len(theirs)}: {', '.join(theirs[:5])}"
                                f"{', ...' if len(theirs) > 5 else ''}): not comparable"}
    return folder, about


def compare_with_champion(candidate_run: Path, folder: Path, about: dict[str, Any], runtime: RuntimeSettings) -> dict[str, Any]:
    """The candidate and the champion on the candidate's own test images (each with its own preprocessing)."""
    import torch

    from spottune.compare import evaluate_run

    cand = evaluate_run(candidate_run, runtime)
    champ = evaluate_run(folder, runtime, images_of=run_data(candidate_run))
    if not torch.equal(cand["predictions"]["labels"], champ["predictions"]["labels"]):
        raise DataError(f"production {about['version']} was not evaluated on {candidate_run}'s test images")
    correct = [r["predictions"]["predictions"] == r["predictions"]["labels"] for r in (cand, champ)]
    stats = champion_statistics(correct[0], correct[1], cand["method"], about["version"])
    return {**about, "method": champ["method"], "accuracy": champ["metrics"]["accuracy"],
            "candidate_accuracy": cand["metrics"]["accuracy"], **stats}


def run_gate(params: Params, comparison: dict[str, Any], runtime: RuntimeSettings, settings: StoreSettings,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """The gate record for the comparison's candidate run, against params' gate and the store's champion."""
    from spottune.store import sha256_file

    try:
        candidate_run = Path(comparison["candidate"]["run"])
        classes = list(comparison["classes"])
    except (KeyError, TypeError) as e:
        raise DataError(f"the comparison holds no candidate run or classes ({e})") from None
    weights = sha256_file(candidate_run / "model.safetensors")
    folder, champion = find_champion(settings, params.publish.model_name, classes, weights, log)
    if folder is not None:
        champion = compare_with_champion(candidate_run, folder, champion, runtime)
    return decide(comparison, params.gate, champion, weights)


def record_is_current(record: dict[str, Any], settings: StoreSettings, name: str) -> bool:
    """Whether a gate record still describes the store's production version, which DVC cannot see.

    Current when it compared with (or noted) the version that is production now, when it found no
    production and there is none, or when production now holds the candidate's own weights (promoted on
    this record). A rerun would then give the same record, and republishing the same version stays a no-op.
    """
    champion = record.get("champion") or {}
    store = open_existing_store(settings)
    pointer = store.production(name) if store is not None else None
    if pointer is None:
        return champion.get("status") in ("no_store", "no_production")
    if champion.get("version") == pointer["version"]:
        return True
    return production_weights(store, name, pointer["version"]) == (record.get("candidate") or {}).get("weights_sha256")


# ---------------------------------------------------------------------------------------------
# Command line: `spottune gate` (the DVC stage's command)


def read_comparison(path: Path) -> dict[str, Any]:
    try:
        comparison = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: run the compare stage first (`dvc repro compare`)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable comparison: {e}") from None
    missing = [k for k in ("baseline", "candidate", "bootstrap", "mcnemar", "classes") if k not in comparison]
    if missing:
        raise DataError(f"{path}: not a comparison of `spottune compare` (no {', '.join(missing)})")
    return comparison


def read_record(path: Path) -> dict[str, Any]:
    """A gate record as the stage wrote it; DataError naming the file when it is missing or not JSON."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable gate record ({e}): run the gate stage (`dvc repro gate`)") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} is not a gate record (a JSON {type(record).__name__})")
    return record


def cmd_gate(args: argparse.Namespace, runtime: RuntimeSettings) -> int:
    """Decide, write the record atomically, print the decision; a refusal is a result (exit 0), not an error."""
    from spottune.atomic import write_json
    from spottune.config import load_params
    from spottune.outputs import output_file
    from spottune.store_cli import store_settings

    refuse_gate_overrides([pair.partition("=")[0].strip() for pair in args.set or []], "spottune gate --set")
    default = Path("params.yaml")
    params = load_params(args.params if args.params is not None else (default if default.is_file() else None), args.set)
    output_file(args.out, "--out")
    comparison = read_comparison(args.comparison)
    record = run_gate(params, comparison, runtime, store_settings())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    print(f"gate: {record['decision']}: {record['reason']} -> {args.out}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("gate", help="the promotion gate on the compare stage's comparison -> metrics/gate.json")
    p.add_argument("--params", type=Path, default=None, help="params file (default: ./params.yaml if present)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a parameter other than gate.* (gate.* is refused: the gate is params.yaml's)")
    p.add_argument("--comparison", type=Path, default=DEFAULT_COMPARISON, help="`spottune compare --json` output")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the gate record goes (dvc metrics)")
    p.set_defaults(func=cmd_gate)

"""The promotion gate (spottune/gate.py, the `gate` DVC stage) and what promotion requires of it.

The rules are pure functions, tested on comparisons with chosen statistics. The champion tests use
real finished runs (the session's tiny linear probe on real Fashion-MNIST images, and copies of it
whose head is biased towards one class) and a real local artifact store; `spottune gate`,
`publish` and `promote` run as a user runs them, as processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spottune.config import GateParams, validate_params
from spottune.errors import ConfigError, StoreError
from spottune.gate import decide, refuse_gate_overrides, run_gate
from spottune.settings import RuntimeSettings, StoreSettings
from spottune.store import Gate, PromotionRefused, gated_by_pipeline, open_store

from support import comparison_with, passed_gate, shifted_run, store_env

NAME = "fashion"
NO_CHAMPION = {"status": "no_store", "reason": "test"}


# ---------------------------------------------------------------------------------------------
# Rules on the paired CI (pure)


@pytest.mark.parametrize(("rule", "margin", "ci_low", "decision"), [
    ("superiority", 0.0, 0.004, "promote"),
    ("superiority", 0.0, 0.0, "refuse"),          # a CI touching 0 is no evidence of superiority
    ("superiority", 0.0, -0.004, "refuse"),
    ("non_inferiority", 0.01, -0.004, "promote"),  # worse by less than the margin, at 95%
    ("non_inferiority", 0.01, -0.02, "refuse"),
    ("non_inferiority", 0.0, -0.004, "refuse"),
])
def test_superiority_and_non_inferiority_decide_on_the_ci_low_end(rule, margin, ci_low, decision):
    record = decide(comparison_with(ci_low + 0.01, ci_low, ci_low + 0.02), GateParams(rule=rule, margin=margin),
                    NO_CHAMPION)
    assert record["decision"] == decision and record["passed"] is (decision == "promote")
    assert record["rule"] == rule and record["vs_baseline"]["ci_low"] == ci_low
    assert record["vs_baseline"]["bound"] == (0.0 if rule == "superiority" else -margin)
    assert rule.replace("_", "-") in record["reason"] and "no champion: test" in record["reason"]


def test_the_margin_is_a_strict_bound():
    at = comparison_with(-0.01, -0.05, 0.03)
    assert decide(at, GateParams(margin=0.05), NO_CHAMPION)["decision"] == "refuse"
    assert decide(at, GateParams(margin=0.0501), NO_CHAMPION)["decision"] == "promote"


def test_the_floor_refuses_a_weak_model_that_the_rule_passes():
    weak = comparison_with(0.05, 0.02, 0.08, accuracy=0.42)
    record = decide(weak, GateParams(rule="superiority", floor=0.5), NO_CHAMPION)
    assert record["decision"] == "refuse" and "top-1 0.4200 < floor 0.5000" in record["reason"]
    assert record["vs_baseline"]["passed"] and not record["floor_check"]["passed"]


def test_gate_overrides_are_refused_by_key():
    refuse_gate_overrides(["optim.epochs", "gateway.x", "publish.model_name"], "here")
    for keys in (["gate.margin"], ["optim.epochs", "gate.floor"], ["gate"]):
        with pytest.raises(ConfigError, match=r"here: .*gate.* refused: the promotion gate is params.yaml"):
            refuse_gate_overrides(keys, "here")


def test_a_record_round_trips_through_the_store_verdict():
    gate = passed_gate()
    assert gate.passed is True and gated_by_pipeline(gate.to_json())
    assert not gated_by_pipeline(Gate(True, "hand-made").to_json())
    assert not gated_by_pipeline({**gate.to_json(), "passed": False})  # verdict and record disagree
    with pytest.raises(StoreError, match="not a record of the gate stage"):
        Gate.from_record({"passed": True})


# ---------------------------------------------------------------------------------------------
# Champion/challenger: real runs, a real local store


@pytest.fixture
def cpu() -> RuntimeSettings:
    return RuntimeSettings(device="cpu", progress=False)


@pytest.fixture
def local(tmp_path) -> StoreSettings:
    return StoreSettings(store_backend="local", store_root=tmp_path / "artifacts", model_cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def biased(finished_run, tmp_path_factory) -> Path:
    """The finished run with its head pushed to one class: predicts it for every image (about 10% right)."""
    return shifted_run(finished_run, tmp_path_factory.mktemp("runs") / "biased", class_index=7, shift=50.0)


@pytest.fixture(scope="module")
def self_comparison():
    """A run against itself, as `spottune compare` computes it (once per run): a CI of exactly [0, 0], which
    the default non-inferiority rule passes, so only the champion can refuse."""
    from spottune.compare import compare_runs

    done: dict[Path, str] = {}

    def compare(run: Path) -> dict:
        if run not in done:
            done[run] = json.dumps(compare_runs(run, run, RuntimeSettings(device="cpu", progress=False)))
        return json.loads(done[run])

    return compare


def params_for(name: str = NAME, **gate) -> object:
    return validate_params({"gate": {"rule": "non_inferiority", "margin": 0.01, **gate},
                            "publish": {"model_name": name}}, "test")


def make_production(settings: StoreSettings, run: Path, version: str) -> None:
    store = open_store(settings)
    store.publish(run, NAME, version, gate=passed_gate())
    store.promote(NAME, version)


def test_no_store_and_no_production_decide_on_the_baseline_comparison_alone(finished_run, self_comparison, cpu,
                                                                            local):
    comparison = self_comparison(finished_run)
    record = run_gate(params_for(), comparison, cpu, local, log=lambda _: None)
    assert record["decision"] == "promote" and record["champion"]["status"] == "no_store"
    assert "no champion: no artifact store at" in record["reason"]
    assert not local.store_root.exists(), "the gate never creates a store"

    open_store(local)  # the folder exists now, with nothing promoted
    record = run_gate(params_for(), comparison, cpu, local, log=lambda _: None)
    assert record["champion"]["status"] == "no_production" and record["decision"] == "promote"
    from spottune.store import sha256_file

    assert record["candidate"]["weights_sha256"] == sha256_file(finished_run / "model.safetensors")

    make_production(local, finished_run, "v1")  # production holds the candidate's own weights: nothing to compare
    record = run_gate(params_for(), comparison, cpu, local, log=lambda _: None)
    assert record["champion"]["status"] == "same_weights" and record["champion"]["version"] == "v1"
    assert record["decision"] == "promote" and not (local.model_cache_dir / NAME).exists(), "nothing fetched"


def test_a_record_is_current_while_production_is_what_it_describes(finished_run, biased, local):
    from spottune.gate import record_is_current
    from spottune.store import sha256_file

    mine = sha256_file(finished_run / "model.safetensors")
    made_alone = decide(comparison_with(0.0, -0.001, 0.001), GateParams(), {"status": "no_store", "reason": "x"}, mine)
    assert record_is_current(made_alone, local, NAME)
    make_production(local, finished_run, "v1")  # promoted on that record: still current (a rerun is a no-op)
    assert record_is_current(made_alone, local, NAME)
    store = open_store(local)
    store.publish(biased, NAME, "v2", gate=passed_gate())
    store.promote(NAME, "v2")  # another model is production now: the record is stale
    assert not record_is_current(made_alone, local, NAME)
    compared = {**made_alone, "champion": {"status": "compared", "version": "v2"}}
    assert record_is_current(compared, local, NAME)


def test_a_candidate_significantly_worse_than_production_is_refused(finished_run, biased, self_comparison, cpu,
                                                                   local):
    make_production(local, finished_run, "v1")
    candidate = biased
    record = run_gate(params_for(), self_comparison(candidate), cpu, local, log=lambda _: None)
    champion = record["champion"]
    assert champion["status"] == "compared" and champion["version"] == "v1"
    assert champion["ci_high"] < 0 and not champion["passed"]
    assert champion["accuracy"] > champion["candidate_accuracy"]
    assert record["vs_baseline"]["passed"], "the baseline rule alone would have promoted it"
    assert record["decision"] == "refuse" and "significantly worse than production" in record["reason"]


def test_a_candidate_better_than_production_passes_and_names_the_champion(finished_run, biased, self_comparison,
                                                                          cpu, local):
    make_production(local, biased, "v0")
    record = run_gate(params_for(), self_comparison(finished_run), cpu, local, log=lambda _: None)
    champion = record["champion"]
    assert champion["status"] == "compared" and champion["version"] == "v0" and champion["passed"]
    assert champion["ci_low"] > 0 and record["decision"] == "promote"
    assert "not significantly worse" in record["reason"]


def test_a_production_model_with_other_classes_is_no_champion(finished_run, biased, self_comparison, cpu, local,
                                                             tmp_path):
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(finished_run, renamed)
    card = json.loads((renamed / "model.json").read_text())
    card["classes"] = [f"other-{c}" for c in card["classes"]]
    (renamed / "model.json").write_text(json.dumps(card))
    make_production(local, renamed, "v1")
    record = run_gate(params_for(), self_comparison(biased), cpu, local, log=lambda _: None)
    assert record["champion"]["status"] == "classes_differ" and record["champion"]["version"] == "v1"
    assert record["decision"] == "promote" and "other classes" in record["reason"]


# ---------------------------------------------------------------------------------------------
# `spottune gate`, `publish`, `promote` as processes


def spottune(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spottune.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_spottune_gate_writes_the_record_and_refuses_gate_overrides(finished_run, self_comparison, local, tmp_path):
    project = tmp_path / "project"
    (project / "reports").mkdir(parents=True)
    (project / "params.yaml").write_text(f"gate:\n  rule: superiority\npublish:\n  model_name: {NAME}\n")
    (project / "reports" / "comparison.json").write_text(json.dumps(self_comparison(finished_run)))
    env = store_env(local, SPOTTUNE_MODEL_CACHE_DIR=str(tmp_path / "cache"))

    r = spottune("gate", "--set", "gate.rule=non_inferiority", "--set", "gate.margin=1", cwd=project, env=env)
    assert r.returncode == 3 and "gate.margin, gate.rule refused" in r.stderr and "Traceback" not in r.stderr
    assert not (project / "metrics").exists()

    r = spottune("gate", cwd=project, env=env)
    assert r.returncode == 0, r.stderr  # a refusal is a result, not an error
    record = json.loads((project / "metrics" / "gate.json").read_text())
    assert record["decision"] == "refuse" and record["rule"] == "superiority"  # CI [0, 0] is no superiority
    assert "gate: refuse:" in r.stdout and record["champion"]["status"] == "no_store"


def test_promotion_without_a_gate_record_needs_force_and_reason_and_is_audited(finished_run, local, tmp_path):
    env = store_env(local)
    r = spottune("publish", finished_run, "--name", NAME, "--version", "v1", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "no gate record" in r.stdout, r.stderr
    gate = json.loads((local.store_root / "models" / NAME / "versions" / "v1" / "gate.json").read_text())
    assert gate["passed"] is None and "by hand" in gate["reason"], "a manual publish records no pass"

    r = spottune("promote", NAME, "v1", cwd=tmp_path, env=env)
    assert r.returncode == 4 and "no record of the pipeline's gate" in r.stderr and "--force --reason" in r.stderr
    r = spottune("promote", NAME, "v1", "--force", cwd=tmp_path, env=env)
    assert r.returncode == 4 and "needs a reason" in r.stderr
    store = open_store(local)
    assert store.production(NAME) is None and store.audit_trail(NAME) == []

    r = spottune("promote", NAME, "v1", "--force", "--reason", "hotfix for ticket 42", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "forced" in r.stdout, r.stderr
    [audit] = store.audit_trail(NAME)
    assert audit["forced"] is True and audit["reason"] == "hotfix for ticket 42" and audit["version"] == "v1"
    assert audit["by"] and audit["at"] and audit["action"] == "promote"
    assert store.production(NAME)["forced"] is True


def test_publish_with_the_stage_record_promotes_without_force_and_a_record_binds_its_weights(
        finished_run, other_run, self_comparison, cpu, local, tmp_path):
    record = run_gate(params_for(), self_comparison(finished_run), cpu, local, log=lambda _: None)
    gate_json = tmp_path / "gate.json"
    gate_json.write_text(json.dumps(record))
    env = store_env(local)
    r = spottune("publish", other_run, "--name", NAME, "--version", "v0", "--gate", gate_json, cwd=tmp_path, env=env)
    assert r.returncode == 4 and "the gate record is for weights" in r.stderr, "another run's record is refused"
    r = spottune("publish", finished_run, "--name", NAME, "--version", "v1", "--gate", gate_json, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "passed the gate" in r.stdout, r.stderr
    r = spottune("promote", NAME, "v1", "--reason", "gate passed", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "forced" not in r.stdout, r.stderr
    assert open_store(local).audit_trail(NAME)[0]["forced"] is False


def test_a_refused_version_stays_a_candidate_even_when_forced(finished_run, local):
    store = open_store(local)
    store.publish(finished_run, NAME, "v1", gate=Gate(False, "significantly worse than production"))
    with pytest.raises(PromotionRefused, match="failed its promotion gate"):
        store.promote(NAME, "v1", force=True, reason="I insist")
    with pytest.raises(StoreError, match="a passed gate must carry the gate stage's record"):
        store.publish(finished_run, NAME, "v2", gate=Gate(True, "trust me"))
    assert store.production(NAME) is None

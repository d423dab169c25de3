"""flows/dvc_runner.py against real DVC: an override reaches a stage as the value the flow validated, and
a failing command is one error that names it and ends with its output.

A throwaway git + DVC repository with this project's params.yaml and one stage that loads it with
spottune.config (as every spottune stage does) and writes what it read; `dvc exp run` with the
flow's `-S` arguments; no training, a few seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from support import PROJECT, requires, sh

requires("dvc")
pytestmark = pytest.mark.integration  # real dvc in a temporary git repository

sys.path.insert(0, str(PROJECT))  # `flows` is not an installed package: it runs from the repository root

DUMP = ("python -c \"import json; from pathlib import Path; from spottune.config import load_params; "
        "open('seen.json', 'w').write(load_params(Path('params.yaml')).model_dump_json())\"")


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(PROJECT / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(json.dumps({"stages": {"dump": {
        "cmd": DUMP, "params": ["data", "optim", "policy", "publish", "validate"],
        "metrics": [{"seen.json": {"cache": False}}]}}}))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "params", cwd=repo)
    return repo


OVERRIDES = {
    "optim.lr_net": 1e-05,                      # YAML 1.1 reads 1e-05 as a string: still the float
    "optim.step_milestones": [2, 4],
    "optim.max_steps_per_epoch": 3,             # null in params.yaml
    "policy.global_k": 2,
    "data.augment": True,
    "data.root": "data/a b: c, 'd' \"e\" é",    # quotes, YAML and Hydra punctuation, non-ASCII
    "publish.model_name": "1.0",                # a string that looks like a number
    "validate.classes": None,
}


@pytest.mark.slow
def test_each_override_reaches_the_stage_as_the_flow_validated_it(repo):
    from flows.dvc_runner import run_experiment, set_param_args, unused_experiment_name
    from flows.retrain import load_settings

    before = (repo / "params.yaml").read_bytes()
    expected = load_settings(repo, OVERRIDES)  # what the flow validated before any work
    logged: list[str] = []
    run_experiment(repo, "exp-a", OVERRIDES, log=logged.append)
    seen = json.loads((repo / "seen.json").read_text())
    assert seen == json.loads(expected.model_dump_json())
    assert seen["optim"]["lr_net"] == 1e-05 and seen["data"]["root"] == OVERRIDES["data.root"]
    assert any("Running stage 'dump'" in line for line in logged), logged
    # DVC wrote the overrides into this checkout's params.yaml (the flow gives it a private one)
    assert (repo / "params.yaml").read_bytes() != before
    assert "exp-a" in sh(sys.executable, "-m", "dvc", "exp", "list", "--name-only", cwd=repo).stdout.split()
    assert unused_experiment_name(repo, "exp-a") == "exp-a-2" and unused_experiment_name(repo, "b c/d") == "b-c-d"
    assert set_param_args({"optim.epochs": 1}) == ["-S", "++optim.epochs=1"]


def test_a_failing_dvc_command_raises_stage_failed_with_its_last_output(repo):
    from flows.dvc_runner import StageFailed, run_dvc

    logged: list[str] = []
    with pytest.raises(StageFailed, match=r"(?s)stage nope failed: `dvc repro nope` exited with \d+ in .*nope"):
        run_dvc(repo, "repro", "nope", what="stage nope", log=logged.append)
    assert logged[0] == "stage nope: dvc repro nope" and any(line.startswith("[stage nope] ") for line in logged)

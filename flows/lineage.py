"""The retrain flow's part of a published version's lineage: which flow run (and deployment) published it.

spottune.lineage collects the rest (git, dvc.lock, data, params, packages, threads); Prefect is known
only here, in flows/.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spottune.config import Params
    from spottune.store import Lineage


def flow_run_record() -> dict[str, Any] | None:
    """{id, name, deployment, deployment_id} of the current Prefect flow run; None outside one."""
    from prefect.runtime import deployment, flow_run

    run_id = flow_run.id
    if run_id is None:
        return None
    return {"id": str(run_id), "name": flow_run.name, "deployment": deployment.name,
            "deployment_id": str(deployment.id) if deployment.id else None}


def flow_lineage(project: Path, run: Path, params: Params, data_version: str,
                 experiment: str | None = None) -> Lineage:
    """The lineage of the flow's candidate run, as published from this flow run.

    experiment: the DVC experiment the run's outputs belong to, when the flow ran one (else None).
    """
    from spottune.lineage import collect_lineage

    return collect_lineage(project, run, params, data_version=data_version, experiment=experiment,
                           flow_run=flow_run_record())

"""Serve the retrain flow on a cron schedule from this process (no work pool needed).

    python -m flows.serve                      # deployment retrain/weekly, Mondays 03:00 (UTC)
    python -m flows.serve --cron "0 3 * * *"   # another schedule

Run it from the repository root against a Prefect server (`prefect server start`, then
PREFECT_API_URL=http://127.0.0.1:4200/api); it creates the deployment with its schedule and runs
the flow in subprocesses whenever the schedule or `prefect deployment run retrain/weekly` asks; each
run works in its own git worktree of the repository at HEAD (own_checkout), not in this checkout.
Stopping it (Ctrl-C, SIGTERM) pauses the schedule. The work-pool route is prefect.yaml.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_CRON = "0 3 * * 1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="weekly", help="deployment name (FLOW/NAME = retrain/NAME)")
    p.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (UTC unless --timezone)")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--limit", type=int, default=1, help="flow runs this process executes at once")
    args = p.parse_args(argv)

    from prefect.schedules import Cron

    from flows.retrain import retrain

    retrain.serve(name=args.name, schedule=Cron(args.cron, timezone=args.timezone), limit=args.limit,
                  tags=["spottune", "retrain"], description="Weekly SpotTune retrain: DVC pipeline, gate, promotion",
                  parameters={"overrides": {}, "project_dir": ".", "own_checkout": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())

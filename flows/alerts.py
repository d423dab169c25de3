"""Alerts: a failed retrain flow run and a gate that refuses SpotTune, POSTed as JSON to SPOTTUNE_ALERT_WEBHOOK.

Prefect state-change hooks on the retrain flow (on_failure, on_completion) send them once the run has
ended, in the process that ran it, so a run started by a schedule or a worker alerts the same way. Each
alert is one JSON object:

    {"format": "spottune-alert/1", "event": "flow_failed" | "gate_refused", "flow": "retrain",
     "flow_run": NAME, "flow_run_id": ID, "model": MODEL, "version": VERSION (gate_refused), "reason": WHY, ...}

An alert never changes what a run did: a webhook that is down, slow or answers with an error is a
warning in the flow run's log, and the run keeps its state. No webhook set: no alert (the flow says
so once, when it starts). The URL may hold a token: logs show only its scheme and host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ALERT_FORMAT = "spottune-alert/1"


def describe_alerts() -> str:
    """One line for the flow's log at its start, after checking the settings (ConfigError on a malformed URL)."""
    from spottune.endpoints import shown_endpoint
    from spottune.settings import alert_settings

    settings = alert_settings()
    if not settings.alert_webhook:
        return "alerts off: SPOTTUNE_ALERT_WEBHOOK is not set (a failed run or a refused gate tells nobody)"
    return f"alerts: a failed run or a refused gate is POSTed to {shown_endpoint(settings.alert_webhook)}"


def post_json(url: str, payload: dict[str, Any], timeout_s: float) -> int:
    """POST payload as JSON; the HTTP status. OSError (refused, timed out, an HTTP error status) when not delivered."""
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "spottune-alerts"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read(65536)
        return response.status


def send_alert(payload: dict[str, Any], log: Any) -> bool:
    """Deliver one alert; True when the webhook took it. Never raises: an alert that fails is a warning."""
    from spottune.endpoints import redact_url_credentials, shown_endpoint
    from spottune.errors import ConfigError
    from spottune.settings import alert_settings

    try:
        settings = alert_settings()
    except ConfigError as e:
        log.warning("alert %s not sent: %s", payload.get("event"), e)
        return False
    if not settings.alert_webhook:
        return False
    where = shown_endpoint(settings.alert_webhook)
    try:
        status = post_json(settings.alert_webhook, payload, settings.alert_timeout_s)
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
        # the exception text may repeat the URL (and its token): only the endpoint's host is shown
        detail = redact_url_credentials(str(getattr(e, "reason", None) or e)).replace(settings.alert_webhook, where)
        log.warning("alert %s not delivered to %s (%s: %s); the run's outcome is unchanged",
                    payload.get("event"), where, type(e).__name__, detail)
        return False
    log.info("alert %s delivered to %s (HTTP %s)", payload.get("event"), where, status)
    return True


def run_identity(flow: Any, flow_run: Any) -> dict[str, Any]:
    """Which run an alert is about: the flow, the flow run's name and id, its deployment and parameters."""
    return {"format": ALERT_FORMAT, "flow": flow.name, "flow_run": flow_run.name, "flow_run_id": str(flow_run.id),
            "deployment_id": str(flow_run.deployment_id) if flow_run.deployment_id else None,
            "parameters": json.loads(json.dumps(flow_run.parameters or {}, default=str))}


def model_name(parameters: dict[str, Any]) -> str | None:
    """The model a failed run was to publish: the override, else project_dir's params.yaml; None when unreadable
    (the failure may be that very file)."""
    import yaml

    overrides = parameters.get("overrides") or {}
    if isinstance(overrides, dict) and isinstance(overrides.get("publish.model_name"), str):
        return overrides["publish.model_name"]
    try:
        raw = yaml.safe_load((Path(str(parameters.get("project_dir", "."))) / "params.yaml").read_text())
        name = raw["publish"]["model_name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def _hook_logger(flow: Any, flow_run: Any) -> Any:
    """The flow run's logger (hooks run outside the run's context, where get_run_logger() raises)."""
    from prefect.logging.loggers import flow_run_logger

    return flow_run_logger(flow_run, flow)


def on_flow_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect on_failure hook: the run failed; alert with the failure's message."""
    log = _hook_logger(flow, flow_run)
    try:
        identity = run_identity(flow, flow_run)
        payload = {**identity, "event": "flow_failed", "model": model_name(identity["parameters"]),
                   "state": state.name, "reason": state.message or state.name}
        send_alert(payload, log)
    except Exception as e:  # noqa: BLE001 - an alert must never add a failure of its own
        log.warning("alert for the failed run not sent: %s: %s", type(e).__name__, e)


def on_flow_completion(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect on_completion hook: alert when the gate refused SpotTune (the flow completes then: a refusal is
    a verdict, not an error)."""
    log = _hook_logger(flow, flow_run)
    try:
        result = state.result(raise_on_failure=False)
        if not isinstance(result, dict) or result.get("gate_passed") is not False:
            return
        payload = {**run_identity(flow, flow_run), "event": "gate_refused", "model": result.get("model"),
                   "version": result.get("version"), "reason": result.get("reason"), "status": result.get("status"),
                   "candidate_accuracy": result.get("candidate_accuracy"),
                   "baseline_accuracy": result.get("baseline_accuracy"), "stored_at": result.get("url"),
                   "experiment": result.get("experiment")}
        send_alert(payload, log)
    except Exception as e:  # noqa: BLE001 - a completed run stays completed
        log.warning("alert for the refused gate not sent: %s: %s", type(e).__name__, e)

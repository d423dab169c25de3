"""Alerts without a flow: the webhook setting checked once with a message that never shows the URL, and
delivery to a real HTTP receiver on 127.0.0.1 (and to one that is down: a warning, never an exception).
The alerts of real flow runs are tested in tests/test_flow.py."""

from __future__ import annotations

import logging
import sys

import pytest

from support import PROJECT, WebhookReceiver, free_port

sys.path.insert(0, str(PROJECT))  # `flows` is not an installed package: it runs from the repository root


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/hook?token=s3cret", "http://user:s3cret@127.0.0.1/hook",
                                 "http://127.0.0.1:99999/hook?token=s3cret", "https:///s3cret"])
def test_a_malformed_webhook_is_refused_naming_the_variable_never_the_url(url, monkeypatch):
    from spottune.errors import ConfigError
    from spottune.settings import alert_settings

    monkeypatch.setenv("SPOTTUNE_ALERT_WEBHOOK", url)
    with pytest.raises(ConfigError, match="SPOTTUNE_ALERT_WEBHOOK: malformed webhook URL") as e:
        alert_settings()
    assert "s3cret" not in str(e.value)


def test_no_webhook_means_no_alert_and_says_so(monkeypatch, caplog):
    from flows.alerts import describe_alerts, send_alert

    monkeypatch.delenv("SPOTTUNE_ALERT_WEBHOOK", raising=False)
    assert describe_alerts().startswith("alerts off: SPOTTUNE_ALERT_WEBHOOK is not set")
    assert send_alert({"event": "gate_refused"}, logging.getLogger("t")) is False and not caplog.records


def test_an_alert_reaches_the_webhook_and_a_dead_one_is_a_warning(monkeypatch, caplog):
    from flows.alerts import describe_alerts, send_alert

    log = logging.getLogger("t")
    with WebhookReceiver() as hook:
        monkeypatch.setenv("SPOTTUNE_ALERT_WEBHOOK", hook.url)
        assert describe_alerts() == "alerts: a failed run or a refused gate is POSTed to http://127.0.0.1"
        assert send_alert({"event": "flow_failed", "reason": "boom"}, log) is True
        [got] = hook.wait_for(1)
    assert got["body"] == {"event": "flow_failed", "reason": "boom"} and got["path"].startswith("/hooks/spottune")

    monkeypatch.setenv("SPOTTUNE_ALERT_WEBHOOK", f"http://127.0.0.1:{free_port()}/hook?token=s3cret")
    with caplog.at_level(logging.WARNING, logger="t"):
        assert send_alert({"event": "gate_refused"}, log) is False
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "alert gate_refused not delivered to http://127.0.0.1" in warning and "s3cret" not in warning

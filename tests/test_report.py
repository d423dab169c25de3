"""The retrain report's head (flows/report.py, no Prefect): the link to the validate stage's Data Docs."""

from __future__ import annotations

import posixpath
import re

from flows.report import summary_section

from support import passed_gate


def test_report_links_the_data_docs_relative_to_its_own_folder():
    """The report is written to reports/retrain.md: its link must lead from there to the Data Docs index the
    validate stage writes, and say nothing when there is none (the report stays the same bytes otherwise)."""
    docs = "reports/validation/data_docs/index.html"
    text = summary_section("# Comparison\n", passed_gate(), "abc123", {}, docs)
    (label, target) = re.search(r"Great Expectations Data Docs: \[([^]]+)\]\(([^)]+)\)", text).groups()
    assert label == docs and posixpath.normpath(posixpath.join("reports", target)) == docs
    assert "Data Docs" not in summary_section("# Comparison\n", passed_gate(), "abc123", {})

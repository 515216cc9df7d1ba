"""Docs that are generated from code stay in sync with it."""

from __future__ import annotations

from lstm_serve.cli import settings_reference
from lstm_serve.metrics import Metrics
from tests.golden import REPO


def test_operations_doc_has_the_current_settings_table() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    begin, end = "<!-- settings-reference:begin -->\n", "<!-- settings-reference:end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == settings_reference(), "run: lstm-serve settings-reference, and paste into docs/operations.md"


def test_operations_doc_lists_every_metric_the_server_exports() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    registry = Metrics().registry
    names = {metric.name for metric in registry.collect() if metric.name.startswith(("lstm_", "grpc_"))}
    assert names, "no lstm_ metric registered"
    suffix = {"counter": "_total", "info": "_info"}
    missing = [
        name + suffix.get(metric.type, "")
        for metric in registry.collect()
        for name in [metric.name]
        if name in names and f"`{name}{suffix.get(metric.type, '')}`" not in text
    ]
    assert not missing, f"add these to the metrics table of docs/operations.md: {missing}"

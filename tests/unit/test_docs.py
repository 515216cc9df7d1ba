"""Docs that are generated from code stay in sync with it."""

from __future__ import annotations

from lstm_serve.cli import settings_reference
from tests.golden import REPO


def test_operations_doc_has_the_current_settings_table() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    begin, end = "<!-- settings-reference:begin -->\n", "<!-- settings-reference:end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == settings_reference(), "run: lstm-serve settings-reference, and paste into docs/operations.md"

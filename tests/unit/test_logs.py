"""Text logs cannot be forged by client-supplied values, and refusal logging is rationed."""

from __future__ import annotations

import logging
import sys

import pytest

from lstm_serve.logs import JsonFormatter, RateLimitedLog, TextFormatter


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("lstm_serve.service", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_a_newline_in_a_client_value_cannot_start_a_log_line_of_its_own() -> None:
    forged = "victim\n2026-11-27 12:00:00,000 INFO lstm_serve.app: all good"
    line = TextFormatter().format(_record("Step NOT_FOUND: session %r", forged, session_id=forged))
    assert "\n" not in line
    assert "session_id=victim\\n2026-11-27" in line


def test_a_traceback_still_reads_as_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith("failed")
    assert "Traceback (most recent call last):" in text.splitlines()[1]


def test_json_lines_escape_by_themselves() -> None:
    line = JsonFormatter().format(_record("m", session_id="a\nb"))
    assert "\n" not in line


def test_refusals_are_rationed_and_the_dropped_ones_counted(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.refusals")
    limited = RateLimitedLog(log, per_second=0.001, burst=5)
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        for i in range(50):
            limited.info("refused %d", i, extra={})
    assert [r.getMessage() for r in caplog.records] == [f"refused {i}" for i in range(5)]
    assert limited.dropped == 45

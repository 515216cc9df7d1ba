"""Logging set-up: human-readable lines by default, one JSON object per line with --log-json."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from lstm_serve.token_bucket import TokenBucket

# Attributes a LogRecord has of its own; anything else was passed through `extra=` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _escaped(value: object) -> str:
    """A field as one line of text: newlines and other control characters in client-supplied values (a session id,
    a request id) are shown escaped, so they cannot forge or split log lines."""
    text = str(value)
    if text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)[1:-1]


class TextFormatter(logging.Formatter):
    """Readable lines, with the structured fields (session_id, seq, request_id, ...) appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line before any traceback: escaped, with the fields; a traceback is appended after it as it is."""
        line = _escaped(super().formatMessage(record))
        fields = " ".join(f"{k}={_escaped(v)}" for k, v in vars(record).items() if k not in _STANDARD and v is not None)
        return f"{line} [{fields}]" if fields else line


class RateLimitedLog:
    """A token bucket in front of a logger, for lines a client can cause at will (refused requests): at most `burst`
    at once and `per_second` on average; what it drops is counted and reported in the next line it lets through."""

    def __init__(self, logger: logging.Logger, per_second: float, burst: int) -> None:
        self._log = logger
        self._bucket = TokenBucket(per_second, float(burst))
        self.dropped = 0

    def info(self, message: str, *args: object, extra: dict[str, object]) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        if self._bucket.take():
            self.dropped += 1
            return
        if self.dropped:
            extra = extra | {"suppressed_before": self.dropped}
            self.dropped = 0
        self._log.info(message, *args, extra=extra)


def configure(level: str, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)

"""Settings precedence: command-line flag > LSTM_SERVE_* environment variable > default."""

from __future__ import annotations

import pytest

from lstm_serve.cli import build_parser, local_target, settings_from_args


def _settings(*argv: str):  # type: ignore[no-untyped-def]
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _settings()
    assert (s.port, s.session_ttl, s.max_sessions, s.models) == (50051, 3600.0, 100_000, [])


def test_env_overrides_default_and_flag_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSTM_SERVE_PORT", "6000")
    monkeypatch.setenv("LSTM_SERVE_MAX_SESSIONS", "7")
    monkeypatch.setenv("LSTM_SERVE_MODELS", "a, b")
    monkeypatch.setenv("LSTM_SERVE_LOG_JSON", "true")
    s = _settings("--port", "7000", "--no-log-json")
    assert s.port == 7000
    assert s.max_sessions == 7
    assert s.models == ["a", "b"]
    assert s.log_json is False


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_sessions"):
        _settings("--max-sessions", "0")
    monkeypatch.setenv("LSTM_SERVE_NO_SUCH_THING", "1")  # unknown env vars with our prefix are ignored, not fatal
    assert _settings().port == 50051


@pytest.mark.parametrize(
    ("host", "port", "target"),
    [
        (None, None, "127.0.0.1:50051"),
        ("0.0.0.0", "6000", "127.0.0.1:6000"),
        ("::", "6000", "[::1]:6000"),
        ("10.1.2.3", None, "10.1.2.3:50051"),
        ("fd00::5", "7", "[fd00::5]:7"),
    ],
)
def test_health_probes_the_address_serve_is_configured_with(
    monkeypatch: pytest.MonkeyPatch, host: str | None, port: str | None, target: str
) -> None:
    for name, value in (("LSTM_SERVE_HOST", host), ("LSTM_SERVE_PORT", port)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert local_target() == target
    assert build_parser().parse_args(["health"]).target == target

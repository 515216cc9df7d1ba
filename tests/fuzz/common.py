"""What the fuzz tests share: how many examples to run, and a status read off a failed or finished call."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc
from hypothesis import HealthCheck, Phase, settings

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_client.errors import ERROR_METADATA_KEY

EXAMPLES_ENV = "LSTM_FUZZ_EXAMPLES"  # examples per fuzz test; set by `make fuzz-long`
SHRINK_ENV = "LSTM_FUZZ_SHRINK"  # set: shrink a failure to a minimal example (minutes against a live server)
NEVER = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})  # a server bug whatever the request


def long_run_examples() -> int:
    """LSTM_FUZZ_EXAMPLES, or 0 in CI."""
    return int(os.environ.get(EXAMPLES_ENV) or 0)


def fuzz_settings(examples: int, **overrides: Any) -> settings:
    """`examples` in CI, derandomized (the same examples every run) and with no example database, so that a failure
    reproduces on any machine. With LSTM_FUZZ_EXAMPLES=N: N examples from fresh random seeds, and a failure prints
    the `@reproduce_failure` blob that replays it."""
    scaled = long_run_examples()
    values: dict[str, Any] = {
        "max_examples": scaled or examples,
        "deadline": None,
        "database": None,
        "derandomize": not scaled,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    }
    if not os.environ.get(SHRINK_ENV):
        # Shrinking a failure of the live server can take minutes (past pytest's timeout, which would lose the report):
        # report the first failure as found; LSTM_FUZZ_SHRINK=1 shrinks it to a minimal reproduction.
        values |= {"phases": [Phase.explicit, Phase.reuse, Phase.generate], "report_multiple_bugs": False}
    return settings(**(values | overrides))


@dataclass(frozen=True)
class Status:
    """How a call ended: its code and message, and the `lstm-error-bin` detail when the server sent one."""

    code: grpc.StatusCode
    message: str = ""
    detail: lstm_pb2.Error | None = None

    @property
    def reason(self) -> str:
        return self.detail.reason if self.detail is not None else ""

    @property
    def expected_seq(self) -> int:
        return self.detail.expected_seq if self.detail is not None else 0

    def __str__(self) -> str:
        extra = f" reason={self.reason!r} expected_seq={self.expected_seq}" if self.detail is not None else ""
        return f"{self.code.name}: {self.message[:200]!r}{extra}"


OK = Status(grpc.StatusCode.OK)


def status_of(exc: grpc.RpcError) -> Status:
    call: Any = exc  # a grpc.Call as well
    metadata: Any = call.trailing_metadata() or ()
    detail = next((lstm_pb2.Error.FromString(v) for k, v in metadata if k == ERROR_METADATA_KEY), None)
    return Status(call.code(), call.details() or "", detail)

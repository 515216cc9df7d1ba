"""The retry schedule (budget, backoff bounds, jitter, determinism) and the sync and async drivers over it."""

from __future__ import annotations

import random

import grpc
import pytest

from lstm_client import RetryPolicy, ServerError, Unavailable
from lstm_client._retry import RetrySchedule, StreamBroken, run, run_async
from lstm_client.errors import InvalidArgument, LstmError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pauses(schedule: RetrySchedule, clock: FakeClock, attempt_time: float = 0.0, limit: int = 10_000) -> list[float]:
    """Every pause the schedule grants, each attempt taking `attempt_time` seconds, until it gives up."""
    out: list[float] = []
    clock.now += attempt_time
    while (pause := schedule.next_pause()) is not None and len(out) < limit:
        out.append(pause)
        clock.now += pause + attempt_time
    return out


@pytest.mark.parametrize("jitter", ["full", "decorrelated", "none"])
@pytest.mark.parametrize("attempt_time", [0.0, 0.3, 4.0])
def test_no_attempt_starts_after_the_budget(jitter: str, attempt_time: float) -> None:
    clock = FakeClock()
    policy = RetryPolicy(budget=3.0, jitter=jitter)  # type: ignore[arg-type]
    schedule = policy.schedule(rng=random.Random(1), clock=clock)
    start = clock.now
    got = pauses(schedule, clock, attempt_time)
    last_attempt_start = clock.now - attempt_time
    assert last_attempt_start - start <= 3.0 + 1e-9
    assert sum(got) <= 3.0 + 1e-9
    if attempt_time == 0.0:  # nothing but pauses: the budget is used up, not abandoned early
        assert sum(got) == pytest.approx(3.0)


def test_full_jitter_stays_below_the_exponential_bound() -> None:
    clock = FakeClock()
    policy = RetryPolicy(budget=1e6, initial_backoff=0.05, multiplier=2.0, max_backoff=1.0, attempts=40)
    got = pauses(policy.schedule(rng=random.Random(3), clock=clock), clock)
    assert len(got) == 39
    for n, pause in enumerate(got):
        assert 0.0 <= pause <= min(1.0, 0.05 * 2.0**n)
    assert len(set(got)) == len(got)  # jittered, not a fixed ladder


def test_decorrelated_jitter_stays_between_initial_and_max() -> None:
    clock = FakeClock()
    policy = RetryPolicy(budget=1e6, jitter="decorrelated", initial_backoff=0.05, max_backoff=1.0, attempts=200)
    got = pauses(policy.schedule(rng=random.Random(5), clock=clock), clock)
    assert len(got) == 199
    assert all(0.05 <= p <= 1.0 for p in got)
    assert max(got) > 0.5  # it does grow


def test_without_jitter_the_ladder_doubles_up_to_the_cap() -> None:
    clock = FakeClock()
    policy = RetryPolicy(jitter="none", initial_backoff=0.05, attempts=8)
    assert pauses(policy.schedule(clock=clock), clock) == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_a_seeded_random_gives_the_same_pauses() -> None:
    def run_once(seed: int, jitter: str) -> list[float]:
        clock = FakeClock()
        policy = RetryPolicy(jitter=jitter)  # type: ignore[arg-type]
        return pauses(policy.schedule(rng=random.Random(seed), clock=clock), clock)

    for jitter in ("full", "decorrelated"):
        assert run_once(7, jitter) == run_once(7, jitter)
        assert run_once(7, jitter) != run_once(8, jitter)


def test_attempts_caps_the_count_and_a_zero_budget_disables() -> None:
    clock = FakeClock()
    assert len(pauses(RetryPolicy(attempts=3).schedule(clock=clock), clock)) == 2
    assert pauses(RetryPolicy(attempts=1).schedule(clock=clock), clock) == []
    assert pauses(RetryPolicy(budget=0).schedule(clock=clock), clock) == []


def test_the_default_budget_spans_a_replica_restart() -> None:
    clock = FakeClock()
    policy = RetryPolicy()
    assert policy.budget >= 5.0
    assert policy.attempts is None
    got = pauses(policy.schedule(rng=random.Random(0), clock=clock), clock, attempt_time=0.01)
    assert sum(got) > 3.0  # still retrying after a 3 s outage
    assert max(got) <= policy.max_backoff  # and noticing the recovery within a second


def test_reset_starts_the_budget_again() -> None:
    clock = FakeClock()
    schedule = RetryPolicy(budget=1.0, jitter="none").schedule(clock=clock)
    pauses(schedule, clock)
    assert schedule.next_pause() is None
    schedule.reset()
    assert schedule.next_pause() == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs",
    [{"budget": -1}, {"initial_backoff": -0.1}, {"multiplier": 0.5}, {"attempts": 0}, {"jitter": "some"}],
)
def test_nonsense_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_old_spelling_still_works() -> None:
    policy = RetryPolicy(attempts=4, initial_backoff=0.01)
    assert (policy.attempts, policy.initial_backoff, policy.budget) == (4, 0.01, 10.0)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        self._details = details or f"{code.name} (simulated)"

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.002, budget=1.0)


class Flaky:
    """Fails with `failures` in turn, then returns "ok"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"

    async def aio(self) -> str:
        return self()


RETRYABLE = [
    FakeRpcError(grpc.StatusCode.UNAVAILABLE),
    FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED),
    StreamBroken("ended early"),
    Unavailable("in-band", code=grpc.StatusCode.UNAVAILABLE),
    # what the client sees when nginx resets a call because its replica died mid-call
    FakeRpcError(grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"),
]


def test_the_sync_driver_retries_what_is_retryable_and_reports_each_retry() -> None:
    flaky = Flaky(*RETRYABLE)
    seen: list[BaseException] = []
    assert run(flaky, FAST.schedule(), on_retry=seen.append) == "ok"
    assert flaky.calls == len(RETRYABLE) + 1
    assert seen == RETRYABLE


async def test_the_async_driver_retries_the_same() -> None:
    flaky = Flaky(*RETRYABLE)
    seen: list[BaseException] = []
    assert await run_async(flaky.aio, FAST.schedule(), on_retry=seen.append) == "ok"
    assert flaky.calls == len(RETRYABLE) + 1
    assert seen == RETRYABLE


@pytest.mark.parametrize("schedule", [True, False])
def test_other_failures_are_raised_at_once_as_lstm_errors(schedule: bool) -> None:
    flaky = Flaky(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT))
    with pytest.raises(InvalidArgument):
        run(flaky, FAST.schedule() if schedule else None)
    assert flaky.calls == 1
    flaky = Flaky(FakeRpcError(grpc.StatusCode.INTERNAL, "internal error; the server log has the details"))
    with pytest.raises(ServerError):  # the server's own INTERNAL is a bug to report, not to hammer
        run(flaky, FAST.schedule() if schedule else None)
    assert flaky.calls == 1
    flaky = Flaky(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    if schedule:
        assert run(flaky, FAST.schedule()) == "ok"
    else:  # no schedule: no retries
        with pytest.raises(Unavailable):
            run(flaky, None)


async def test_an_exhausted_budget_raises_the_last_failure() -> None:
    forever = Flaky(*[FakeRpcError(grpc.StatusCode.UNAVAILABLE)] * 10_000)
    with pytest.raises(Unavailable):
        run(forever, RetryPolicy(budget=0.05, initial_backoff=0.001).schedule())
    assert 2 < forever.calls < 10_000
    broken = Flaky(*[StreamBroken("the server ended the step stream early")] * 10)
    with pytest.raises(ServerError, match="ended the step stream early"):
        await run_async(broken.aio, RetryPolicy(attempts=3, initial_backoff=0.001).schedule())
    assert broken.calls == 3


def test_foreign_exceptions_pass_through_untouched() -> None:
    flaky = Flaky(ValueError("not ours"))
    with pytest.raises(ValueError, match="not ours"):
        run(flaky, FAST.schedule())
    assert flaky.calls == 1
    assert not issubclass(ValueError, LstmError)

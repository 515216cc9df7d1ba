"""A Hypothesis state machine against the live server: random sequences of every session call (unary and over
StreamSteps), checked against a model of the API's semantics (docs/api.md) kept in the test.

The model computes the expected outputs with the engine's NumPy model loaded from the model directory, one request at
a time, and keeps each session's state itself: independent of the server's request path, batching, streams and
session store. Requests are sent as raw protobuf, so any seq, any shape and any session id can go on the wire.

Where a request has several things wrong with it (a closed session and a malformed tensor, a NaN and too many steps),
the API does not say which one is reported: the model accepts any of them, but nothing else. After every rule every
session's seq and step count must be the model's; no call may ever answer INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from google.protobuf import duration_pb2
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import MAX_RANK, to_tensor
from lstm_serve.engine.model import Model
from lstm_serve.engine.repository import load_model
from tests.fuzz.common import NEVER, OK, Status, fuzz_settings, status_of
from tests.golden import TOLERANCE
from tests.servers import RunningServer

F32 = npt.NDArray[np.float32]
MODELS = ("golden_l2_wide", "golden_l3_head")  # 6 -> 2 x LSTM(16) -> 3 and 4 -> 3 x LSTM(8) -> 2: two state shapes
BROKEN_MODEL = "broken"  # in the test repository, failing to load
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_IDLE_TTL_NS = int(10 * 365.25 * 86400) * 10**9  # ten years, the longest TTL the API accepts
U64 = 2**64 - 1
MAX_SESSIONS = 8  # per example: enough to interleave, few enough that the invariant's GetSession calls stay cheap
RUN = secrets.token_hex(3)  # this test run's session ids cannot meet another run's, or another test's
_ids = itertools.count()

Code = grpc.StatusCode
Err = tuple[grpc.StatusCode, str, int | None]  # code, Error.reason, Error.expected_seq (None: not checked)
BAD: Err = (Code.INVALID_ARGUMENT, "bad_input", None)
LIMIT: Err = (Code.RESOURCE_EXHAUSTED, "limit", None)
UNKNOWN_MODEL: Err = (Code.NOT_FOUND, "unknown_model", None)
EXISTS: Err = (Code.ALREADY_EXISTS, "exists", None)


def new_id(prefix: str = "fz") -> str:
    return f"{prefix}-{RUN}-{next(_ids)}"


# --- the model of the semantics ----------------------------------------------------------------------------------


@dataclass
class Sess:
    model: str
    state: F32  # (2, L, H), as the reference computed it
    seq: int = 0
    steps: int = 0
    last_xs: bytes | None = None  # the (T, I) float32 inputs of step `seq`, as the digest sees them
    last_shape: tuple[int, ...] = ()  # the shape step `seq` was sent with
    last_ref: F32 | None = None  # the reference's outputs of step `seq`, (T, O)
    last_served: F32 | None = None  # what the server answered for step `seq`, (T, O): a replay must be exactly this
    closed: bool = False


@dataclass
class Expect:
    """What a request must get: one of `errors`, or (when there are none) outputs close to `outputs`, and equal to
    `exact` where it is known (a replay)."""

    errors: list[Err] = field(default_factory=list)
    outputs: F32 | None = None
    exact: F32 | None = None
    applies: Sess | None = None  # the session a step is applied to ...
    applies_seq: int = 0  # ... as this seq: while it is the session's last, its outputs are the stored reply
    what: str = ""

    def describe(self) -> str:
        if self.errors:
            return " or ".join(f"{c.name}/{r}" + ("" if n is None else f"/expected_seq={n}") for c, r, n in self.errors)
        return f"outputs {None if self.outputs is None else self.outputs.shape}"


def _matches(err: Err, status: Status) -> bool:
    code, reason, expected_seq = err
    if (status.code, status.reason) != (code, reason):
        return False
    return expected_seq is None or status.expected_seq == expected_seq


def _decode(tensor: lstm_pb2.Tensor) -> tuple[list[Err], F32 | None]:
    """The wire format's rules (docs/api.md, Tensors): what the server can refuse before it looks at anything else."""
    shape = tuple(int(d) for d in tensor.shape)
    if (not shape and not tensor.data) or len(shape) > MAX_RANK or len(tensor.data) != 4 * math.prod(shape):
        return [BAD], None
    try:
        return [], np.frombuffer(tensor.data, "<f4").reshape(shape).astype(np.float32)
    except ValueError:  # a shape numpy cannot represent
        return [BAD], None


class Semantics:
    """docs/api.md as code. Each `plan_*` says what the server must answer, and applies the call's effect to the
    model at once, so that the requests of one stream can be planned one after the other before any is sent."""

    def __init__(self, refs: dict[str, Model], limit: int, default_ttl: float) -> None:
        self.refs = refs
        self.limit = limit
        self.default_ttl = default_ttl
        self.sessions: dict[str, Sess] = {}

    def _session(self, sid: str) -> tuple[list[Err], Sess | None]:
        if not SESSION_ID.fullmatch(sid):
            return [BAD], None
        s = self.sessions.get(sid)
        if s is None:
            return [(Code.NOT_FOUND, "unknown_session", None)], None
        if s.closed:
            return [(Code.NOT_FOUND, "closed", None)], s
        return [], s

    def _inputs(self, x: F32, model: str, *, rank2_only: bool = False) -> tuple[list[Err], F32 | None]:
        info = self.refs[model].info
        if x.ndim not in ((2,) if rank2_only else (1, 2)):
            return [BAD], None
        xs = x.reshape(1, -1) if x.ndim == 1 else x
        errors: list[Err] = []
        if xs.shape[0] == 0 or xs.shape[1] != info.input_size:
            errors.append(BAD)
        if xs.shape[0] > self.limit:
            errors.append(LIMIT)
        if xs.size and not np.isfinite(xs).all():
            errors.append(BAD)
        return errors, None if errors else xs

    def compute(self, model: str, xs: F32, state: F32) -> tuple[F32, F32]:
        [(ys, new_state)] = self.refs[model].run_batch([xs], [state.copy()])
        return ys, new_state

    def zero(self, model: str) -> F32:
        return self.refs[model].zero_state()

    def plan_step(self, sid: str, seq: int, tensor: lstm_pb2.Tensor) -> Expect:
        errors, x = _decode(tensor)
        session_errors, s = self._session(sid)
        errors += session_errors
        xs = None
        if s is not None and x is not None:
            input_errors, xs = self._inputs(x, s.model)
            errors += input_errors
        replay = False
        if s is not None and not s.closed:
            if seq == s.seq + 1:
                pass
            elif seq == s.seq and s.last_xs is not None:
                if xs is not None and xs.tobytes() == s.last_xs:
                    replay = True
                else:
                    errors.append((Code.FAILED_PRECONDITION, "retry_mismatch", seq + 1))
            else:
                errors.append((Code.FAILED_PRECONDITION, "seq_mismatch", s.seq + 1))
        if errors:
            return Expect(errors=errors, what="step")
        assert s is not None
        assert x is not None
        assert xs is not None
        single = x.ndim == 1
        if replay:
            assert s.last_ref is not None
            ref, exact = s.last_ref, s.last_served
            return Expect(
                outputs=ref[0] if single else ref,
                exact=None if exact is None else exact[0] if single else exact,
                what="replay",
            )
        ys, s.state = self.compute(s.model, xs, s.state)
        s.seq, s.steps = seq, s.steps + len(xs)
        s.last_xs, s.last_shape, s.last_ref, s.last_served = xs.tobytes(), x.shape, ys, None
        return Expect(outputs=ys[0] if single else ys, applies=s, applies_seq=seq, what="step")

    def plan_create(self, model: str, sid: str, ttl_ns: int | None) -> Expect:
        errors: list[Err] = []
        if ttl_ns is not None and not 0 <= ttl_ns <= MAX_IDLE_TTL_NS:
            errors.append(BAD)
        if model not in self.refs:
            errors.append(UNKNOWN_MODEL)
        if sid and not SESSION_ID.fullmatch(sid):
            errors.append(BAD)
        elif sid in self.sessions and not self.sessions[sid].closed:
            errors.append(EXISTS)
        return Expect(errors=errors, what="create")

    def created(self, sid: str, model: str) -> None:
        self.sessions[sid] = Sess(model, self.zero(model))

    def plan_reset(self, sid: str) -> Expect:
        errors, s = self._session(sid)
        if not errors and s is not None:
            s.state = self.zero(s.model)  # seq, steps and the stored reply stay
        return Expect(errors=errors, what="reset")

    def plan_close(self, sid: str) -> Expect:
        errors, s = self._session(sid)
        if not errors and s is not None:
            s.closed = True
        return Expect(errors=errors, what="close")

    def plan_get(self, sid: str) -> Expect:
        errors, _ = self._session(sid)
        return Expect(errors=errors, what="get")

    def plan_predict(self, request: lstm_pb2.PredictRequest) -> tuple[Expect, F32 | None, F32 | None]:
        """Also the final h and c the reply must carry."""
        errors, x = _decode(request.inputs)
        given: dict[str, F32] = {}
        for name in ("h0", "c0"):
            if request.HasField(name):
                tensor_errors, array = _decode(getattr(request, name))
                errors += tensor_errors
                if array is not None:
                    given[name] = array
        if request.model not in self.refs:
            return Expect(errors=[*errors, UNKNOWN_MODEL], what="predict"), None, None
        info = self.refs[request.model].info
        xs = None
        if x is not None:
            input_errors, xs = self._inputs(x, request.model, rank2_only=True)
            errors += input_errors
        state = self.zero(request.model)
        for i, name in enumerate(("h0", "c0")):
            if name not in given:
                continue
            if given[name].shape != (info.num_layers, info.hidden_size) or not np.isfinite(given[name]).all():
                errors.append(BAD)
            else:
                state[i] = given[name]
        if errors:
            return Expect(errors=errors, what="predict"), None, None
        assert xs is not None
        ys, final = self.compute(request.model, xs, state)
        return Expect(outputs=ys, what="predict"), final[0], final[1]


# --- inputs ------------------------------------------------------------------------------------------------------

FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)
MODERATE = st.floats(-8.0, 8.0, width=32)


def valid_inputs(data: st.DataObject, input_size: int, limit: int) -> F32:
    """Shape [I] or [T, I]: mostly a few time steps of moderate values; sometimes the limit's worth, sometimes any
    finite float32 (huge, tiny, -0.0), which may overflow inside the model: the server must still answer what the
    reference answers."""
    form = data.draw(st.sampled_from(["single", "block", "block", "at_limit"]), label="form")
    steps = {"single": 1, "block": data.draw(st.integers(1, 4), label="T"), "at_limit": limit}[form]
    shape = (input_size,) if form == "single" else (steps, input_size)
    if form == "at_limit":
        seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    elements = data.draw(st.sampled_from([MODERATE, MODERATE, FINITE]), label="elements")
    return data.draw(hnp.arrays(np.float32, shape, elements=elements), label="x")


def other_inputs(data: st.DataObject, x: F32) -> F32:
    """Inputs of the same shape that differ from x: by one ulp in one place, or -0.0 for 0.0, or entirely."""
    flat = x.reshape(-1).copy()
    i = data.draw(st.integers(0, flat.size - 1), label="where")
    how = data.draw(st.sampled_from(["ulp", "sign", "new"]), label="how")
    if how == "ulp" or (how == "sign" and flat[i] != 0):
        flat[i] = np.nextafter(flat[i], np.float32(np.inf) if flat[i] < 1 else np.float32(-np.inf), dtype=np.float32)
    elif how == "sign":
        flat[i] = -0.0 if not np.signbit(flat[i]) else 0.0
    else:
        flat = flat + np.float32(1.0)
    return flat.reshape(x.shape)


BAD_KINDS = [
    "features",
    "rank0",
    "rank3",
    "rank9",
    "nan",
    "inf",
    "empty",
    "no_steps",
    "too_many",
    "bytes",
    "nan_and_too_many",
]


def bad_tensor(data: st.DataObject, input_size: int, limit: int) -> lstm_pb2.Tensor:
    """A tensor with something wrong for a model of `input_size` inputs (docs/api.md, Errors)."""
    kind = data.draw(st.sampled_from(BAD_KINDS), label="defect")
    if kind == "features":
        n = data.draw(st.integers(0, input_size + 3).filter(lambda n: n != input_size), label="features")
        shape: tuple[int, ...] = data.draw(st.sampled_from([(n,), (1, n), (3, n)]), label="shape")
        return to_tensor(np.ones(shape, np.float32))
    if kind == "rank0":
        return lstm_pb2.Tensor(shape=[], data=np.float32(1.0).tobytes())
    if kind == "rank3":
        return to_tensor(np.zeros(data.draw(st.sampled_from([(1, 1, input_size), (2, 3, input_size)])), np.float32))
    if kind == "rank9":
        return lstm_pb2.Tensor(shape=[1] * (MAX_RANK + 1), data=b"\0" * 4)
    if kind in ("nan", "inf"):
        x = valid_inputs(data, input_size, limit).copy()
        value = np.nan if kind == "nan" else data.draw(st.sampled_from([np.inf, -np.inf]), label="inf")
        x.reshape(-1)[data.draw(st.integers(0, x.size - 1), label="where")] = value
        return to_tensor(x)
    if kind == "empty":
        return lstm_pb2.Tensor()
    if kind == "no_steps":
        return to_tensor(np.zeros((0, input_size), np.float32))
    if kind in ("too_many", "nan_and_too_many"):
        x = np.zeros((limit + data.draw(st.integers(1, 3), label="over"), input_size), np.float32)
        if kind == "nan_and_too_many":
            x[-1, 0] = np.nan
        return to_tensor(x)
    # bytes that do not fit the shape
    shape = data.draw(st.sampled_from([(input_size,), (2, input_size), (2**32 - 1,)]), label="shape")
    size = 4 * math.prod(shape)
    nbytes = data.draw(st.sampled_from([0, 4, 4 * input_size - 1, 4 * input_size + 4]).filter(lambda n: n != size))
    return lstm_pb2.Tensor(shape=shape, data=b"\x01" * nbytes)


MALFORMED_IDS = st.one_of(
    st.just("a" * 129),
    st.text(min_size=1, max_size=12).filter(lambda s: not SESSION_ID.fullmatch(s)),
    st.sampled_from(["a b", "a/b", "a\n", "é", "\x00", "id\t", "a" * 1000]),
)


def _ttl(ns: int | None) -> duration_pb2.Duration | None:
    if ns is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(ns)
    return d


# --- the machine -------------------------------------------------------------------------------------------------


class LiveServer(RuleBasedStateMachine):
    """Set up by `test_the_server_keeps_the_semantics` (a class per server)."""

    server: ClassVar[RunningServer]
    stub: ClassVar[Any]
    refs: ClassVar[dict[str, Model]]

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        settings = self.server.app.settings
        self.model = Semantics(self.refs, settings.max_steps_per_request, settings.session_ttl)
        self.limit = settings.max_steps_per_request

    # the wire

    def call(self, method: str, request: Any) -> tuple[Any, Status]:
        try:
            return getattr(self.stub, method)(request, timeout=30), OK
        except grpc.RpcError as exc:
            status = status_of(exc)
            assert status.code not in NEVER, f"{method} answered {status}"
            return None, status

    def check(self, expect: Expect, status: Status, outputs: F32 | None, request: object) -> None:
        where = f"{expect.what}: {_brief(request)}"
        if expect.errors:
            assert status.code != Code.OK, f"{where}: OK, expected {expect.describe()}"
            assert any(_matches(e, status) for e in expect.errors), f"{where}: {status}, expected {expect.describe()}"
            return
        assert status.code == Code.OK, f"{where}: {status}, expected {expect.describe()}"
        assert outputs is not None
        assert expect.outputs is not None
        assert outputs.shape == expect.outputs.shape, f"{where}: outputs of shape {outputs.shape}"
        np.testing.assert_allclose(outputs, expect.outputs, atol=TOLERANCE, rtol=0, equal_nan=True, err_msg=where)
        if expect.exact is not None:
            np.testing.assert_array_equal(outputs, expect.exact, err_msg=f"{where}: a replay differs from the reply")
        if expect.applies is not None and expect.applies.seq == expect.applies_seq:
            # (the replies of a stream are checked in no particular order: only the last applied step's is kept)
            expect.applies.last_served = outputs.reshape(-1, outputs.shape[-1])

    def step(self, sid: str, seq: int, tensor: lstm_pb2.Tensor) -> None:
        request = lstm_pb2.StepRequest(session_id=sid, seq=seq, inputs=tensor)
        expect = self.model.plan_step(sid, seq, tensor)
        reply, status = self.call("Step", request)
        outputs = None
        if reply is not None:
            assert (reply.session_id, reply.seq) == (sid, seq)
            outputs = _array(reply.outputs)
        self.check(expect, status, outputs, request)

    def input_size(self, sid: str) -> int:
        return self.refs[self.model.sessions[sid].model].info.input_size

    # sessions

    @initialize(target=sessions, model=st.sampled_from(MODELS))
    def first_session(self, model: str) -> str:
        return self.new_session(model, chosen=True, ttl=None)

    @precondition(lambda self: len(self.model.sessions) < MAX_SESSIONS)
    @rule(
        target=sessions,
        model=st.sampled_from(MODELS),
        chosen=st.booleans(),
        ttl=st.sampled_from([None, None, 0, 3600 * 10**9, MAX_IDLE_TTL_NS]),
    )
    def create(self, model: str, chosen: bool, ttl: int | None) -> str:
        return self.new_session(model, chosen, ttl)

    def new_session(self, model: str, chosen: bool, ttl: int | None) -> str:
        sid = new_id() if chosen else ""
        request = lstm_pb2.CreateSessionRequest(model=model, session_id=sid, idle_ttl=_ttl(ttl))
        assert not self.model.plan_create(model, sid, ttl).errors
        reply, status = self.call("CreateSession", request)
        assert status == OK, f"create: {status}"
        if chosen:
            assert reply.session_id == sid
        else:
            assert SESSION_ID.fullmatch(reply.session_id)
            assert reply.session_id not in self.model.sessions
        assert (reply.model, reply.seq, reply.steps) == (model, 0, 0)
        expected_ttl = ttl if ttl is not None else int(self.model.default_ttl * 1e9)
        assert reply.idle_ttl.ToNanoseconds() == expected_ttl
        self.model.created(reply.session_id, model)
        return str(reply.session_id)

    @rule(sid=sessions, model=st.sampled_from(MODELS))
    def create_with_a_known_id(self, sid: str, model: str) -> None:
        """A live id is taken (ALREADY_EXISTS); a closed one may be used again, for a brand new session."""
        expect = self.model.plan_create(model, sid, None)
        reply, status = self.call("CreateSession", lstm_pb2.CreateSessionRequest(model=model, session_id=sid))
        self.check_create(expect, status, reply, sid, model)

    @rule(kind=st.sampled_from(["create", "create", "session call"]), data=st.data())
    def refused_without_a_session(self, kind: str, data: st.DataObject) -> None:
        """A session that cannot be created (malformed id, unknown or broken model, TTL out of range), or a call about
        a session never seen (NOT_FOUND unknown_session) or an id that is not one (INVALID_ARGUMENT). One rule for
        all, so that the rules with sessions to work on are drawn more often."""
        if kind == "create":
            self.create_refused(data)
        else:
            self.unknown_or_malformed_id(data)

    def create_refused(self, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["id", "model", "broken", "ttl"]), label="what")
        model, sid, ttl = MODELS[0], new_id(), None
        if kind == "id":
            sid = data.draw(MALFORMED_IDS, label="sid")
        elif kind == "model":
            model = data.draw(st.sampled_from(["nope", "", "Golden_l2_wide", "golden_l2_wide ", "../elnino"]))
        elif kind == "broken":
            model = BROKEN_MODEL
        else:
            # (the server reads a TTL as float seconds: up to ~30 ns over ten years rounds down to the limit, and is
            # accepted; this test leaves that band alone)
            too_long = st.integers(MAX_IDLE_TTL_NS + 1000, 2**62)
            ttl = data.draw(st.one_of(st.integers(-(2**62), -1), too_long), label="ns")
        expect = self.model.plan_create(model, sid, ttl)
        assert expect.errors
        request = lstm_pb2.CreateSessionRequest(model=model, session_id=sid, idle_ttl=_ttl(ttl))
        reply, status = self.call("CreateSession", request)
        self.check_create(expect, status, reply, sid, model)

    def check_create(self, expect: Expect, status: Status, reply: Any, sid: str, model: str) -> None:
        if expect.errors:
            self.check(expect, status, None, f"CreateSession({model!r}, {sid[:40]!r})")
            return
        assert status == OK, f"create {sid!r}: {status}"
        assert (reply.session_id, reply.model, reply.seq, reply.steps) == (sid, model, 0, 0)
        self.model.created(sid, model)

    @rule(sid=sessions)
    def get(self, sid: str) -> None:
        expect = self.model.plan_get(sid)
        reply, status = self.call("GetSession", lstm_pb2.GetSessionRequest(session_id=sid))
        self.check_session_call(expect, status, reply, sid, "GetSession")

    def unknown_or_malformed_id(self, data: st.DataObject) -> None:
        sid = data.draw(st.one_of(st.builds(new_id, st.just("nx")), MALFORMED_IDS), label="sid")
        method = data.draw(st.sampled_from(["GetSession", "ResetSession", "CloseSession", "Step"]), label="method")
        if method == "Step":
            x = valid_inputs(data, self.refs[MODELS[0]].info.input_size, self.limit)
            self.step(sid, data.draw(st.sampled_from([0, 1, U64])), to_tensor(x))
            return
        expect = self.model.plan_get(sid)
        assert expect.errors
        request_type = getattr(lstm_pb2, f"{method}Request")
        _, status = self.call(method, request_type(session_id=sid))
        self.check(expect, status, None, f"{method}({sid[:40]!r})")

    @rule(sid=sessions)
    def reset(self, sid: str) -> None:
        expect = self.model.plan_reset(sid)
        reply, status = self.call("ResetSession", lstm_pb2.ResetSessionRequest(session_id=sid))
        self.check_session_call(expect, status, reply, sid, "ResetSession")

    @rule(sid=sessions)
    def close(self, sid: str) -> None:
        before = self.model.sessions.get(sid)
        seq_steps = (before.seq, before.steps) if before is not None else None
        expect = self.model.plan_close(sid)
        reply, status = self.call("CloseSession", lstm_pb2.CloseSessionRequest(session_id=sid))
        if expect.errors:
            self.check(expect, status, None, f"CloseSession({sid!r})")
        else:
            assert status == OK, f"close {sid!r}: {status}"
            assert (reply.session.session_id, reply.session.seq, reply.session.steps) == (sid, *(seq_steps or ()))

    def check_session_call(self, expect: Expect, status: Status, reply: Any, sid: str, method: str) -> None:
        if expect.errors:
            self.check(expect, status, None, f"{method}({sid!r})")
        else:
            assert status == OK, f"{method}({sid!r}): {status}"
            self.check_info(sid, reply)

    def check_info(self, sid: str, info: Any) -> None:
        s = self.model.sessions[sid]
        got = (info.session_id, info.model, info.seq, info.steps)
        assert got == (sid, s.model, s.seq, s.steps), f"session {sid!r}: server {got}, model {s.seq, s.steps}"

    # steps

    @rule(sid=sessions, data=st.data())
    def step_next(self, sid: str, data: st.DataObject) -> None:
        """One to three steps in order: applied, with the reference's outputs."""
        s = self.model.sessions[sid]
        for _ in range(data.draw(st.integers(1, 3), label="steps")):
            self.step(sid, s.seq + 1, to_tensor(valid_inputs(data, self.input_size(sid), self.limit)))

    @rule(sid=sessions, data=st.data())
    def step_retry(self, sid: str, data: st.DataObject) -> None:
        """The last step again, as a client that lost its reply resends it: the stored reply, nothing applied. One
        time step may come back as [I] or as [1, I]: the digest is of the inputs, not of the shape."""
        s = self.model.sessions[sid]
        if s.last_xs is None:
            x = valid_inputs(data, self.input_size(sid), self.limit)  # nothing applied yet: seq 0 is out of order
        else:
            xs = np.frombuffer(s.last_xs, np.float32).reshape(-1, self.input_size(sid))
            shapes = [s.last_shape, xs.shape[1:]] if len(xs) == 1 else [s.last_shape]
            x = xs.reshape(data.draw(st.sampled_from(shapes), label="shape"))
        self.step(sid, s.seq, to_tensor(x))

    @rule(sid=sessions, data=st.data())
    def step_retry_with_other_inputs(self, sid: str, data: st.DataObject) -> None:
        s = self.model.sessions[sid]
        if s.last_xs is None:
            x = valid_inputs(data, self.input_size(sid), self.limit)
        else:
            x = other_inputs(data, np.frombuffer(s.last_xs, np.float32).reshape(s.last_shape))
        self.step(sid, s.seq, to_tensor(x))

    @rule(sid=sessions, data=st.data())
    def step_out_of_order(self, sid: str, data: st.DataObject) -> None:
        s = self.model.sessions[sid]
        near = [n for n in (0, s.seq - 1, s.seq + 2, s.seq + 100, U64) if n >= 0]
        seq = data.draw(
            st.one_of(st.sampled_from(near), st.integers(0, U64)).filter(lambda n: n not in (s.seq, s.seq + 1)),
            label="seq",
        )
        self.step(sid, seq, to_tensor(valid_inputs(data, self.input_size(sid), self.limit)))

    @rule(sid=sessions, data=st.data())
    def step_bad_inputs(self, sid: str, data: st.DataObject) -> None:
        """Refused (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for too many steps), whatever the seq; nothing changes."""
        s = self.model.sessions[sid]
        seq = data.draw(st.sampled_from([s.seq + 1, s.seq + 1, s.seq, s.seq + 5]), label="seq")
        self.step(sid, seq, bad_tensor(data, self.input_size(sid), self.limit))

    @rule(model=st.sampled_from([*MODELS, "nope", BROKEN_MODEL]), data=st.data())
    def predict(self, model: str, data: st.DataObject) -> None:
        info = self.refs[model].info if model in self.refs else self.refs[MODELS[0]].info
        defect = data.draw(st.sampled_from(["none", "none", "none", "inputs", "rank1", "h0", "c0"]), label="defect")
        x = valid_inputs(data, info.input_size, self.limit)
        request = lstm_pb2.PredictRequest(model=model, inputs=to_tensor(x.reshape(-1, info.input_size)))
        state_shape = (info.num_layers, info.hidden_size)
        for name in ("h0", "c0"):
            if data.draw(st.booleans(), label=f"with {name}"):
                given = data.draw(hnp.arrays(np.float32, state_shape, elements=MODERATE), label=name)
                getattr(request, name).CopyFrom(to_tensor(given))
        if defect == "inputs":
            request.inputs.CopyFrom(bad_tensor(data, info.input_size, self.limit))
        elif defect == "rank1":
            request.inputs.CopyFrom(to_tensor(np.zeros(info.input_size, np.float32)))
        elif defect in ("h0", "c0"):
            bad = data.draw(
                st.sampled_from(
                    [
                        lstm_pb2.Tensor(),
                        to_tensor(np.zeros((state_shape[0], state_shape[1] + 1), np.float32)),
                        to_tensor(np.zeros(state_shape[1], np.float32)),
                        to_tensor(np.full(state_shape, np.nan, np.float32)),
                        lstm_pb2.Tensor(shape=list(state_shape), data=b"\0" * 3),
                    ]
                ),
                label="bad state",
            )
            getattr(request, defect).CopyFrom(bad)
        request = lstm_pb2.PredictRequest.FromString(request.SerializeToString())  # as the server sees it
        expect, h, c = self.model.plan_predict(request)
        reply, status = self.call("Predict", request)
        self.check(expect, status, None if reply is None else _array(reply.outputs), f"Predict({model!r})")
        if reply is not None and h is not None and c is not None:
            np.testing.assert_allclose(_array(reply.h), h, atol=TOLERANCE, rtol=0, equal_nan=True)
            np.testing.assert_allclose(_array(reply.c), c, atol=TOLERANCE, rtol=0, equal_nan=True)

    # several requests, of several sessions, over one stream

    @precondition(lambda self: bool(self.model.sessions))
    @rule(data=st.data())
    def stream(self, data: st.DataObject) -> None:
        """Requests of one session are applied in the order sent; replies of different sessions may come in any order,
        and a failed request is answered in-band while the stream goes on."""
        sids = list(self.model.sessions)  # in creation order: server-made ids are random, their order is not
        count = data.draw(st.integers(1, 6), label="requests")
        kinds = ["next", "next", "next", "retry", "other", "out_of_order", "bad", "unknown"]
        planned: list[tuple[lstm_pb2.StepRequest, Expect]] = []
        for _ in range(count):
            kind = data.draw(st.sampled_from(kinds), label="kind")
            sid = data.draw(st.sampled_from(sids), label="sid") if kind != "unknown" else new_id("nx")
            s = self.model.sessions.get(sid)
            size = self.input_size(sid) if s is not None else self.refs[MODELS[0]].info.input_size
            seq = s.seq + 1 if s is not None else 1
            tensor = to_tensor(valid_inputs(data, size, self.limit))
            if s is not None and kind in ("retry", "other") and s.last_xs is not None:
                seq = s.seq
                last = np.frombuffer(s.last_xs, np.float32).reshape(s.last_shape)
                tensor = to_tensor(last if kind == "retry" else other_inputs(data, last))
            elif s is not None and kind == "out_of_order":
                seq = data.draw(st.sampled_from([n for n in (0, s.seq + 2, U64) if n not in (s.seq, s.seq + 1)]))
            elif kind == "bad":
                tensor = bad_tensor(data, size, self.limit)
            request = lstm_pb2.StepRequest(session_id=sid, seq=seq, inputs=tensor)
            planned.append((request, self.model.plan_step(sid, seq, tensor)))
        try:
            replies = list(self.stub.StreamSteps(iter([r for r, _ in planned]), timeout=30))
        except grpc.RpcError as exc:
            raise AssertionError(f"StreamSteps failed: {status_of(exc)}") from None
        self.match_stream(planned, replies)

    def match_stream(self, planned: list[tuple[lstm_pb2.StepRequest, Expect]], replies: list[Any]) -> None:
        """Each reply is matched to a request of the same (session_id, seq); where several requests share it, some
        one-to-one assignment must fit."""
        assert len(replies) == len(planned), f"{len(planned)} requests, {len(replies)} replies"
        expected: dict[tuple[str, int], list[tuple[lstm_pb2.StepRequest, Expect]]] = {}
        for request, expect in planned:
            expected.setdefault((request.session_id, request.seq), []).append((request, expect))
        got: dict[tuple[str, int], list[Any]] = {}
        for reply in replies:
            got.setdefault((reply.session_id, reply.seq), []).append(reply)
        assert sorted(got) == sorted(expected), f"replies for {sorted(got)}, requests for {sorted(expected)}"
        for key, candidates in expected.items():
            failures: list[str] = []
            for order in itertools.permutations(got[key]):
                try:
                    for (request, expect), reply in zip(candidates, order, strict=True):
                        self.check_stream_reply(request, expect, reply)
                except AssertionError as exc:
                    failures.append(str(exc))
                    continue
                break
            else:
                raise AssertionError(f"stream replies for {key} fit no request: {failures[0]}")

    def check_stream_reply(self, request: lstm_pb2.StepRequest, expect: Expect, reply: Any) -> None:
        if reply.HasField("error"):
            code = next(c for c in Code if c.value[0] == reply.error.code)
            assert code not in NEVER, f"StreamSteps answered {code.name} in-band: {reply.error.message}"
            status = Status(code, reply.error.message, reply.error)
            outputs = None
        else:
            status, outputs = OK, _array(reply.outputs)
        self.check(expect, status, outputs, request)

    # invariants

    @invariant()
    def every_session_is_where_the_model_says(self) -> None:
        for sid, s in self.model.sessions.items():
            reply, status = self.call("GetSession", lstm_pb2.GetSessionRequest(session_id=sid))
            if s.closed:
                assert (status.code, status.reason) == (Code.NOT_FOUND, "closed"), f"closed {sid!r}: {status}"
            else:
                assert status == OK, f"GetSession({sid!r}): {status}"
                self.check_info(sid, reply)

    def teardown(self) -> None:
        for sid, s in self.model.sessions.items():
            if not s.closed:
                self.call("CloseSession", lstm_pb2.CloseSessionRequest(session_id=sid))


def _array(tensor: lstm_pb2.Tensor) -> F32:
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape)).astype(np.float32)


def _brief(request: object) -> str:
    if isinstance(request, lstm_pb2.StepRequest):
        shape = list(request.inputs.shape)
        return f"Step(session_id={request.session_id[:40]!r}, seq={request.seq}, shape={shape})"
    return str(request)[:200]


@pytest.fixture
def stub(server: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]


def test_the_server_keeps_the_semantics(server: RunningServer, stub: Any) -> None:
    model_dir = Path(server.app.settings.model_dir)
    LiveServer.server = server
    LiveServer.stub = stub
    LiveServer.refs = {name: load_model(model_dir / name) for name in MODELS}
    run_state_machine_as_test(LiveServer, settings=fuzz_settings(60, stateful_step_count=30))

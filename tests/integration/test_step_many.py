"""Many sessions' steps in one message (StepMany, and inside StreamSteps): every step applied exactly once, answered on
its own, with the outputs of the whole sequence run from a zero state (Predict, which the golden tests hold to
PyTorch's), whatever else the message holds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from lstm_client import AsyncClient, Client, InvalidArgument, NotFound, RetryPolicy, SequenceError, Session
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import from_tensor, to_tensor
from tests.golden import TOLERANCE, golden
from tests.integration.test_retries import DropFirstReplies
from tests.servers import RunningServer


@pytest.fixture
def stub(server: RunningServer) -> Iterator[lstm_pb2_grpc.LstmServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]


def _step(session_id: str, seq: int, x: np.ndarray) -> lstm_pb2.StepRequest:
    return lstm_pb2.StepRequest(session_id=session_id, seq=seq, inputs=to_tensor(x))


def _reference(client: Client, model: str) -> np.ndarray:
    """(B, T, O): each golden input sequence run from a zero state."""
    g = golden(model)
    return np.stack([client.predict(model, g.inputs[b]).outputs for b in range(len(g.inputs))])


def test_step_many_matches_pytorch_for_every_session(client: Client) -> None:
    g, ref = golden("golden_l3_head"), _reference(client, "golden_l3_head")
    B, T = g.inputs.shape[:2]
    sessions = [client.create_session("golden_l3_head") for _ in range(B)]
    got = np.empty_like(ref)
    for t in range(T):
        result = client.step_many({s: g.inputs[b, t] for b, s in enumerate(sessions)})
        assert not result.errors
        for b, s in enumerate(sessions):
            got[b, t] = result.outputs[s]
    np.testing.assert_allclose(got, ref, atol=TOLERANCE, rtol=0)
    assert [s.info().seq for s in sessions] == [T] * B


def test_sessions_of_different_models_and_lengths_share_a_message(client: Client) -> None:
    """Two models, one and several time steps: each session gets what stepping it alone gives."""
    a, b = golden("golden_l3_head"), golden("golden_l1_nohead")
    ref_a, ref_b = _reference(client, "golden_l3_head"), _reference(client, "golden_l1_nohead")
    sa, sb, sc = (client.create_session(m) for m in ("golden_l3_head", "golden_l1_nohead", "golden_l1_nohead"))
    result = client.step_many({sa: a.inputs[0, 0], sb: b.inputs[1, :3], sc: b.inputs[2, 0]})
    assert not result.errors
    np.testing.assert_allclose(result.outputs[sa], ref_a[0, 0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(result.outputs[sb], ref_b[1, :3], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(result.outputs[sc], ref_b[2, 0], atol=TOLERANCE, rtol=0)
    assert (sa.seq, sb.seq, sc.seq) == (1, 1, 1)
    assert sb.info().steps == 3


def test_each_step_fails_on_its_own(client: Client) -> None:
    g = golden("golden_l3_head")
    ref = _reference(client, "golden_l3_head")
    good, behind, ahead = (client.create_session("golden_l3_head") for _ in range(3))
    ghost = client.create_session("golden_l3_head")
    ghost.close()
    behind.seq = -1  # its step carries seq 0: already past
    ahead.seq = 5  # its step carries seq 6: out of order
    wrong_shape = client.create_session("golden_l3_head")
    x = g.inputs[0, 0]
    result = client.step_many({good: x, behind: x, ahead: x, ghost: x, wrong_shape: np.zeros(len(x) + 1, np.float32)})
    np.testing.assert_allclose(result.outputs[good], ref[0, 0], atol=TOLERANCE, rtol=0)
    assert set(result.outputs) == {good}
    assert isinstance(result.errors[behind], SequenceError)
    assert isinstance(result.errors[ahead], SequenceError)
    assert result.errors[ahead].expected_seq == 1
    assert isinstance(result.errors[ghost], NotFound)
    assert isinstance(result.errors[wrong_shape], InvalidArgument)
    assert [s.info().seq for s in (good, ahead, wrong_shape)] == [1, 0, 0]  # refused steps changed nothing
    assert good.seq == 1
    assert wrong_shape.seq == 0


def test_non_finite_inputs_are_refused_alone(client: Client) -> None:
    """(Overflowing arithmetic and failing backends: tests/integration/test_internal_errors.py.)"""
    g = golden("golden_l3_head")
    ref = _reference(client, "golden_l3_head")
    good, nan = (client.create_session("golden_l3_head") for _ in range(2))
    result = client.step_many({good: g.inputs[0, 0], nan: np.full(g.inputs.shape[2], np.nan, np.float32)})
    assert set(result.outputs) == {good}
    assert isinstance(result.errors[nan], InvalidArgument)
    np.testing.assert_allclose(good.step(g.inputs[0, 1]), ref[0, 1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(nan.step(g.inputs[0, 0]), ref[0, 0], atol=TOLERANCE, rtol=0)  # state intact


def test_a_resent_message_is_applied_once(client: Client, stub: lstm_pb2_grpc.LstmServiceStub) -> None:
    """The same message twice (a lost reply): the second gets the same outputs, replayed; then a message mixing a
    resent step and a new one replays the first and applies the second."""
    g = golden("golden_l3_head")
    ref = _reference(client, "golden_l3_head")
    s1, s2 = (client.create_session("golden_l3_head").id for _ in range(2))
    request = lstm_pb2.StepManyRequest(steps=[_step(s1, 1, g.inputs[0, 0]), _step(s2, 1, g.inputs[1, 0])])
    first, again = stub.StepMany(request), stub.StepMany(request)
    assert first == again
    mixed = lstm_pb2.StepManyRequest(steps=[_step(s1, 1, g.inputs[0, 0]), _step(s2, 2, g.inputs[1, 1])])
    replies = stub.StepMany(mixed).replies
    np.testing.assert_array_equal(from_tensor(replies[0].outputs), from_tensor(first.replies[0].outputs))
    np.testing.assert_allclose(from_tensor(replies[1].outputs), ref[1, 1], atol=TOLERANCE, rtol=0)
    assert [client.session_info(s).steps for s in (s1, s2)] == [1, 2]
    changed = lstm_pb2.StepManyRequest(steps=[_step(s1, 1, g.inputs[0, 1])])  # seq 1 again, other inputs
    [reply] = stub.StepMany(changed).replies
    assert reply.error.reason == "retry_mismatch"


def test_lost_replies_of_step_many_are_retried_by_the_client(server: RunningServer) -> None:
    g = golden("golden_l3_head")
    with server.client() as plain:
        ref = _reference(plain, "golden_l3_head")
    dropper = DropFirstReplies(count=2, method="StepMany")
    retry = RetryPolicy(attempts=4, initial_backoff=0.01)
    with Client(server.target, interceptors=[dropper], retry=retry) as client:
        sessions = [client.create_session("golden_l3_head") for _ in range(3)]
        for t in range(3):
            result = client.step_many({s: g.inputs[b, t] for b, s in enumerate(sessions)})
            for b, s in enumerate(sessions):
                np.testing.assert_allclose(result.outputs[s], ref[b, t], atol=TOLERANCE, rtol=0)
        assert dropper.dropped == 2
        assert [(s.info().seq, s.info().steps) for s in sessions] == [(3, 3)] * 3


def test_a_session_named_twice_is_stepped_in_message_order(stub: lstm_pb2_grpc.LstmServiceStub, client: Client) -> None:
    g = golden("golden_l3_head")
    ref = _reference(client, "golden_l3_head")
    session = client.create_session("golden_l3_head").id
    other = client.create_session("golden_l3_head").id
    steps = [_step(session, t + 1, g.inputs[0, t]) for t in range(3)]
    request = lstm_pb2.StepManyRequest(steps=[steps[0], _step(other, 1, g.inputs[1, 0]), steps[1], steps[2]])
    replies = stub.StepMany(request).replies
    got = [from_tensor(replies[i].outputs) for i in (0, 2, 3)]
    np.testing.assert_allclose(np.stack(got), ref[0, :3], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(from_tensor(replies[1].outputs), ref[1, 0], atol=TOLERANCE, rtol=0)


def test_racing_messages_apply_each_step_once(server: RunningServer, client: Client) -> None:
    """The same message sent at once on many connections: every caller gets the same outputs; each session
    advanced by one step."""
    g = golden("golden_l3_head")
    ids = [client.create_session("golden_l3_head").id for _ in range(8)]
    request = lstm_pb2.StepManyRequest(steps=[_step(s, 1, g.inputs[b % 3, 0]) for b, s in enumerate(ids)])
    answers: list[lstm_pb2.StepManyResponse] = []
    lock = threading.Lock()

    def send() -> None:
        with grpc.insecure_channel(server.target) as channel:
            reply = lstm_pb2_grpc.LstmServiceStub(channel).StepMany(request, timeout=30)  # type: ignore[no-untyped-call]
        with lock:
            answers.append(reply)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 6
    assert all(answer == answers[0] for answer in answers)
    assert all(not reply.HasField("error") for reply in answers[0].replies)
    assert [client.session_info(s).steps for s in ids] == [1] * 8


def test_a_message_over_the_step_limit_is_refused_whole(stub: lstm_pb2_grpc.LstmServiceStub, client: Client) -> None:
    g = golden("golden_l3_head")
    ids = [client.create_session("golden_l3_head").id for _ in range(3)]
    long = np.repeat(g.inputs[0, :1], 2000, axis=0)  # 3 x 2000 steps > 4096
    request = lstm_pb2.StepManyRequest(steps=[_step(s, 1, long) for s in ids])
    with pytest.raises(grpc.RpcError) as caught:
        stub.StepMany(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [client.session_info(s).seq for s in ids] == [0, 0, 0]


def test_steps_inside_a_step_are_refused(stub: lstm_pb2_grpc.LstmServiceStub, client: Client) -> None:
    g = golden("golden_l3_head")
    session = client.create_session("golden_l3_head").id
    nested = lstm_pb2.StepRequest(steps=[_step(session, 1, g.inputs[0, 0])])
    [reply] = stub.StepMany(lstm_pb2.StepManyRequest(steps=[nested])).replies
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert client.session_info(session).seq == 0


def test_stream_requests_may_carry_many_sessions(stub: lstm_pb2_grpc.LstmServiceStub, client: Client) -> None:
    """One stream mixing single-session requests and many-session ones, pipelined."""
    g = golden("golden_l3_head")
    ref = _reference(client, "golden_l3_head")
    B, T = g.inputs.shape[:2]
    ids = [client.create_session("golden_l3_head").id for _ in range(B)]
    single = client.create_session("golden_l3_head").id
    requests = []
    for t in range(T):
        requests.append(lstm_pb2.StepRequest(steps=[_step(s, t + 1, g.inputs[b, t]) for b, s in enumerate(ids)]))
        requests.append(_step(single, t + 1, g.inputs[0, t]))
    requests.append(lstm_pb2.StepRequest(session_id=single, steps=[_step(ids[0], T + 1, g.inputs[0, 0])]))
    replies = list(stub.StreamSteps(iter(requests)))
    assert len(replies) == 2 * T + 1
    many = [r for r in replies if r.replies]
    assert len(many) == T
    got = np.stack([[from_tensor(r.outputs) for r in reply.replies] for reply in many], axis=1)  # (B, T, O)
    np.testing.assert_allclose(got, ref, atol=TOLERANCE, rtol=0)
    singles = [from_tensor(r.outputs) for r in replies if r.session_id == single and r.HasField("outputs")]
    np.testing.assert_allclose(np.stack(singles), ref[0], atol=TOLERANCE, rtol=0)
    [bad] = [r for r in replies if r.HasField("error")]
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert client.session_info(ids[0]).seq == T


def test_async_client_steps_many(server: RunningServer) -> None:
    g = golden("golden_l1_nohead")
    with server.client() as plain:
        ref = _reference(plain, "golden_l1_nohead")

    async def main() -> None:
        async with AsyncClient(server.target) as client:
            sessions = [await client.create_session("golden_l1_nohead") for _ in range(3)]
            for t in range(2):
                result = await client.step_many({s: g.inputs[b, t] for b, s in enumerate(sessions)})
                assert not result.errors
                for b, s in enumerate(sessions):
                    np.testing.assert_allclose(result.outputs[s], ref[b, t], atol=TOLERANCE, rtol=0)
            assert [s.seq for s in sessions] == [2, 2, 2]

    asyncio.run(main())


def test_the_client_keys_results_by_session(client: Client) -> None:
    session: Session = client.create_session("golden_l1_nohead")
    result = client.step_many({})
    assert not result.outputs
    assert not result.errors
    x = golden("golden_l1_nohead").inputs[0, 0]
    assert set(client.step_many({session: x}).outputs) == {session}

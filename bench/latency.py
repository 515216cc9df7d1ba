"""Sequential unary latency: one Step in flight at a time, lstm-serve (demo model) next to the bare echo ceiling.

    python -m bench.latency [--calls 3000]

Both servers run as separate processes on 127.0.0.1; the client is the same raw stub for both, sending the same
16-byte... payload the demo model takes (one float), so the difference is what lstm-serve adds per step.
"""

from __future__ import annotations

import argparse
import time

import grpc
import numpy as np

from bench.servers import REPO, echo_server, lstm_server
from lstm_client import Client
from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc
from lstm_client.tensor import to_tensor


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.array(samples) * 1e6
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)), "n": len(a)}


def _measure(
    target: str, session_id: str, calls: int, warmup: int = 300, metadata: tuple[tuple[str, str], ...] = ()
) -> dict[str, float]:
    """p50/p99 of `calls` sequential Steps after `warmup` (metadata: e.g. x-session-id, for nginx's affinity)."""
    x = to_tensor(np.array([26.0], np.float32))
    with grpc.insecure_channel(target) as channel:
        stub = lstm_pb2_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call]
        samples = []
        for seq in range(1, warmup + calls + 1):
            request = lstm_pb2.StepRequest(session_id=session_id, seq=seq, inputs=x)
            start = time.perf_counter()
            stub.Step(request, metadata=metadata or None)
            if seq > warmup:
                samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def run(calls: int) -> dict[str, dict[str, float]]:
    results = {}
    with echo_server() as echo:
        results["echo"] = _measure(echo.target, "echo", calls)
    with lstm_server(REPO / "models") as server, Client(server.target) as client:
        session = client.create_session("elnino", ttl=0)
        results["lstm-serve"] = _measure(server.target, session.id, calls)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for r in range(args.repeat):
        res = run(args.calls)
        e, s = res["echo"], res["lstm-serve"]
        print(
            f"run {r + 1}: echo p50 {e['p50_us']:.0f} us p99 {e['p99_us']:.0f} us | "
            f"lstm-serve p50 {s['p50_us']:.0f} us p99 {s['p99_us']:.0f} us | "
            f"ratio p50 {s['p50_us'] / e['p50_us']:.2f} p99 {s['p99_us'] / e['p99_us']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

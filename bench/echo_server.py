"""The framework ceiling: a grpc.aio server speaking lstm.v1 whose Step and StreamSteps echo the inputs back.

Same protos, same payloads, same serialization as lstm-serve, and no work: whatever lstm-serve costs beyond this is
lstm-serve's own. It answers GetModel / CreateSession / CloseSession just enough for lstm-loadtest to drive it.
Prints `port N` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from lstm_client._proto.lstm.v1 import lstm_pb2, lstm_pb2_grpc


class EchoServicer(lstm_pb2_grpc.LstmServiceServicer):
    def __init__(self, input_size: int) -> None:
        self.input_size = input_size

    async def GetModel(self, request: lstm_pb2.GetModelRequest, context: Any) -> lstm_pb2.ModelInfo:
        n = self.input_size
        return lstm_pb2.ModelInfo(name=request.name, input_size=n, output_size=n, hidden_size=n, num_layers=1)

    async def CreateSession(self, request: lstm_pb2.CreateSessionRequest, context: Any) -> lstm_pb2.SessionInfo:
        return lstm_pb2.SessionInfo(session_id=secrets.token_urlsafe(16), model=request.model)

    async def CloseSession(self, request: lstm_pb2.CloseSessionRequest, context: Any) -> lstm_pb2.CloseSessionResponse:
        return lstm_pb2.CloseSessionResponse()

    async def Step(self, request: lstm_pb2.StepRequest, context: Any) -> lstm_pb2.StepResponse:
        return lstm_pb2.StepResponse(session_id=request.session_id, seq=request.seq, outputs=request.inputs)

    async def StreamSteps(
        self, request_iterator: AsyncIterator[lstm_pb2.StepRequest], context: Any
    ) -> AsyncIterator[lstm_pb2.StepReply]:
        async for request in request_iterator:
            yield lstm_pb2.StepReply(session_id=request.session_id, seq=request.seq, outputs=request.inputs)


async def main(port: int, input_size: int) -> None:
    server = grpc.aio.server()
    lstm_pb2_grpc.add_LstmServiceServicer_to_server(EchoServicer(input_size), server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"port {bound}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--input-size", type=int, default=1, help="features per step the fake model takes")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.input_size))

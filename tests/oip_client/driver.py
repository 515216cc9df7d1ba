"""Drives lstm-serve's Open Inference Protocol endpoint with the unmodified tritonclient[grpc], as a Triton user would.

Runs in its own virtual environment (tests/oip_client/requirements.txt: tritonclient pins protobuf < 7, which the
lstm-serve environment cannot hold), started by the tests as a subprocess: a JSON plan on stdin (a target and a list
of operations), one JSON result per operation on stdout. Tensors cross as base64 of their float32 bytes, so the
tests compare the outputs bit for bit. Imports nothing of lstm-serve.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

STREAM_TIMEOUT = 60.0  # seconds to wait for each streamed reply


def _array(spec: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.frombuffer(base64.b64decode(spec["data"]), dtype=np.float32).reshape(spec["shape"])


def _inputs(op: dict[str, Any]) -> list[grpcclient.InferInput]:
    x = _array(op["input"])
    tensor = grpcclient.InferInput(op.get("input_name", "INPUT"), list(x.shape), op.get("datatype", "FP32"))
    tensor.set_data_from_numpy(x)
    return [tensor]


def _outputs(op: dict[str, Any]) -> list[grpcclient.InferRequestedOutput] | None:
    names = op.get("outputs")
    return None if names is None else [grpcclient.InferRequestedOutput(n) for n in names]


def _result(result: grpcclient.InferResult, output: str) -> dict[str, Any]:
    y = result.as_numpy(output)
    response = result.get_response()
    return {
        "id": response.id,
        "shape": None if y is None else list(y.shape),
        "data": None if y is None else base64.b64encode(np.ascontiguousarray(y, dtype=np.float32).tobytes()).decode(),
        "parameters": json_format.MessageToDict(response)["parameters"] if response.parameters else {},
        "output_names": [o.name for o in response.outputs],
    }


def _error(exc: InferenceServerException) -> dict[str, Any]:
    return {"error": {"status": exc.status(), "message": exc.message()}}


def _descriptors(names: list[str]) -> dict[str, Any]:
    """tritonclient's own idea of the wire format of `names`: fields (name, number, type, label, message type) and
    oneofs, nested messages included."""

    def describe(d: Any) -> dict[str, Any]:
        return {
            "fields": sorted(
                (f.name, f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else "")
                for f in d.fields
            ),
            "oneofs": sorted((o.name, sorted(f.name for f in o.fields)) for o in d.oneofs),
            "nested": {n.name: describe(n) for n in d.nested_types},
        }

    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return {
        "messages": {n: describe(service_pb2.DESCRIPTOR.message_types_by_name[n]) for n in names},
        "methods": {
            m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
            for m in service.methods
        },
    }


def _stream(client: grpcclient.InferenceServerClient, op: dict[str, Any]) -> list[dict[str, Any]]:
    """Sends every request of op["requests"] on one stream, then collects one callback per request, in the order
    the callbacks came."""
    replies: queue.Queue[dict[str, Any]] = queue.Queue()

    def callback(result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
        if error is not None:
            replies.put(_error(error))
        else:
            assert result is not None
            replies.put(_result(result, op.get("output", "OUTPUT")))

    client.start_stream(callback=callback, headers=op.get("headers"))
    try:
        for i, request in enumerate(op["requests"]):
            client.async_stream_infer(
                op["model"],
                _inputs(request),
                request_id=request.get("id", str(i)),
                sequence_id=request.get("sequence_id", 0),
                sequence_start=request.get("start", False),
                sequence_end=request.get("end", False),
                parameters=request.get("parameters"),
                enable_empty_final_response=request.get("final_flag", False),
            )
        return [replies.get(timeout=STREAM_TIMEOUT) for _ in op["requests"]]
    finally:
        client.stop_stream()


def run(op: dict[str, Any], client: grpcclient.InferenceServerClient) -> Any:
    kind = op["op"]
    headers = op.get("headers")
    try:
        if kind == "server":
            return {
                "live": client.is_server_live(headers=headers),
                "ready": client.is_server_ready(headers=headers),
                "metadata": client.get_server_metadata(headers=headers, as_json=True),
            }
        if kind == "ready":
            return client.is_model_ready(op["model"], op.get("version", ""), headers=headers)
        if kind == "metadata":
            return client.get_model_metadata(op["model"], op.get("version", ""), headers=headers, as_json=True)
        if kind == "infer":
            result = client.infer(
                op["model"],
                _inputs(op),
                model_version=op.get("version", ""),
                outputs=_outputs(op),
                request_id=op.get("id", ""),
                sequence_id=op.get("sequence_id", 0),
                sequence_start=op.get("start", False),
                sequence_end=op.get("end", False),
                parameters=op.get("parameters"),
                headers=headers,
            )
            return _result(result, op.get("output", "OUTPUT"))
        if kind == "stream":
            return _stream(client, op)
        if kind == "descriptors":
            return _descriptors(op["messages"])
    except InferenceServerException as exc:
        return _error(exc)
    raise ValueError(f"unknown op {kind!r}")


def main() -> None:
    plan = json.load(sys.stdin)
    with grpcclient.InferenceServerClient(plan["target"]) as client:
        results = [run(op, client) for op in plan["ops"]]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

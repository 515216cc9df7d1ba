"""ndarray <-> `lstm.v1.Tensor`, shared by the client and the server.

The wire layout is little-endian float32, row-major, with the shape beside it (see proto/lstm/v1/lstm.proto). Decoding
is a zero-copy `np.frombuffer` view, which is why the encoding is `bytes` and not `repeated float`.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from lstm_client._proto.lstm.v1 import lstm_pb2

WIRE_DTYPE = np.dtype("<f4")

FloatArray = npt.NDArray[np.float32]
MAX_RANK = 8  # the API uses 1 to 3; numpy itself stops at 64


class TensorDecodeError(ValueError):
    """The bytes and the declared shape of a Tensor do not fit together."""


def to_tensor(array: npt.ArrayLike) -> lstm_pb2.Tensor:
    arr = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return lstm_pb2.Tensor(shape=arr.shape, data=arr.tobytes())


def from_tensor(tensor: lstm_pb2.Tensor) -> FloatArray:
    """Decodes without copying; the result is read-only and in native float32 byte order."""
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_RANK:
        raise TensorDecodeError(f"tensor of rank {len(shape)}; at most {MAX_RANK} dimensions are accepted")
    expected = 4 * math.prod(shape)
    if len(tensor.data) != expected:
        raise TensorDecodeError(
            f"tensor of shape {list(shape)} needs {expected} bytes of float32, got {len(tensor.data)}"
        )
    try:
        arr = np.frombuffer(tensor.data, dtype=WIRE_DTYPE).reshape(shape)
    except ValueError:  # e.g. [0, 2**32-1, 2**32-1]: no bytes, yet a shape numpy cannot represent
        raise TensorDecodeError(f"tensor of shape {list(shape)} is not representable") from None
    return arr.astype(np.float32, copy=False)

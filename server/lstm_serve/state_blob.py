"""A session's state as a portable, model-pinned blob (ExportSession / ImportSession).

Layout, version 1 (all integers little-endian):

    magic          8 bytes   b"\\x89LSTMST\\n"  (a non-ASCII first byte and a newline: text tools and foreign files
                                              never start this way)
    version        u16       1
    header_len     u32       length of the header, at most 4096
    header         JSON      UTF-8: model, version, fingerprint (sha256 of the weights and normalisation, hex),
                             num_layers, hidden_size, dtype ("<f4"), seq, steps
    state          float32   h then c, shape (2, num_layers, hidden_size), C order
    checksum       32 bytes  sha256 of everything before it

A blob is refused as InvalidInput when it is not one (magic), of a format this server does not read, corrupt or
truncated (checksum, lengths), and as StateMismatch by the data plane when it belongs to another model.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

from lstm_serve.errors import InvalidInput

MAGIC = b"\x89LSTMST\n"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 4096
_PREFIX = struct.Struct("<8sHI")
_CHECKSUM_BYTES = 32
DTYPE = "<f4"


@dataclass(frozen=True, slots=True)
class BlobHeader:
    model: str
    version: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    dtype: str
    seq: int
    steps: int

    @property
    def state_bytes(self) -> int:
        return 2 * self.num_layers * self.hidden_size * 4


def encode(header: BlobHeader, state: bytes) -> bytes:
    if len(state) != header.state_bytes:
        raise ValueError(f"state of {len(state)} bytes for a header declaring {header.state_bytes}")
    meta = json.dumps(asdict(header), sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(meta)) + meta + state
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes) -> tuple[BlobHeader, bytes]:
    """The header and the raw state bytes of a blob, or InvalidInput saying what is wrong with it."""
    if len(blob) < len(MAGIC) or blob[: len(MAGIC)] != MAGIC:
        raise InvalidInput("not an lstm-serve session state (wrong magic bytes)")
    if len(blob) < _PREFIX.size + _CHECKSUM_BYTES:
        raise InvalidInput(f"session state truncated ({len(blob)} bytes)")
    _, version, header_len = _PREFIX.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise InvalidInput(f"session state format version {version}; this server reads version {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len + _CHECKSUM_BYTES > len(blob):
        raise InvalidInput(f"session state truncated or corrupt (header of {header_len} bytes in {len(blob)})")
    body, checksum = blob[:-_CHECKSUM_BYTES], blob[-_CHECKSUM_BYTES:]
    if hashlib.sha256(body).digest() != checksum:
        raise InvalidInput("session state corrupt or truncated (checksum mismatch)")
    header = _header(blob[_PREFIX.size : _PREFIX.size + header_len])
    state = body[_PREFIX.size + header_len :]
    if len(state) != header.state_bytes:
        raise InvalidInput(f"session state holds {len(state)} state bytes; its header declares {header.state_bytes}")
    return header, state


def _header(data: bytes) -> BlobHeader:
    try:
        raw: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("session state header is not valid JSON") from None
    if not isinstance(raw, dict):
        raise InvalidInput("session state header is not a JSON object")
    types: dict[str, type] = {"model": str, "version": str, "fingerprint": str, "dtype": str}
    types.update(dict.fromkeys(("num_layers", "hidden_size", "seq", "steps"), int))
    missing = sorted(set(types) - set(raw))
    if missing:
        raise InvalidInput(f"session state header lacks {missing}")
    for key, kind in types.items():
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise InvalidInput(f"session state header: {key} has an invalid value")
    if raw["dtype"] != DTYPE:
        raise InvalidInput(f"session state dtype {raw['dtype'][:16]!r}; this server reads {DTYPE!r} (float32)")
    if not 0 < raw["num_layers"] <= 1024 or not 0 < raw["hidden_size"] <= 1 << 20:
        raise InvalidInput("session state header: num_layers or hidden_size out of range")
    return BlobHeader(**{key: raw[key] for key in types})

"""The memory store's sessions in a file, so that a restart of a single-process server loses nothing.

Written at shutdown, after the last call was answered, to a temporary file that is then renamed over the old one: a
crash while writing leaves the previous snapshot whole. The file is checked as a whole before anything is taken from
it (magic, format version, length, blake2b checksum), so a corrupt or foreign file is refused, never half-loaded.

Layout (little-endian): b"LSTMSNAP", u16 format version, u32 header length, header (JSON: when written, and each
model version's state shape and output size at the time), then the sessions and end reasons, then 32 bytes of blake2b
over everything before them. Format 2 adds the model version each session is pinned to (u32 after its fixed fields)
and keys the header's shapes by version; format 1 (before versions) is still read, its sessions pinned to version 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lstm_serve.engine.model import ModelInfo
from lstm_serve.sessions.memory import Ended
from lstm_serve.sessions.store import EndReason, Session

MAGIC = b"LSTMSNAP"
VERSION = 2
READS = (1, 2)
_CHECKSUM = 32
_HEAD = struct.Struct("<8sHI")
_SESSION_V1 = struct.Struct("<HHIdddQQ")  # id len, model len, record len, created, last used, ttl, seq, steps
_SESSION = struct.Struct("<HHIdddQQI")  # ... and the model version (format 2)
_ENDED = struct.Struct("<HHHd")  # id len, reason len, detail len, at


class SnapshotError(Exception):
    """The snapshot file cannot be used; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    written: float
    models: dict[tuple[str, int], tuple[list[int], int]]  # (name, version) -> (state shape, output size) when written
    sessions: list[Session]
    ended: list[tuple[str, Ended]]


def write(path: Path, sessions: list[Session], ended: list[tuple[str, Ended]], models: list[ModelInfo]) -> int:
    """Writes atomically; returns the bytes written."""
    header = json.dumps(
        {
            "written": time.time(),
            "versions": [[m.name, m.version, list(m.state_shape), m.output_size] for m in models],
            "sessions": len(sessions),
            "ended": len(ended),
        }
    ).encode()
    parts = [_HEAD.pack(MAGIC, VERSION, len(header)), header]
    for s in sessions:
        sid, model = s.id.encode(), s.model.encode()
        fixed = _SESSION.pack(
            len(sid), len(model), len(s.record), s.created, s.last_used, s.idle_ttl, s.seq, s.steps, s.version
        )
        parts += (fixed, sid, model, s.record)
    for session_id, info in ended:
        sid, reason, detail = session_id.encode(), info.reason.value.encode(), info.detail.encode()
        parts += (_ENDED.pack(len(sid), len(reason), len(detail), info.at), sid, reason, detail)
    body = b"".join(parts)
    data = body + hashlib.blake2b(body, digest_size=_CHECKSUM).digest()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(data)


def check_writable(path: Path) -> None:
    """Raises OSError unless a snapshot can be written at `path` (its directory exists and takes a new file)."""
    probe = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.probe")
    probe.write_bytes(b"")
    probe.unlink()


def read(path: Path) -> Snapshot:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror}") from None
    refuse = f"snapshot {path} is not usable"
    advice = "move it away to start without its sessions"
    if len(data) < _HEAD.size + _CHECKSUM or data[:8] != MAGIC:
        raise SnapshotError(f"{refuse}: not an lstm-serve snapshot; {advice}")
    _, version, header_len = _HEAD.unpack_from(data)
    if version not in READS:
        raise SnapshotError(f"{refuse}: format version {version}, this server reads versions {READS}; {advice}")
    body, checksum = data[:-_CHECKSUM], data[-_CHECKSUM:]
    if hashlib.blake2b(body, digest_size=_CHECKSUM).digest() != checksum:
        raise SnapshotError(f"{refuse}: checksum mismatch (truncated or corrupt); {advice}")
    try:
        header = json.loads(body[_HEAD.size : _HEAD.size + header_len])
        records = _Reader(body, _HEAD.size + header_len, version)
        sessions = [records.session() for _ in range(int(header["sessions"]))]
        ended = [records.ended() for _ in range(int(header["ended"]))]
        if records.offset != len(body):
            raise ValueError("trailing bytes")
        if version == 1:
            models = {(name, 1): (list(shape), int(out)) for name, (shape, out) in header["models"].items()}
        else:
            models = {(str(n), int(v)): (list(shape), int(out)) for n, v, shape, out in header["versions"]}
        return Snapshot(float(header["written"]), models, sessions, ended)
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise SnapshotError(f"{refuse}: malformed content ({exc}); {advice}") from None


class _Reader:
    def __init__(self, data: bytes, offset: int, version: int) -> None:
        self.data = data
        self.offset = offset
        self.fixed = _SESSION if version >= 2 else _SESSION_V1

    def _take(self, n: int) -> bytes:
        chunk = self.data[self.offset : self.offset + n]
        if len(chunk) != n:
            raise ValueError("truncated record")
        self.offset += n
        return chunk

    def _strings(self, *lengths: int) -> Iterator[bytes]:
        for n in lengths:
            yield self._take(n)

    def session(self) -> Session:
        id_len, model_len, rec_len, created, used, ttl, seq, steps, *pin = self.fixed.unpack(
            self._take(self.fixed.size)
        )
        sid, model, record = self._strings(id_len, model_len, rec_len)
        version = pin[0] if pin else 1  # format 1: before versions, every model was version 1
        return Session(sid.decode(), model.decode(), record, created, used, ttl, seq, steps, version=version)

    def ended(self) -> tuple[str, Ended]:
        id_len, reason_len, detail_len, at = _ENDED.unpack(self._take(_ENDED.size))
        sid, reason, detail = self._strings(id_len, reason_len, detail_len)
        return sid.decode(), Ended(EndReason(reason.decode()), at, detail.decode())

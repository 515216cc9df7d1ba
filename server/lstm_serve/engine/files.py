"""The one gate every model file passes before anything reads it: model.toml, npz and ONNX weights, ONNX external
data, and the sources `convert` reads.

A model repository is written by operators and filled with artifacts made elsewhere, so a typo or a poisoned file
must cost one model, with a short reason, and never the server:

- only regular files are opened: opening a FIFO blocks forever, and a device (/dev/zero) never ends;
- a file a model.toml names must stay inside the model's directory once links are resolved: otherwise a typo or a
  planted link serves a file nobody put in the repository (and tells clients which paths exist on the server);
- what is read is bounded: a model.toml is small, and the arrays of one model may declare MAX_MODEL_BYTES at most,
  checked from the headers before any data is read.

Each refusal is a ModelLoadError with two texts: the message for the operator (paths, what the path resolved to),
and `public`, the short reason a client may see, with no server path in it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from lstm_serve.errors import ModelLoadError

MAX_CONFIG_BYTES = 1 << 20  # a model.toml: a few keys and at most a few thousand normalisation numbers
# Everything one model may make the server read into memory: arrays declared by an npz, an ONNX graph with its
# external data. Far above any LSTM this server is meant for (500 M float32 parameters), far below what would hurt.
MAX_MODEL_BYTES = 2 << 30

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def human(size: int) -> str:
    """1536 -> '1.5 KiB', 2 << 30 -> '2 GiB': sizes in messages, readable whatever their scale."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f}".removesuffix(".0") + f" {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def one_line(text: str, limit: int = 400) -> str:
    """A library's message (ONNX Runtime's spans lines) as one line of at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def refuse(path: Path, what: str, problem: str, detail: str = "") -> ModelLoadError:
    """The error for `path` (the `what` of a model: "weights file", "model.toml"): the operator's message names the
    path and `detail`; the client's is only `what: problem`."""
    label = str(path) if path.name == what else f"{path} ({what})"
    return ModelLoadError(f"{label}: {problem}{detail}", public=f"{what}: {problem}")


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def check_file(path: Path, within: Path | None, what: str, limit: int) -> tuple[Path, os.stat_result]:
    """Resolves `path` and refuses it unless it is a regular file of at most `limit` bytes, inside `within` after
    every link is followed (when `within` is given). Returns the resolved path and its stat. Opens nothing."""
    try:
        resolved = path.resolve()
        if within is not None:
            base = within.resolve()
            if not resolved.is_relative_to(base):
                raise refuse(path, what, "outside the model directory", f" ({resolved} is not under {base})")
        info = os.stat(resolved)
    except FileNotFoundError:
        raise refuse(path, what, "no such file") from None
    except (OSError, RuntimeError) as exc:  # a link loop (RuntimeError before Python 3.13), no permission, ...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise refuse(path, what, f"cannot be read ({reason})") from None
    if not stat.S_ISREG(info.st_mode):
        raise refuse(path, what, f"not a regular file ({_kind(info.st_mode)})")
    if info.st_size > limit:
        raise refuse(path, what, f"larger than the {human(limit)} limit", f" ({human(info.st_size)})")
    return resolved, info


@contextmanager
def open_model_file(path: Path, within: Path | None, what: str, limit: int) -> Iterator[BinaryIO]:
    """`path` opened for reading after check_file. The open itself never blocks and never follows a link, and the
    opened file must be the one checked: a file swapped for a FIFO or a link in between is refused, not read."""
    resolved, checked = check_file(path, within, what, limit)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        raise refuse(path, what, f"cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            raise refuse(path, what, "changed while being opened")
        os.set_blocking(fd, True)
        yield file


def read_model_file(path: Path, within: Path | None, what: str, limit: int) -> bytes:
    """The whole of `path`, through open_model_file, and never more than `limit` bytes even if it grows meanwhile."""
    with open_model_file(path, within, what, limit) as file:
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise refuse(path, what, f"cannot be read ({exc.strerror})") from None
    if len(data) > limit:
        raise refuse(path, what, f"larger than the {human(limit)} limit")
    return data

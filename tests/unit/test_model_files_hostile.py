"""Hostile model files: an operator's typo or a poisoned artifact costs one model, with a one-line reason, never the
server, and never more memory or time than the model's declared size allows.

The hostile npz files are crafted here byte by byte (a zip of .npy headers that lie), so no test ever allocates or
writes the sizes those headers declare.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from lstm_serve import cli
from lstm_serve.convert.onnx_graph import onnx_from_weights
from lstm_serve.engine import repository
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.onnx_backend import OnnxBackend
from lstm_serve.engine.repository import Repository, load_model
from lstm_serve.engine.weights import ModelWeights
from lstm_serve.errors import ModelLoadError
from tests.golden import FIXTURES, write_model_dir

GOLDEN = FIXTURES / "golden_l3_head.npz"  # I = 4, H = 8, L = 3, O = 2
TIB = 1 << 40


# --- builders -----------------------------------------------------------------------------------------------------


def npy(shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"") -> bytes:
    """An .npy file: a real header declaring `shape`, followed by whatever `data` is given (it may lie)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def golden_members() -> dict[str, bytes]:
    """The members of a valid npz (the golden_l3_head model), as raw .npy bytes by member name."""
    with zipfile.ZipFile(GOLDEN) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(
    path: Path, members: dict[str, bytes] | list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED
) -> Path:
    items = list(members.items()) if isinstance(members, dict) else members
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests write on purpose
        with zipfile.ZipFile(path, "w", compression) as archive:
            for name, data in items:
                archive.writestr(name, data)
    return path


def huge_array_npz(path: Path) -> Path:
    """lstm.0.W_ih declares (2^20, 2^20) float32 = 4 TiB; the file holds only the header."""
    members = golden_members()
    members["lstm.0.W_ih.npy"] = npy((1 << 20, 1 << 20))
    return write_zip(path, members)


def corrupt_extra_key_npz(path: Path) -> Path:
    """A valid model plus an unknown key whose data fails its CRC: only a loader that reads it notices."""
    sentinel = b"\xab" * 64
    members = golden_members()
    members["extra.npy"] = npy((64,), "|u1", sentinel)
    write_zip(path, members)
    data = path.read_bytes()
    assert data.count(sentinel) == 1
    path.write_bytes(data.replace(sentinel, b"\xcd" * 64))
    return path


def zeros_bomb_npz(path: Path, megabytes: int = 64) -> Path:
    """A valid model plus an unknown key of `megabytes` MiB of zeros, deflated to almost nothing."""
    members = golden_members()
    size = megabytes << 20
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        with archive.open("zeros.npy", "w", force_zip64=True) as member:
            member.write(npy((size,), "|u1"))
            chunk = bytes(1 << 20)
            for _ in range(megabytes):
                member.write(chunk)
    return path


def external_data_onnx(directory: Path, location: str = "weights.bin") -> Path:
    """An ONNX model (golden_l1_nohead) whose initializers live in an external data file `location`."""
    directory.mkdir(parents=True, exist_ok=True)
    model = onnx_from_weights(load_npz(FIXTURES / "golden_l1_nohead.npz"))
    onnx.save_model(
        model,
        str(directory / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    if location != "weights.bin":
        relocate_external_data(directory / "model.onnx", location)
    return directory / "model.onnx"


def relocate_external_data(model_path: Path, location: str) -> None:
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def onnx_model_dir(root: Path, name: str, weights: str = "model.onnx") -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.toml").write_text(f'backend = "onnx"\nweights = "{weights}"\n')
    return directory


def npz_model_dir(root: Path, name: str, weights: str, extra: str = "") -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.toml").write_text(f'{extra}weights = "{weights}"\n')
    return directory


def refusal(path: Path, directory: Path | None = None) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as err:
        load_npz(path) if directory is None else load_npz(path, directory)
    return err.value


# --- 1, 2: npz declared sizes, names and members, checked before any data is read ---------------------------------


def test_an_array_declaring_4_tib_is_refused_without_allocating(tmp_path: Path) -> None:
    error = refusal(huge_array_npz(tmp_path / "m.npz"))
    assert "lstm.0.W_ih declares shape (1048576, 1048576) float32 = 4 TiB" in error.message
    assert "2 GiB" in error.public
    assert str(tmp_path) not in error.public


def test_shapes_whose_total_passes_the_budget_are_refused(tmp_path: Path) -> None:
    members = golden_members()
    members["lstm.0.W_ih.npy"] = npy((32, 1 << 26))  # 8 GiB, consistent with H = 8 and a huge input
    error = refusal(write_zip(tmp_path / "m.npz", members))
    assert "8 GiB" in error.message


def test_unknown_keys_are_refused_before_any_array_is_read(tmp_path: Path) -> None:
    error = refusal(corrupt_extra_key_npz(tmp_path / "m.npz"))
    assert "unknown keys ['extra']" in error.message


def test_a_deflated_zeros_bomb_under_an_unknown_key_costs_no_memory(tmp_path: Path) -> None:
    path = zeros_bomb_npz(tmp_path / "bomb.npz")
    assert path.stat().st_size < 1 << 20  # 64 MiB of zeros, deflated
    tracemalloc.start()
    try:
        error = refusal(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "unknown keys ['zeros']" in error.message
    assert peak < 4 << 20


def test_a_declared_shape_the_format_does_not_expect_is_refused_before_reading(tmp_path: Path) -> None:
    members = golden_members()
    sentinel = b"\xab" * 64
    members["lstm.1.W_hh.npy"] = npy((32, 4096), "<f4", bytes(32 * 4096 * 4 - 64) + sentinel)
    path = write_zip(tmp_path / "m.npz", members)
    path.write_bytes(path.read_bytes().replace(sentinel, b"\xcd" * 64))  # the data's end fails the zip's CRC
    assert "lstm.1.W_hh has shape (32, 4096), expected (32, 8)" in refusal(path).message


def test_a_non_float_dtype_is_refused_from_the_header(tmp_path: Path) -> None:
    members = golden_members()
    members["lstm.0.W_hh.npy"] = npy((32, 8), "<i4", bytes(32 * 8 * 4))
    assert (
        "lstm.0.W_hh has dtype int32, expected a float type" in refusal(write_zip(tmp_path / "m.npz", members)).message
    )


def test_object_arrays_are_refused_from_the_header(tmp_path: Path) -> None:
    members = golden_members()
    members["meta.input_features.npy"] = npy((4,), "|O", b"\x80\x04pickle")
    error = refusal(write_zip(tmp_path / "m.npz", members))
    assert "meta.input_features holds Python objects" in error.message


def test_members_that_are_not_npy_arrays_are_refused(tmp_path: Path) -> None:
    members = golden_members()
    members["notes.txt"] = b"hello"
    assert "member 'notes.txt' is not an .npy array" in refusal(write_zip(tmp_path / "m.npz", members)).message


def test_duplicate_members_are_refused(tmp_path: Path) -> None:
    members = list(golden_members().items())
    members.append(("lstm.0.W_ih.npy", dict(members)["lstm.0.W_ih.npy"]))  # same name twice: which one is served?
    assert "duplicate member 'lstm.0.W_ih.npy'" in refusal(write_zip(tmp_path / "m.npz", members)).message


@pytest.mark.parametrize("extra", [1 << 20, -4])
def test_a_member_whose_zip_size_disagrees_with_its_header_is_refused(tmp_path: Path, extra: int) -> None:
    """A compression bomb hides behind a small header: the size the zip declares must be exactly the array's."""
    members = golden_members()
    good = members["lstm.0.b_ih.npy"]
    members["lstm.0.b_ih.npy"] = good + bytes(extra) if extra > 0 else good[:extra]
    error = refusal(write_zip(tmp_path / "m.npz", members, zipfile.ZIP_DEFLATED))
    assert "lstm.0.b_ih: the zip declares" in error.message


def test_negative_dimensions_are_refused(tmp_path: Path) -> None:
    members = golden_members()
    members["lstm.0.b_ih.npy"] = npy((-32,))
    assert "negative dimension" in refusal(write_zip(tmp_path / "m.npz", members)).message


def test_a_valid_deflated_npz_still_loads(tmp_path: Path) -> None:
    weights = write_zip(tmp_path / "m.npz", golden_members(), zipfile.ZIP_DEFLATED)
    assert load_npz(weights).num_layers == 3


# --- 3: files that are not regular files are refused before they are opened -----------------------------------------


@pytest.mark.timeout(20)  # before the fix, opening the FIFO blocked forever
def test_a_fifo_as_weights_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.npz")
    directory = tmp_path / "fifo"
    directory.mkdir()
    os.mkfifo(directory / "w.npz")
    (directory / "model.toml").write_text('weights = "w.npz"\n')
    with pytest.raises(ModelLoadError) as err:
        load_model(directory)
    assert err.value.public == "weights file: not a regular file (a FIFO)"
    assert refusal(tmp_path / "m.npz").public == "weights file: not a regular file (a FIFO)"


def test_a_directory_a_socket_or_a_device_as_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.npz").mkdir()
    assert refusal(tmp_path / "d.npz").public == "weights file: not a regular file (a directory)"
    assert refusal(Path("/dev/zero")).public == "weights file: not a regular file (a character device)"
    sock = socket.socket(socket.AF_UNIX)
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)  # a socket path must be short
        sock.bind("s.npz")
        assert refusal(Path("s.npz")).public == "weights file: not a regular file (a socket)"
    finally:
        os.chdir(cwd)
        sock.close()


@pytest.mark.timeout(20)
def test_a_fifo_as_onnx_model_or_external_data_is_refused_without_blocking(tmp_path: Path) -> None:
    directory = onnx_model_dir(tmp_path, "fifo_model")
    os.mkfifo(directory / "model.onnx")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_model(directory)
    external = onnx_model_dir(tmp_path, "fifo_data")
    external_data_onnx(external)
    (external / "weights.bin").unlink()
    os.mkfifo(external / "weights.bin")
    with pytest.raises(ModelLoadError) as err:
        load_model(external)
    assert err.value.public == "ONNX external data file: not a regular file (a FIFO)"


def test_onnx_external_data_inside_the_directory_loads(tmp_path: Path) -> None:
    directory = onnx_model_dir(tmp_path, "ok")
    external_data_onnx(directory)
    assert load_model(directory).info.hidden_size == 5
    (directory / "data").mkdir()
    (directory / "weights.bin").rename(directory / "data" / "w.bin")
    relocate_external_data(directory / "model.onnx", "data/w.bin")
    assert load_model(directory).info.hidden_size == 5


# --- 4: every file a model.toml names stays inside its directory ----------------------------------------------------


def _outside_weights(tmp_path: Path) -> Path:
    outside = tmp_path / "elsewhere" / "w.npz"
    outside.parent.mkdir()
    outside.write_bytes(GOLDEN.read_bytes())
    return outside


def test_weights_outside_the_model_directory_are_refused(tmp_path: Path) -> None:
    outside = _outside_weights(tmp_path)
    root = tmp_path / "models"
    npz_model_dir(root, "absolute", str(outside))
    npz_model_dir(root, "dotdot", "../../elsewhere/w.npz")
    npz_model_dir(root, "symlink", "w.npz")
    (root / "symlink" / "w.npz").symlink_to(outside)
    npz_model_dir(root, "dir_symlink", "sub/w.npz")
    (root / "dir_symlink" / "sub").symlink_to(outside.parent)
    npz_model_dir(root, "inside_link", "w.npz")  # a link that stays inside is fine
    (root / "inside_link" / "real.npz").write_bytes(GOLDEN.read_bytes())
    (root / "inside_link" / "w.npz").symlink_to("real.npz")
    repo = Repository.scan(root)
    assert list(repo.models) == ["inside_link"]
    assert repo.failures == dict.fromkeys(
        ("absolute", "dotdot", "symlink", "dir_symlink"), "weights file: outside the model directory"
    )


def test_a_model_directory_that_is_a_link_serves_its_own_files(tmp_path: Path) -> None:
    real = tmp_path / "store" / "m"
    write_model_dir(tmp_path / "store", "m", GOLDEN)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").symlink_to(real)
    assert list(Repository.scan(tmp_path / "models").models) == ["m"]


@pytest.mark.parametrize("location", ["../w.bin", "ABSOLUTE", "link.bin"])
def test_onnx_external_data_outside_the_directory_is_refused(tmp_path: Path, location: str) -> None:
    directory = onnx_model_dir(tmp_path, "m")
    external_data_onnx(directory)
    (directory / "weights.bin").rename(tmp_path / "w.bin")
    if location == "ABSOLUTE":
        location = str(tmp_path / "w.bin")
    if location == "link.bin":
        (directory / "link.bin").symlink_to(tmp_path / "w.bin")
    relocate_external_data(directory / "model.onnx", location)
    with pytest.raises(ModelLoadError) as err:
        load_model(directory)
    assert err.value.public == "ONNX external data file: outside the model directory"


def test_onnx_model_file_outside_the_directory_is_refused(tmp_path: Path) -> None:
    external_data_onnx(tmp_path / "elsewhere")
    directory = onnx_model_dir(tmp_path, "m", weights="../elsewhere/model.onnx")
    with pytest.raises(ModelLoadError) as err:
        load_model(directory)
    assert err.value.public == "weights file: outside the model directory"


# --- 5: clients get a short reason; the details and the paths go to the log -----------------------------------------


def test_failures_hold_short_reasons_and_the_log_the_details(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "models"
    root.mkdir()
    npz_model_dir(root, "huge", "w.npz")
    huge_array_npz(root / "huge" / "w.npz")
    npz_model_dir(root, "outside", "../huge/w.npz")
    npz_model_dir(root, "missing", "nowhere.npz")
    (root / "truncated").mkdir()
    (root / "truncated" / "w.npz").write_bytes(GOLDEN.read_bytes()[:500])
    npz_model_dir(root, "truncated", "w.npz")
    with caplog.at_level(logging.ERROR, logger="lstm_serve.engine.repository"):
        repo = Repository.scan(root)
    assert repo.failures == {
        "huge": repo.failures["huge"],
        "outside": "weights file: outside the model directory",
        "missing": "weights file: no such file",
        "truncated": repo.failures["truncated"],
    }
    assert repo.failures["huge"].startswith("invalid npz: lstm.0.W_ih declares shape (1048576, 1048576) float32")
    assert repo.failures["truncated"].startswith("invalid npz: not a readable npz file")
    for name, reason in repo.failures.items():
        assert str(tmp_path) not in reason, name
        assert "\n" not in reason
        logged = [r.getMessage() for r in caplog.records if getattr(r, "model", None) == name]
        assert len(logged) == 1, (name, logged)  # logged once, with the details
        assert str(root / name) in logged[0]


def test_a_loader_bug_costs_one_model_not_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model_dir(tmp_path, "good", GOLDEN)
    write_model_dir(tmp_path, "bad", FIXTURES / "golden_l1_nohead.npz")
    real = load_npz

    def exploding(path: Path, directory: Path | None = None) -> ModelWeights:
        if "bad" in path.parts:
            raise MemoryError("Unable to allocate 4.00 TiB")
        return real(path, directory)

    monkeypatch.setattr(repository, "load_npz", exploding)
    repo = Repository.scan(tmp_path)
    assert list(repo.models) == ["good"]
    assert repo.failures == {"bad": "internal error while loading the model (details in the server log)"}


# --- 6: two directories claiming one name: neither is served ---------------------------------------------------------


def test_a_name_claimed_by_two_directories_serves_neither(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for directory in ("a", "b"):
        write_model_dir(tmp_path, directory, GOLDEN)
        (tmp_path / directory / "model.toml").write_text('name = "x"\nweights = "golden_l3_head.npz"\n')
    write_model_dir(tmp_path, "x", FIXTURES / "golden_l1_nohead.npz")  # claims "x" by its directory name
    write_model_dir(tmp_path, "other", FIXTURES / "golden_l1_nohead.npz")
    with caplog.at_level(logging.ERROR, logger="lstm_serve.engine.repository"):
        repo = Repository.scan(tmp_path)
    assert list(repo.models) == ["other"]
    assert repo.failures == {
        "a": "name conflict with directory 'b', 'x': each claims the model name 'x'",
        "b": "name conflict with directory 'a', 'x': each claims the model name 'x'",
        "x": "name conflict with directory 'a', 'b': each claims the model name 'x'",
    }
    assert sum("name conflict" in r.getMessage() for r in caplog.records) == 3


# --- 7: model.toml itself ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_hostile_model_toml_files_are_refused_with_a_reason(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "huge", GOLDEN)
    with (tmp_path / "huge" / "model.toml").open("a") as f:
        f.write(("# " + "x" * 1000 + "\n") * 1100)  # 1.1 MB of comments
    write_model_dir(tmp_path, "latin1", GOLDEN)
    (tmp_path / "latin1" / "model.toml").write_bytes(b'description = "caf\xe9"\nweights = "golden_l3_head.npz"\n')
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "model.toml")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "model.toml").mkdir()
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "model.toml").symlink_to("nowhere.toml")
    write_model_dir(tmp_path, "outside", GOLDEN)
    (tmp_path / "outside" / "model.toml").rename(tmp_path / "outside.toml")
    (tmp_path / "outside" / "model.toml").symlink_to(tmp_path / "outside.toml")
    repo = Repository.scan(tmp_path)
    assert repo.models == {}
    assert repo.failures == {
        "huge": "model.toml: larger than the 1 MiB limit",
        "latin1": "model.toml: not UTF-8 text (byte 0xe9 at offset 18)",
        "fifo": "model.toml: not a regular file (a FIFO)",
        "dir": "model.toml: not a regular file (a directory)",
        "dangling": "model.toml: no such file",
        "outside": "model.toml: outside the model directory",
    }


# --- 8: the command line: one line, exit code 1, no traceback ---------------------------------------------------------


@pytest.fixture
def hostile_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    return {
        "huge": huge_array_npz(tmp_path / "huge.npz"),
        "extra": corrupt_extra_key_npz(tmp_path / "extra.npz"),
        "fifo": fifo,
        "device": Path("/dev/zero"),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["huge", "extra", "fifo", "device"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_the_cli_reports_hostile_files_in_one_line(
    hostile_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    argv = [command, str(hostile_files[case])]
    if command == "convert":
        argv += [str(tmp_path / "out"), "--from", "npz"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"lstm-serve {command}: ")
    assert "Traceback" not in captured.err


def test_inspect_of_a_model_directory_with_a_hostile_model_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.toml").write_bytes(b"\xff\xfe")
    assert cli.main(["inspect", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lstm-serve inspect: ")
    assert "not UTF-8" in err
    assert len(err.splitlines()) == 1


def test_convert_bounds_what_it_reads_from_a_keras_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lstm_serve.engine import files

    monkeypatch.setattr(files, "MAX_MODEL_BYTES", 64 << 10)
    with zipfile.ZipFile(tmp_path / "m.keras", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", bytes(1 << 20))
    assert cli.main(["convert", str(tmp_path / "m.keras"), str(tmp_path / "out")]) == 1
    assert "model.weights.h5 is 1 MiB; the limit is 64 KiB" in capsys.readouterr().err


def test_onnx_backend_reads_through_the_checks(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m.onnx")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        OnnxBackend(tmp_path / "m.onnx")

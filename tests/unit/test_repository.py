"""The model repository: good models load, each broken one is reported with its reason and skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from lstm_serve.engine.repository import Repository
from tests.golden import FIXTURES, REPO, write_model_dir


def test_broken_models_do_not_stop_the_others(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "good", FIXTURES / "golden_l3_head.npz")
    write_model_dir(tmp_path, "missing_file", tmp_path / "nowhere.npz")
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "w.npz").write_bytes((FIXTURES / "golden_l3_head.npz").read_bytes()[:500])
    (tmp_path / "truncated" / "model.toml").write_text('weights = "w.npz"\n')
    (tmp_path / "bad_toml").mkdir()
    (tmp_path / "bad_toml" / "model.toml").write_text("weights = \n")
    (tmp_path / "typo").mkdir()
    (tmp_path / "typo" / "model.toml").write_text('weigths = "w.npz"\n')
    (tmp_path / "no_backend").mkdir()
    (tmp_path / "no_backend" / "model.toml").write_text('weights = "w.npz"\nbackend = "tensorflow"\n')
    (tmp_path / "not_a_model").mkdir()  # no model.toml: not part of the repository

    repo = Repository.scan(tmp_path)

    assert list(repo.models) == ["good"]
    assert set(repo.failures) == {"missing_file", "truncated", "bad_toml", "typo", "no_backend"}
    assert "no such file" in repo.failures["missing_file"]
    assert "not a readable npz file" in repo.failures["truncated"]
    assert "unknown keys ['weigths']" in repo.failures["typo"]
    assert "unknown backend 'tensorflow'" in repo.failures["no_backend"]


def test_only_selected_models_load(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "a", FIXTURES / "golden_l3_head.npz")
    write_model_dir(tmp_path, "b", FIXTURES / "golden_l1_nohead.npz")
    repo = Repository.scan(tmp_path, frozenset({"b", "c"}))
    assert list(repo.models) == ["b"]
    assert repo.failures == {"c": "no c/model.toml found"}  # the log names the directory searched; clients not


def test_missing_repository_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    repo = Repository.scan(tmp_path / "absent")
    assert repo.models == {}
    assert "does not exist" in next(iter(repo.failures.values()))


def test_bundled_demo_model_loads() -> None:
    repo = Repository.scan(REPO / "models")
    assert repo.failures == {}
    info = repo.models["elnino"].info
    assert (info.input_size, info.output_size, info.normalized) == (1, 1, True)
    assert info.input_features == ("sst_c",)


@pytest.mark.parametrize("name", ["x", "golden"])
def test_name_defaults_to_the_directory(tmp_path: Path, name: str) -> None:
    write_model_dir(tmp_path, name, FIXTURES / "golden_l1_nohead.npz")
    assert list(Repository.scan(tmp_path).models) == [name]

"""The versioned model repository, read without a server: layouts, the version policy, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lstm_serve.engine.repository import Repository, VersionPolicy, next_version
from tests.golden import FIXTURES

WEIGHTS = FIXTURES / "golden_l1_nohead.npz"


def version(directory: Path, toml: str = 'weights = "w.npz"\n') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(WEIGHTS, directory / "w.npz")
    (directory / "model.toml").write_text(toml)
    return directory


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ("latest", VersionPolicy("latest", 1)),
        ("latest:3", VersionPolicy("latest", 3)),
        ("all", VersionPolicy("all")),
        ("specific:3,1,3", VersionPolicy("specific", versions=(1, 3))),
    ],
)
def test_policies_parse(spec: str, policy: VersionPolicy) -> None:
    assert VersionPolicy.parse(spec) == policy
    assert VersionPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("spec", ["latest:0", "newest", "all:2", "specific:", "specific:0", "specific:a"])
def test_bad_policies_are_refused_with_the_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="latest:N"):
        VersionPolicy.parse(spec)


def test_versions_and_policies(tmp_path: Path) -> None:
    for v in (1, 2, 10):
        version(tmp_path / "m" / str(v))
    (tmp_path / "m" / "notes").mkdir()  # not a version: ignored
    assert {n: sorted(v) for n, v in Repository.scan(tmp_path).versions.items()} == {"m": [10]}
    repo = Repository.scan(tmp_path, policy=VersionPolicy.parse("latest:2"))
    assert sorted(repo.versions["m"]) == [2, 10]
    assert repo.models["m"].info.version == 10
    repo = Repository.scan(tmp_path, policy=VersionPolicy.parse("specific:1,7"))
    assert sorted(repo.versions["m"]) == [1]
    assert "version 7" in repo.failures["m/7"]
    assert next_version(tmp_path / "m") == 11
    assert next_version(tmp_path / "new") == 1


def test_a_broken_latest_version_leaves_the_one_below_serving(tmp_path: Path) -> None:
    version(tmp_path / "m" / "1")
    (version(tmp_path / "m" / "2") / "w.npz").write_bytes(b"not an npz")
    repo = Repository.scan(tmp_path)
    assert sorted(repo.versions["m"]) == [1]
    assert "m/2" in repo.failures


def test_flat_layout_beside_versions_and_the_model_level_policy(tmp_path: Path) -> None:
    version(tmp_path / "m", 'weights = "w.npz"\nversion_policy = "all"\n')  # flat: version 1
    version(tmp_path / "m" / "2")
    repo = Repository.scan(tmp_path)
    assert sorted(repo.versions["m"]) == [1, 2]
    version(tmp_path / "m" / "1")  # version 1 twice
    repo = Repository.scan(tmp_path)
    assert sorted(repo.versions["m"]) == [2]
    assert "both the flat model.toml and directory 1/" in repo.failures["m/1"]


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('weights = "w.npz"\nversion = 3\n', "'version' is 3 but the file is in version directory 2"),
        ('weights = "w.npz"\nname = "other"\n', "belongs to model 'm'"),
        ('weights = "w.npz"\nversion_policy = "all"\n', "unknown keys ['version_policy']"),
    ],
)
def test_a_version_model_toml_must_agree_with_its_place(tmp_path: Path, toml: str, problem: str) -> None:
    version(tmp_path / "m" / "2", toml)
    repo = Repository.scan(tmp_path)
    assert repo.models == {}
    assert problem in repo.failures["m/2"]


def test_model_level_toml_takes_only_model_keys_and_flat_versions_are_integers(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.toml").write_text('backend = "numpy"\n')  # no weights, but a version beside it
    version(tmp_path / "a" / "1")
    version(tmp_path / "b", 'weights = "w.npz"\nversion = "2024.1"\n')
    repo = Repository.scan(tmp_path)
    assert sorted(repo.versions["a"]) == [1]  # the versions serve; the model-level file is reported
    assert "takes only" in repo.failures["a"]
    assert "positive integer" in repo.failures["b"]

"""The model repository: one directory per model; in it, one directory per version (an integer, like Triton's and
TF Serving's), each with a model.toml beside its artifact. A model.toml directly in the model's directory (the flat
layout, from before versions) is one more version: the one its `version` key names, 1 by default.

    models/elnino/model.toml   flat: version 1        models/macro/model.toml     model-level: no `weights`,
    models/elnino/elnino.npz                          models/macro/1/model.toml   only name, description,
    models/elnino/2/model.toml version 2 beside it    models/macro/1/model.onnx   version_policy
    models/elnino/2/elnino.npz                        models/macro/2/...

A version's model.toml:                               model-level keys (flat or model-level model.toml only):
    backend = "numpy"      # the default                  version_policy = "latest:2"  # "latest[:N]", "all",
    weights = "elnino.npz"                                                              # "specific:1,3"
    input_features, output_features, [normalization], [onnx] for an ONNX graph (an npz carries its own)

Which versions are served is the version policy (Triton's `version_policy`): the model's own, else the server's
--version-policy (default "latest:1"). "latest:N" serves the N highest versions that load: a version that fails is
reported and the next one down serves in its place, so a broken new version never takes a model away.

A model or version that fails to load is reported with the reason and skipped; the others still serve. Every file is
read through engine/files.py: regular files only, inside the model's directory, of bounded size. Clients see a short
reason per failed directory (`failures`, keyed "model" or "model/version"); the details, with the paths, are logged
once, at load, with the model's name.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lstm_serve.engine import files
from lstm_serve.engine.forecast import parse_forecast_table
from lstm_serve.engine.model import Model
from lstm_serve.engine.npz import load_npz
from lstm_serve.engine.numpy_backend import NumpyBackend
from lstm_serve.engine.onnx_backend import OnnxBackend, OnnxIO
from lstm_serve.engine.weights import ModelWeights, normalization_from
from lstm_serve.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_FILE = "model.toml"
BACKENDS = ("numpy", "onnx")
_MODEL_KEYS = {"name", "description", "version_policy"}  # of the model (flat or model-level model.toml)
_VERSION_KEYS = {"version", "description", "backend", "weights", "input_features", "output_features"}
_TABLES = {"normalization", "onnx", "forecast"}
_ONNX_KEYS = {"input", "h0", "c0", "output", "hn", "cn", "layout"}
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,8}")  # 1 .. 999999999, no leading zero: one spelling per version
MAX_VERSIONS = 1000  # version directories looked at per model (the highest ones)
MAX_FINGERPRINT_ENTRIES = 10_000  # files stat'ed per fingerprint: a huge directory costs a bounded scan
INTERNAL_FAILURE = "internal error while loading the model (details in the server log)"


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which of a model's versions are served (Triton's `version_policy`, TF Serving's `model_version_policy`):
    "latest:N" (the N highest that load; "latest" = "latest:1"), "all", or "specific:1,3"."""

    kind: Literal["latest", "all", "specific"] = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> VersionPolicy:
        kind, _, arg = spec.strip().partition(":")
        try:
            if kind == "latest":
                count = int(arg) if arg else 1
                if count >= 1:
                    return cls("latest", count)
            elif kind == "all" and not arg:
                return cls("all")
            elif kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if versions and min(versions) >= 1:
                    return cls("specific", versions=versions)
        except ValueError:
            pass
        raise ValueError(f"version policy {spec!r}: expected 'latest', 'latest:N' (N >= 1), 'all' or 'specific:1,3'")

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        return "all" if self.kind == "all" else "specific:" + ",".join(map(str, self.versions))


def _refusal(path: Path, problem: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {problem}", public=files.one_line(f"{CONFIG_FILE}: {problem}"))


def read_table(directory: Path) -> dict[str, Any]:
    """`directory`/model.toml as a TOML table, read through the gate of model files."""
    path = directory / CONFIG_FILE
    data = files.read_model_file(path, directory, CONFIG_FILE, files.MAX_CONFIG_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refusal(path, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _refusal(path, f"invalid TOML: {exc}") from None


def _version_number(value: object) -> int | None:
    """A `version` key's value as a version number: a positive integer, written as a number or a string."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    return int(text) if _VERSION_DIR.fullmatch(text.strip()) else None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    version: int
    description: str
    backend: str
    weights: Path
    input_features: tuple[str, ...] = ()
    output_features: tuple[str, ...] = ()
    normalization: dict[str, list[float]] = field(default_factory=dict)
    onnx: dict[str, str] = field(default_factory=dict)
    forecast: dict[str, Any] = field(default_factory=dict)  # [forecast]: checked against the model at load

    @classmethod
    def read(cls, directory: Path, *, name: str | None = None, version: int | None = None) -> ModelConfig:
        """The version of `directory`/model.toml. `version`: the number of its version directory (None: the flat
        layout, where the `version` key names it); `name`: the model's (None: the `name` key or the directory's)."""
        return cls.from_table(directory, read_table(directory), name=name, version=version)

    @classmethod
    def from_table(
        cls, directory: Path, raw: dict[str, Any], *, name: str | None = None, version: int | None = None
    ) -> ModelConfig:
        path = directory / CONFIG_FILE

        def error(problem: str) -> ModelLoadError:
            return _refusal(path, problem)

        allowed = _VERSION_KEYS | _TABLES | (_MODEL_KEYS if version is None else {"name"})
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise error(f"unknown keys {unknown}; allowed: {sorted(allowed)}")
        if version is not None and name is not None and str(raw.get("name", name)) != name:
            raise error(f"'name' is {raw['name']!r}, but the version belongs to model {name!r} (its directory)")
        if "weights" not in raw:
            raise error("missing key 'weights' (the artifact file, relative to the directory)")
        if not isinstance(raw["weights"], str) or not raw["weights"]:
            raise error("'weights' must be a file name, relative to the directory")
        number = _version_number(raw.get("version", version or 1))
        if number is None:
            raise error(f"'version' must be a positive integer (the version number), not {raw['version']!r}")
        if version is not None and number != version:
            raise error(f"'version' is {number} but the file is in version directory {version}")
        backend = str(raw.get("backend", "numpy"))
        if backend not in BACKENDS:
            raise error(f"unknown backend {backend!r}; available: {list(BACKENDS)}")
        onnx_table = raw.get("onnx", {})
        if set(onnx_table) - _ONNX_KEYS:
            raise error(f"unknown keys in [onnx] {sorted(set(onnx_table) - _ONNX_KEYS)}")
        forecast = raw.get("forecast", {})
        if not isinstance(forecast, dict):
            raise error("[forecast] must be a table (feedback = {input = output}, increments = {...})")
        norm = raw.get("normalization", {})
        if backend == "numpy" and (norm or onnx_table or "input_features" in raw or "output_features" in raw):
            raise error(
                "an npz model carries its normalisation and feature names itself (meta.* keys); "
                "remove them from model.toml (lstm-serve convert --input-mean ... writes them into the npz)"
            )
        try:
            normalization_from(norm, "[normalization]")  # the keys now; the values with the model's sizes
            stats = {k: [float(v) for v in norm[k]] for k in norm}
        except (ModelLoadError, TypeError, ValueError) as exc:
            raise error(exc.message if isinstance(exc, ModelLoadError) else f"[normalization]: {exc}") from None
        return cls(
            name=name if name is not None else str(raw.get("name", directory.name)),
            version=number,
            description=str(raw.get("description", "")),
            backend=backend,
            weights=directory / raw["weights"],
            input_features=tuple(str(f) for f in raw.get("input_features", [])),
            output_features=tuple(str(f) for f in raw.get("output_features", [])),
            normalization=stats,
            onnx={k: str(v) for k, v in onnx_table.items()},
            forecast=dict(forecast),
        )

    def onnx_io(self) -> OnnxIO:
        layout = self.onnx.get("layout", "batch_first")
        if layout not in ("batch_first", "seq_first"):
            raise ModelLoadError(f"[onnx] layout must be 'batch_first' or 'seq_first', not {layout!r}")
        names = {k: v for k, v in self.onnx.items() if k != "layout"}
        return OnnxIO(**names, batch_first=layout == "batch_first")


def load_model(directory: Path, onnx_threads: int = 1, config: ModelConfig | None = None) -> Model:
    """Loads the model of `directory` (with its model.toml already read into `config`, if given). Every file it
    names is confined to `directory`. Both backends end in Model.build: one check of the metadata, one ModelInfo."""
    if config is None:
        config = ModelConfig.read(directory)
    model = _load_model(directory, onnx_threads, config)
    if config.forecast:
        i = model.info
        try:
            links = parse_forecast_table(
                config.forecast, i.input_features, i.output_features, i.input_size, i.output_size
            )
        except ModelLoadError as exc:
            path = directory / CONFIG_FILE
            public = files.one_line(f"{CONFIG_FILE}: {exc.message}")
            raise ModelLoadError(f"{path}: {exc.message}", public=public) from None
        model.info = replace(model.info, feedback=links)
    return model


def _onnx_weights(path: Path) -> ModelWeights:
    """The weights inside an ONNX graph (for the gate computation only). Imported here, when first needed: the
    converters sit above the engine."""
    from lstm_serve.convert.onnx_graph import weights_from_onnx

    return weights_from_onnx(path)


def _load_model(directory: Path, onnx_threads: int, config: ModelConfig) -> Model:
    if config.backend == "numpy":
        weights = load_npz(config.weights, directory)
        return Model.from_weights(
            config.name, weights, NumpyBackend(weights), version=config.version, description=config.description
        )
    backend = OnnxBackend(config.weights, config.onnx_io(), threads=onnx_threads, within=directory)
    return Model.build(
        backend,
        name=config.name,
        version=config.version,
        description=config.description,
        sizes=(backend.input_size, backend.hidden_size, backend.num_layers, backend.output_size),
        parameters=backend.parameters,
        normalization=normalization_from(config.normalization, "[normalization]"),
        input_features=config.input_features,
        output_features=config.output_features,
        metadata_prefix="[normalization] ",
        weights=lambda: _onnx_weights(config.weights),
        fingerprint=backend.fingerprint,
    )


def _has_config(entry: Path) -> bool:
    """A directory with a model.toml of any kind: one that is a FIFO or a dangling link is refused with a reason,
    not skipped in silence. An entry that cannot even be examined is logged and skipped, not fatal to the rest."""
    try:
        return entry.is_dir() and os.path.lexists(entry / CONFIG_FILE)
    except OSError as exc:
        log.error("model repository entry %s skipped: %s", entry, exc.strerror)
        return False


def _version_dirs(directory: Path) -> dict[int, Path]:
    """The version directories of a model directory: integer names holding a model.toml (the highest MAX_VERSIONS)."""
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        log.error("model directory %s not read: %s", directory, exc.strerror)
        return found
    for entry in entries:
        if _VERSION_DIR.fullmatch(entry.name) and _has_config(Path(entry.path)):
            found[int(entry.name)] = Path(entry.path)
    return dict(sorted(found.items())[-MAX_VERSIONS:])


def fingerprint(directory: Path, *, files_only: bool = False) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a file of `directory` is written, replaced or removed: each entry's name, mtime, size and
    inode (at most MAX_FINGERPRINT_ENTRIES, in name order). No file is opened."""
    out: list[tuple[str, int, int, int]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if len(out) >= MAX_FINGERPRINT_ENTRIES:
                    break
                try:
                    st = entry.stat(follow_symlinks=True)
                except OSError:
                    out.append((entry.name, -1, -1, -1))
                    continue
                if files_only and entry.is_dir(follow_symlinks=True):
                    continue
                out.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
    except OSError:
        return (("", -1, -1, -1),)
    return tuple(sorted(out))


def tree_fingerprint(root: Path) -> tuple[object, ...]:
    """The repository's fingerprint for the file watch: the root, each model directory and each version directory
    (bounded: MAX_FINGERPRINT_ENTRIES each, MAX_VERSIONS version directories per model)."""
    top = fingerprint(root)
    out: list[object] = [top]
    for name, *_ in top:
        model_dir = root / name
        if not _is_dir(model_dir):
            continue
        out.append((name, fingerprint(model_dir)))
        out += [(name, v, fingerprint(path)) for v, path in _version_dirs(model_dir).items()]
    return tuple(out)


@dataclass(slots=True)
class ModelSource:
    """One model directory as found on disk: its name, its versions (version -> the directory with its model.toml),
    its own version policy, and the problems found before loading anything (key: "dir" or "dir/version")."""

    name: str
    directory: Path
    versions: dict[int, Path] = field(default_factory=dict)
    configs: dict[int, ModelConfig] = field(default_factory=dict)
    policy: VersionPolicy | None = None
    description: str = ""
    problems: dict[str, ModelLoadError] = field(default_factory=dict)

    def key(self, version: int) -> str:
        """The failure key of a version: its directory relative to the repository ("m" flat, "m/2")."""
        where = self.versions.get(version)
        return self.directory.name if where == self.directory else f"{self.directory.name}/{version}"


def _read_source(directory: Path) -> ModelSource:
    """A model directory: its model-level settings, its flat version (if any) and its version directories, each
    version's model.toml read (not its weights). Problems are collected, never raised."""
    source = ModelSource(name=directory.name, directory=directory)
    subdirs = _version_dirs(directory)
    flat: dict[str, Any] | None = None
    if os.path.lexists(directory / CONFIG_FILE):
        try:
            flat = read_table(directory)
        except ModelLoadError as exc:
            source.problems[directory.name] = exc
        if flat is not None:
            try:
                source.name = str(flat.get("name", directory.name))
                source.description = str(flat.get("description", ""))
                if "version_policy" in flat:
                    source.policy = VersionPolicy.parse(str(flat["version_policy"]))
                if (
                    "weights" in flat or not subdirs
                ):  # the flat layout (no weights and no versions: say what is missing)
                    config = ModelConfig.from_table(directory, flat)
                    source.versions[config.version] = directory
                    source.configs[config.version] = config
                elif set(flat) - _MODEL_KEYS:
                    raise _refusal(
                        directory / CONFIG_FILE,
                        f"a model-level model.toml (no 'weights': the versions are in subdirectories) takes only "
                        f"{sorted(_MODEL_KEYS)}, found {sorted(set(flat) - _MODEL_KEYS)}",
                    )
            except ModelLoadError as exc:
                source.problems[directory.name] = exc
            except ValueError as exc:
                source.problems[directory.name] = _refusal(directory / CONFIG_FILE, str(exc))
    for version, path in subdirs.items():
        key = f"{directory.name}/{version}"
        if version in source.versions:
            problem = f"version {version} is both the flat model.toml and directory {version}/; remove one"
            source.problems[key] = ModelLoadError(f"{path}: {problem}", public=problem)
            del source.versions[version], source.configs[version]
            continue
        try:
            source.configs[version] = ModelConfig.read(path, name=source.name, version=version)
            source.versions[version] = path
        except ModelLoadError as exc:
            source.problems[key] = exc
        except Exception:  # a case the reader did not foresee: still one version only
            log.exception("model %s version %s: unexpected error reading its model.toml", source.name, version)
            source.problems[key] = ModelLoadError(f"{path}: unexpected error", public=INTERNAL_FAILURE)
    return source


def discover(root: Path, only: Iterable[str] = ()) -> tuple[dict[str, ModelSource], dict[str, ModelLoadError]]:
    """Every model directory of `root` (or only those named in `only`), read but not loaded; two directories that
    claim one model name serve neither. Returns the sources by model name and the problems of the repository itself
    and of directories that failed as a whole, by directory name."""
    wanted = frozenset(only)
    problems: dict[str, ModelLoadError] = {}
    try:
        entries = sorted(p for p in root.iterdir() if _is_model_dir(p))
    except OSError as exc:
        problem = "does not exist" if not root.exists() else f"cannot be read ({exc.strerror})"
        problems[root.name or str(root)] = ModelLoadError(
            f"model directory {root} {problem}", public=f"the model repository {problem}"
        )
        return {}, problems
    sources = [_read_source(d) for d in entries if not wanted or d.name in wanted]
    claims: dict[str, list[ModelSource]] = defaultdict(list)
    for source in sources:
        claims[source.name].append(source)
    found: dict[str, ModelSource] = {}
    for name, claimants in claims.items():
        if len(claimants) == 1:
            found[name] = claimants[0]
            continue
        # whichever sorted first would otherwise win in silence, and clients would get another model than asked for
        for source in claimants:
            if not source.versions:  # already failed, with its own reasons
                problems.update(source.problems)
                continue
            others = ", ".join(repr(s.directory.name) for s in claimants if s is not source)
            problem = f"name conflict with directory {others}: each claims the model name {name!r}"
            problems[source.directory.name] = ModelLoadError(f"{source.directory}: {problem}", public=problem)
    seen = {d.name for d in entries}
    for name in sorted(wanted - seen):
        problems[name] = ModelLoadError(
            f"no {name}/{CONFIG_FILE} under {root}", public=f"no {name}/{CONFIG_FILE} found"
        )
    return found, problems


def _is_model_dir(entry: Path) -> bool:
    """A model directory: a model.toml in it, or at least one version directory."""
    return _has_config(entry) or (_is_dir(entry) and bool(_version_dirs(entry)))


def _is_dir(entry: Path) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


LoadVersion = Callable[[ModelSource, int], Model]


def select_versions(
    source: ModelSource, policy: VersionPolicy, load: LoadVersion
) -> tuple[dict[int, Model], dict[str, ModelLoadError | None]]:
    """Loads the versions `policy` serves, through `load` (which may hand back a version already loaded): returns
    them, and the failures by key (None: an unexpected error, logged by `load`'s caller). Under "latest:N" a version
    that fails is passed over for the next one down."""
    loaded: dict[int, Model] = {}
    failures: dict[str, ModelLoadError | None] = dict(source.problems)
    if policy.kind == "specific":
        candidates = list(policy.versions)
        for v in candidates:
            if v not in source.versions and f"{source.directory.name}/{v}" not in failures:
                problem = f"version {v} (version_policy {policy}) is not in the repository"
                failures[f"{source.directory.name}/{v}"] = ModelLoadError(
                    f"{source.directory}: {problem}", public=problem
                )
    else:
        candidates = sorted(source.versions, reverse=True)
    for version in candidates:
        if version not in source.versions:
            continue
        if policy.kind == "latest" and len(loaded) >= policy.count:
            break
        try:
            loaded[version] = load(source, version)
        except ModelLoadError as exc:
            failures[source.key(version)] = exc
        except Exception:  # a loader bug or a case it did not foresee (MemoryError...): still one version only
            log.exception("model %s version %d not loaded: unexpected error", source.name, version)
            failures[source.key(version)] = None
    return loaded, failures


def next_version(directory: Path) -> int:
    """The number `lstm-serve convert` gives a new version of the model in `directory`: one past the highest."""
    if not _is_dir(directory):
        return 1
    source = _read_source(directory)
    numbers = list(source.versions) + [int(k.rpartition("/")[2]) for k in source.problems if "/" in k]
    return max(numbers, default=0) + 1


def load_latest(directory: Path) -> Model:
    """The model of a version directory, or the highest version of a model directory (flat or versioned), as the
    server would load it (for `lstm-serve inspect`)."""
    source = _read_source(directory)
    if not source.versions:
        raise next(iter(source.problems.values()), None) or ModelLoadError(f"{directory}: no {CONFIG_FILE} found")
    return load_version(source, max(source.versions))


def load_version(source: ModelSource, version: int) -> Model:
    return load_model(source.versions[version], config=source.configs[version])


@dataclass(slots=True)
class Repository:
    """What a scan loaded: the served versions of each model, the latest of each in `models`, and the failures
    (key: the directory, "model" or "model/version") with the short reason a client may read."""

    models: dict[str, Model]
    failures: dict[str, str]
    versions: dict[str, dict[int, Model]] = field(default_factory=dict)
    policies: dict[str, VersionPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, model in self.models.items():  # a repository built by hand: its models are their own versions
            self.versions.setdefault(name, {model.info.version: model})

    def fail(self, key: str, exc: ModelLoadError | None) -> None:
        """Logs the details once and keeps the short reason: clients never see the server's paths."""
        if exc is None:
            self.failures[key] = INTERNAL_FAILURE
            return
        log.error("model %s not loaded: %s", key, exc.message, extra={"model": key})
        self.failures[key] = files.one_line(exc.public)

    @classmethod
    def scan(cls, root: Path, only: frozenset[str] = frozenset(), policy: VersionPolicy | None = None) -> Repository:
        """Loads the served versions of every model of `root` (or only the directories named in `only`). No model
        file, however broken or hostile, stops the others: each failure is logged and listed, the rest served."""
        repo = cls(models={}, failures={})
        sources, problems = discover(root, only)
        for key, exc in problems.items():
            repo.fail(key, exc)
        for name, source in sources.items():
            chosen = source.policy or policy or VersionPolicy()
            loaded, failures = select_versions(source, chosen, load_version)
            for key, failure in failures.items():
                repo.fail(key, failure)
            if loaded:
                repo.add(name, loaded, chosen)
        return repo

    def add(self, name: str, loaded: dict[int, Model], policy: VersionPolicy) -> None:
        self.versions[name] = dict(sorted(loaded.items()))
        self.models[name] = loaded[max(loaded)]
        self.policies[name] = policy
        for model in loaded.values():
            describe(model)


def describe(model: Model) -> None:
    i = model.info
    log.info(
        "model %s version %d loaded: %s backend, %d inputs -> %d x LSTM(%d) -> %d outputs%s",
        i.name,
        i.version,
        i.backend,
        i.input_size,
        i.num_layers,
        i.hidden_size,
        i.output_size,
        ", normalised" if i.normalized else "",
        extra={"model": i.name},
    )

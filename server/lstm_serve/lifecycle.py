"""Which model versions this process serves, and how that changes without a restart.

A reload reads the repository again (engine.repository.discover), loads what the version policy now serves (in a
thread: loads are slow) and then, on the event loop, swaps the result in at once:

- a version already served whose files did not change (fingerprint: names, mtimes, sizes, inodes) is kept as it is;
- a new version, or one whose files changed, is loaded; until it has loaded the old one serves, and if it fails the
  old one keeps serving and the failure is listed: a broken upload never takes a model away;
- a version the policy no longer serves (or an operator unloaded) is *retired*: new sessions no longer get it, while
  the sessions pinned to it keep stepping on it until they end, or until --version-drain-timeout passes; then it is
  dropped and those sessions end with the reason `model_retired`;
- a session pinned to a version this process never loaded (it started after the version was retired elsewhere, or
  restored the session from a snapshot) has that version loaded for it, retired from the start (`adopt`), while its
  directory is still in the repository; otherwise it ends as `model_retired`.

Admin requests (lstm.v1 ModelAdminService, service/admin.py) are overrides on top of the repository and the policy,
kept in this process: unload a model or a version, load a version the policy does not serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from lstm_serve.batching import Batcher
from lstm_serve.engine import repository as repo
from lstm_serve.engine.model import Model, ModelInfo
from lstm_serve.errors import InvalidInput, ModelLoadError
from lstm_serve.sessions import EndReason, SessionStore

log = logging.getLogger(__name__)

BATCHER_LINGER = 5.0  # seconds a replaced version's batcher keeps answering what was queued on it before it closes


class VersionState(StrEnum):
    READY = "ready"  # served: new sessions get the latest ready version
    UNLOADING = "unloading"  # retired: serves only the sessions pinned to it, until they end or the drain deadline


@dataclass(slots=True)
class Served:
    model: Model
    batcher: Batcher
    zero_state: bytes
    fingerprint: tuple[object, ...]
    state: VersionState = VersionState.READY
    deadline: float = float("inf")  # time.monotonic() when an unloading version is dropped, sessions or not


@dataclass(slots=True)
class Overrides:
    """An operator's admin requests, applied on top of the repository at every reload."""

    unloaded: set[str] = field(default_factory=set)  # models: no version served
    unloaded_versions: set[tuple[str, int]] = field(default_factory=set)
    loaded_versions: set[tuple[str, int]] = field(default_factory=set)  # served beside the policy's


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reload found: per model, the versions to serve (Model objects, old ones where unchanged or where the
    reload failed) and their fingerprints; the failures by directory key; and which (model, version) failed to load
    again and are served from their loaded copy."""

    serve: dict[str, dict[int, tuple[Model, tuple[object, ...]]]]
    failures: dict[str, str]
    failed: set[tuple[str, int]]


def version_fingerprint(source: repo.ModelSource, version: int) -> tuple[object, ...]:
    directory = source.versions[version]
    # the flat layout's directory also holds the version directories: those are other versions' business
    return repo.fingerprint(directory, files_only=directory == source.directory)


def plan(
    root: Path,
    only: Iterable[str],
    default: repo.VersionPolicy,
    current: dict[str, dict[int, Served]],
    overrides: Overrides,
) -> Plan:
    """Reads the repository and loads what changed (blocking: run it in a thread). Models already served and whose
    files are unchanged are reused, not loaded again. A served version that fails to load again (its files, or its
    model.toml, broke) counts for the policy as its loaded copy: that copy keeps serving, and the failure is listed."""
    sources, problems = repo.discover(root, only)
    failures: dict[str, str] = {}
    failed: set[tuple[str, int]] = set()  # served versions kept because their reload failed
    recorder = repo.Repository(models={}, failures=failures)
    serve: dict[str, dict[int, tuple[Model, tuple[object, ...]]]] = {}
    prints: dict[tuple[str, int], tuple[object, ...]] = {}
    for key, exc in problems.items():
        recorder.fail(key, exc)
        if key in current and key not in sources and key not in overrides.unloaded:  # the directory broke whole
            failed |= {(key, v) for v in current[key]}
            serve[key] = {v: (s.model, s.fingerprint) for v, s in current[key].items() if s.state is VersionState.READY}
    unreadable: set[tuple[str, int]] = set()  # served versions whose model.toml cannot be read now

    def load(source: repo.ModelSource, version: int) -> Model:
        if (source.name, version) in overrides.unloaded_versions:
            raise ModelLoadError(f"version {version} was unloaded by an operator")
        served = current.get(source.name, {}).get(version)
        if (source.name, version) in unreadable and served is not None:
            failed.add((source.name, version))
            prints[(source.name, version)] = served.fingerprint
            return served.model
        prints[(source.name, version)] = print_ = version_fingerprint(source, version)
        if served is not None and served.fingerprint == print_:
            return served.model
        try:
            return repo.load_version(source, version)
        except Exception as exc:
            if served is None or served.state is not VersionState.READY:
                raise
            if isinstance(exc, ModelLoadError):
                recorder.fail(source.key(version), exc)
            else:
                log.exception("model %s version %d not reloaded: unexpected error", source.name, version)
                recorder.fail(source.key(version), None)
            failed.add((source.name, version))
            prints[(source.name, version)] = served.fingerprint
            return served.model

    for name, source in sources.items():
        if name in overrides.unloaded:
            continue
        for key in source.problems:  # a version (or the flat model.toml) unreadable now: its loaded copy stands in
            _, slash, number = key.partition("/")
            broken = [int(number)] if slash else [v for v in current.get(name, {}) if v not in source.versions]
            for version in broken:
                if current.get(name, {}).get(version) is not None and version not in source.versions:
                    unreadable.add((name, version))
                    source.versions[version] = source.directory  # a candidate for the policy, loaded from memory
        policy = source.policy or default
        loaded, version_failures = repo.select_versions(source, policy, load)
        for version in sorted(v for n, v in overrides.loaded_versions if n == name and v not in loaded):
            if version not in source.versions:
                version_failures[f"{name}/{version}"] = ModelLoadError(f"version {version} is not in the repository")
                continue
            try:
                loaded[version] = load(source, version)
            except ModelLoadError as exc:
                version_failures[source.key(version)] = exc
        for key, failure in version_failures.items():
            if failure is not None and failure.message.endswith("was unloaded by an operator"):
                continue  # not a failure: asked for
            recorder.fail(key, failure)
        failed -= {(name, v) for v in current.get(name, {}) if v not in loaded}  # not needed any more: retire it
        if loaded:
            serve[name] = {v: (m, prints[(name, v)]) for v, m in sorted(loaded.items())}
    return Plan(serve, failures, failed)


@dataclass(frozen=True, slots=True)
class Versioning:
    """Where the repository is and how versions are chosen (None root: a repository built in code, no reloads)."""

    root: Path | None = None
    only: tuple[str, ...] = ()
    policy: repo.VersionPolicy = field(default_factory=repo.VersionPolicy)
    drain_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class VersionView:
    """A served version as clients see it."""

    info: ModelInfo
    state: VersionState
    latest: bool


def load_pinned(root: Path, only: Iterable[str], name: str, version: int) -> tuple[Model, tuple[object, ...]]:
    """One version of one model, whatever the policy (blocking): for sessions pinned to a version this process does
    not serve (it started after the version was retired elsewhere, or restored them from a snapshot)."""
    sources, _ = repo.discover(root, only)
    source = sources.get(name)
    if source is None or version not in source.versions:
        raise ModelLoadError(f"model {name!r} version {version} is no longer in the repository")
    return repo.load_version(source, version), version_fingerprint(source, version)


class Catalog:
    """The versions served, by model name and version: what DataPlane steps, creates and lists from. Changed only
    on the event loop (apply, retire), so a step that looked a version up uses it in the same loop turn."""

    def __init__(self, make_batcher: Callable[[Model], Batcher], drain_timeout: float) -> None:
        self.versions: dict[str, dict[int, Served]] = {}
        self.failures: dict[str, str] = {}
        self.batchers: dict[tuple[str, int], Batcher] = {}  # the step path's lookup, by ModelInfo.key
        self.retired: set[tuple[str, int]] = set()  # versions this process dropped (their sessions end on use)
        self.drain_timeout = drain_timeout
        self._make_batcher = make_batcher
        self._closing: dict[asyncio.Task[None], Batcher] = {}

    def add(self, model: Model, fingerprint: tuple[object, ...] = ()) -> Served:
        served = Served(model, self._make_batcher(model), model.zero_state().tobytes(), fingerprint)
        old = self.versions.setdefault(model.info.name, {}).get(model.info.version)
        self.versions[model.info.name][model.info.version] = served
        self.versions[model.info.name] = dict(sorted(self.versions[model.info.name].items()))
        self.batchers[model.info.key] = served.batcher
        self.retired.discard(model.info.key)
        if old is not None:
            self._close_later(old.batcher)
        return served

    def adopt(self, model: Model, fingerprint: tuple[object, ...]) -> Served:
        """A version loaded only for the sessions pinned to it: draining from the start."""
        served = self.add(model, fingerprint)
        served.state, served.deadline = VersionState.UNLOADING, time.monotonic() + self.drain_timeout
        return served

    def latest(self, name: str) -> Served | None:
        """The version new sessions get: the highest ready one."""
        ready = [s for s in self.versions.get(name, {}).values() if s.state is VersionState.READY]
        return ready[-1] if ready else None

    def get(self, name: str, version: int) -> Served | None:
        return self.versions.get(name, {}).get(version)

    def all(self) -> list[Served]:
        return [s for versions in self.versions.values() for s in versions.values()]

    def apply(self, new: Plan) -> list[str]:
        """Swaps a reload's result in; returns what changed, in words for the log."""
        changes: list[str] = []
        now = time.monotonic()
        for name, chosen in new.serve.items():
            for version, (model, fingerprint) in chosen.items():
                old = self.get(name, version)
                if old is not None and old.model is model:
                    if (name, version) in new.failed:
                        changes.append(f"{name} version {version} failed to reload: the loaded one keeps serving")
                    elif old.state is not VersionState.READY:
                        changes.append(f"{name} version {version} ready again")
                    old.state, old.deadline, old.fingerprint = VersionState.READY, float("inf"), fingerprint
                    continue
                self.add(model, fingerprint)
                changes.append(f"{name} version {version} {'reloaded' if old is not None else 'loaded'}")
                repo.describe(model)
        for name, served_versions in self.versions.items():
            for version, served in served_versions.items():
                if version in new.serve.get(name, {}):
                    continue
                if served.state is VersionState.READY:
                    served.state, served.deadline = VersionState.UNLOADING, now + self.drain_timeout
                    changes.append(f"{name} version {version} retired: serving its pinned sessions only")
        self.failures = dict(new.failures)
        return changes

    def drop(self, name: str, version: int) -> None:
        served = self.versions.get(name, {}).pop(version, None)
        if served is None:
            return
        if not self.versions[name]:
            del self.versions[name]
        self.batchers.pop((name, version), None)
        self.retired.add((name, version))
        self._close_later(served.batcher)

    def _close_later(self, batcher: Batcher) -> None:
        """Closes a batcher no longer looked up, once what was queued on it has been answered."""

        async def close() -> None:
            await asyncio.sleep(BATCHER_LINGER)
            await batcher.close()

        try:
            task = asyncio.get_running_loop().create_task(close())
        except RuntimeError:  # no loop (built before serving): nothing can be queued on it
            return
        self._closing[task] = batcher
        task.add_done_callback(lambda done: self._closing.pop(done, None))

    async def close(self) -> None:
        for task, batcher in list(self._closing.items()):
            task.cancel()
            await batcher.close()
        for served in self.all():
            await served.batcher.close()


class ModelLifecycle:
    """Changes the catalog while serving: reloads (one at a time; the loading in a thread, the swap on the loop at
    once), an operator's loads and unloads, dropping drained versions, and adopting pinned ones."""

    def __init__(
        self, catalog: Catalog, store: SessionStore, versioning: Versioning, on_change: Callable[[], None]
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.versioning = versioning
        self.overrides = Overrides()
        self._on_change = on_change
        self._reloading = asyncio.Lock()

    async def reload(self) -> list[str]:
        root = self.versioning.root
        if root is None:
            raise InvalidInput("this server has no model repository to reload from")
        async with self._reloading:
            current = {name: dict(versions) for name, versions in self.catalog.versions.items()}
            args = (root, self.versioning.only, self.versioning.policy, current, self.overrides)
            new = await asyncio.get_running_loop().run_in_executor(None, plan, *args)
            changes = self.catalog.apply(new)
            self._on_change()
            for change in changes:
                log.info("models: %s", change)
            await self.retire_due()
            return changes

    async def load(self, name: str, version: int = 0) -> list[str]:
        self.overrides.unloaded.discard(name)
        if version:
            self.overrides.unloaded_versions.discard((name, version))
            self.overrides.loaded_versions.add((name, version))
        return await self.reload()

    async def unload(self, name: str, version: int = 0) -> list[str]:
        if version:
            self.overrides.loaded_versions.discard((name, version))
            self.overrides.unloaded_versions.add((name, version))
        else:
            self.overrides.unloaded.add(name)
        return await self.reload()

    async def adopt(self, name: str, version: int) -> Served | None:
        """The version a session is pinned to, loaded for it if this process never served it: None when it was
        retired and dropped here, or is no longer in the repository."""
        root = self.versioning.root
        if root is None or (name, version) in self.catalog.retired:
            return None
        async with self._reloading:
            served = self.catalog.get(name, version)
            if served is not None or (name, version) in self.catalog.retired:
                return served
            args = (root, self.versioning.only, name, version)
            try:
                model, fingerprint = await asyncio.get_running_loop().run_in_executor(None, load_pinned, *args)
            except ModelLoadError as exc:
                log.warning("model %s version %d not loaded for its pinned sessions: %s", name, version, exc.message)
                self.catalog.retired.add((name, version))
                return None
            log.info("models: %s version %d loaded for its pinned sessions (retired: no new ones)", name, version)
            return self.catalog.adopt(model, fingerprint)

    async def retire_due(self) -> int:
        """Drops the retired versions nobody needs any more: no session pinned to them (where the store can tell),
        or past their drain deadline, whose remaining sessions then end with the reason `model_retired`."""
        dropped = 0
        now = time.monotonic()
        for served in [s for s in self.catalog.all() if s.state is VersionState.UNLOADING]:
            name, version = served.model.info.key
            pinned = await self.store.pinned(name, version)
            if (pinned is None or pinned > 0) and now < served.deadline:
                continue
            detail = f"(model {name!r} version {version} was retired)"
            ended = await self.store.end_version(name, version, EndReason.MODEL_RETIRED, detail)
            if self.catalog.get(name, version) is served:  # not reloaded meanwhile
                self.catalog.drop(name, version)
                dropped += 1
                log.info("models: %s version %d dropped (%d pinned session(s) ended)", name, version, ended)
        if dropped:
            self._on_change()
        return dropped

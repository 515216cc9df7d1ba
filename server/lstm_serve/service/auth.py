"""Authentication of the lstm.v1 calls by bearer token, in ONE place: a grpc.aio server interceptor.

A client sends `authorization: Bearer <token>` with every call. The server knows each token only by its SHA-256
(lines `tenant:sha256-hex` in --tokens-file, or --tokens), so the file holds no secret; the tenant the token maps to is
set in TENANT for the call, and the data plane keeps every tenant's sessions apart. A call without a token, or with
one the server does not know, is answered UNAUTHENTICATED (reason "unauthenticated") before it reaches the service.

Every method is authenticated except the health service's, so that probes (an orchestrator, a load balancer,
`lstm-serve health`) need no token; server reflection needs one like the lstm.v1 calls (grpcurl: -H 'authorization:
Bearer ...'). The tokens file is re-read when it changes (checked at most once a second), for rotation without a
restart; a file that can no longer be read or parsed is logged and the tokens already loaded stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio

from lstm_serve.dataplane import TENANT_NAME
from lstm_serve.errors import Unauthenticated
from lstm_serve.service.admin import ADMIN_CALLER
from lstm_serve.service.admin import METHOD_PREFIX as ADMIN_METHODS
from lstm_serve.service.calls import TENANT, Calls, Context, request_id
from lstm_serve.service.status import error_metadata, status_code

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # method prefixes served without a token
RELOAD_INTERVAL = 1.0  # seconds between checks of the tokens file for changes
MAX_TOKEN_CHARS = 4096
_DIGEST = re.compile(r"[0-9a-f]{64}")
_PREFIX = 16  # hex digits of a hash that find its entry

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class TokenFileError(Exception):
    """The tokens file (or --tokens) cannot be used; the message is one line for the operator."""


def token_hash(token: str) -> str:
    """What the tokens file holds for `token`: its SHA-256, in hex (`printf %s "$TOKEN" | sha256sum`)."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(lines: Iterable[str], source: str) -> dict[str, str]:
    """`tenant:sha256-hex` lines (blank lines and # comments skipped) -> {hash: tenant}. A tenant may have several
    tokens (rotation: add the new one, move the clients over, remove the old one)."""
    table: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, colon, digest = (part.strip() for part in line.partition(":"))
        digest = digest.lower()
        if not colon or not TENANT_NAME.fullmatch(tenant) or not _DIGEST.fullmatch(digest):
            raise TokenFileError(
                f"{source}:{number}: expected 'tenant:sha256-hex' (a tenant of 1-64 characters [A-Za-z0-9._-], then "
                "the 64 hex digits of the token's SHA-256)"
            )
        if table.get(digest, tenant) != tenant:
            raise TokenFileError(f"{source}:{number}: this token hash already belongs to tenant {table[digest]!r}")
        table[digest] = tenant
    return table


class Tokens:
    """The tokens the server accepts, by hash, and the tenant of each; re-reads its file when it changes."""

    def __init__(self, path: Path | None, entries: Sequence[str] = (), clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._clock = clock
        self._fixed = parse_tokens(entries, "--tokens")
        self._table = dict(self._fixed)  # hash -> tenant
        self._index = _index(self._table)
        self._stamp: tuple[int, int, int] | None = None
        self._checked = clock()
        if path is not None:
            try:
                self._load(path)
            except OSError as exc:
                raise TokenFileError(f"cannot read the tokens file {path}: {exc.strerror or exc}") from None

    @property
    def tenants(self) -> set[str]:
        return set(self._table.values())

    def _load(self, path: Path) -> bool:
        """Reads the file if it changed since the last read; returns whether it did."""
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        text = path.read_text(encoding="utf-8")
        after = os.stat(path)
        if (after.st_mtime_ns, after.st_size, after.st_ino) != stamp:
            return False  # being written: read it again at the next check
        table = parse_tokens(text.splitlines(), str(path))
        if not table and self._table.keys() - self._fixed.keys():
            # a file caught truncated mid-rewrite parses as "no tokens": never revoke everyone that way
            self._stamp = stamp  # said once; a later write of the file is read again
            raise TokenFileError(f"the tokens file {path} is empty now; keeping the tokens loaded before")
        self._table = self._fixed | table
        self._index = _index(self._table)
        self._stamp = stamp
        return True

    def refresh(self) -> None:
        """At most once per RELOAD_INTERVAL: re-reads the file if it changed. Failing that, the tokens stay."""
        if self.path is None:
            return
        now = self._clock()
        if now - self._checked < RELOAD_INTERVAL:
            return
        self._checked = now
        try:
            if self._load(self.path):
                log.info("tokens file %s re-read: %d token(s) of %d tenant(s)", self.path, len(self), len(self.tenants))
        except (OSError, UnicodeDecodeError, TokenFileError) as exc:
            log.error("tokens file %s not re-read, the previous tokens stay in force: %s", self.path, exc)

    def __len__(self) -> int:
        return len(self._table)

    def tenant(self, token: str) -> str | None:
        """The tenant of `token`, or None. Found by the first 16 hex digits of the token's SHA-256 (a lookup's timing
        can at most tell a caller about the hash of its own guess, which helps find no token), then compared in full
        in constant time."""
        digest = token_hash(token)
        for known, tenant in self._index.get(digest[:_PREFIX], ()):
            if hmac.compare_digest(known, digest):
                return tenant
        return None


def _index(table: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    index: dict[str, list[tuple[str, str]]] = {}
    for digest, tenant in table.items():
        index.setdefault(digest[:_PREFIX], []).append((digest, tenant))
    return index


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header, or None."""
    for key, value in metadata or ():
        if key != AUTHORIZATION_KEY:
            continue
        if not isinstance(value, str) or len(value) > MAX_TOKEN_CHARS + 7:
            return None
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Admits a call with a known token (setting TENANT for it) and answers any other UNAUTHENTICATED, counted and
    logged like every refusal (through `calls`). Model admin calls are checked against the admin tokens instead, and
    only marked (ADMIN_CALLER): the admin service refuses them itself, where it can see the caller's address."""

    def __init__(self, tokens: Tokens | None, calls: Calls, admin: Tokens | None = None) -> None:
        self.tokens = tokens
        self.calls = calls
        self.admin = admin

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        method: str = details.method or ""
        if method.startswith(OPEN_METHODS):
            return await continuation(details)
        if method.startswith(ADMIN_METHODS):
            token = bearer_token(details.invocation_metadata)
            if self.admin is not None:
                self.admin.refresh()
            admin = token is not None and self.admin is not None and self.admin.tenant(token) is not None
            ADMIN_CALLER.set("admin" if admin else "other" if token is not None else "")
            return await continuation(details)
        if self.tokens is None:
            return await continuation(details)
        self.tokens.refresh()
        token = bearer_token(details.invocation_metadata)
        tenant = self.tokens.tenant(token) if token is not None else None
        if tenant is not None:
            TENANT.set(tenant)  # this call's task: the handler runs in it (see service/calls.py)
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # an unknown method: UNIMPLEMENTED, as without authentication
            return handler
        if token is None:
            message = "this server requires a bearer token: send the metadata 'authorization: Bearer <token>'"
        else:
            message = "the bearer token is not valid here"
        return self._refusal(handler, method, Unauthenticated(message))

    def _refusal(self, handler: Handler, full_method: str, exc: Unauthenticated) -> Handler:
        """A handler of the same shape as `handler` (unary or streaming) that answers `exc` without reading."""
        calls = self.calls
        service, _, method = full_method.lstrip("/").rpartition("/")
        kind = "bidi_stream" if handler.request_streaming and handler.response_streaming else "unary"
        series = calls.metrics.grpc_series(service, method, kind)

        async def refuse(request: object, context: Context) -> None:
            start = time.perf_counter()
            series.started.inc()
            code = status_code(exc)
            calls.refused(method, None, request_id(context), code, f"{exc.message} (from {context.peer()})")
            calls.finished(method, code, start, series)
            context.set_trailing_metadata(error_metadata(code, exc))
            await context.abort(code, exc.message)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

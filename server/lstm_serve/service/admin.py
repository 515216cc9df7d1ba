"""lstm.v1.ModelAdminService over grpc.aio: load, unload and reload models without a restart (lifecycle.py does the
work).

Who may call it, decided here: a call carrying an admin token (--admin-tokens-file; the authentication interceptor,
service/auth.py, sets ADMIN_CALLER), or, only with --admin-loopback, any call from the loopback address, for local
development. Otherwise PERMISSION_DENIED (UNAUTHENTICATED without any token where admin tokens are configured): a
server without admin credentials never lets a client change its models.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from lstm_client._proto.lstm.v1 import lstm_pb2
from lstm_serve.dataplane import DataPlane
from lstm_serve.errors import PermissionDenied, Unauthenticated
from lstm_serve.service import codec
from lstm_serve.service.calls import Calls, Context

SERVICE = "lstm.v1.ModelAdminService"
METHOD_PREFIX = f"/{SERVICE}/"

# What the interceptor found on an admin call: "admin" (a valid admin token), "other" (a token, not an admin one),
# "" (no token, or no interceptor: a server without tokens).
ADMIN_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("lstm_serve_admin_caller", default="")


def is_loopback(peer: str) -> bool:
    """ "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000" -> True; anything else (unix sockets included) -> False."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminServicer:
    def __init__(self, plane: DataPlane, calls: Calls, *, admin_configured: bool, loopback: bool) -> None:
        self.plane = plane
        self.calls = calls
        self.admin_configured = admin_configured
        self.loopback = loopback

    def register(self, server: grpc.aio.Server) -> None:
        unary: dict[str, tuple[type[Any], Callable[[Any, Context], Awaitable[Any]]]] = {
            "ReloadModels": (lstm_pb2.ReloadModelsRequest, self.ReloadModels),
            "LoadModel": (lstm_pb2.LoadModelRequest, self.LoadModel),
            "UnloadModel": (lstm_pb2.UnloadModelRequest, self.UnloadModel),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self.calls.unary(name, message_type, handler, service=SERVICE),
                response_serializer=lstm_pb2.ModelAdminResponse.SerializeToString,
            )
            for name, (message_type, handler) in unary.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def _authorize(self, context: Context) -> None:
        caller = ADMIN_CALLER.get()
        if caller == "admin" or (self.loopback and is_loopback(context.peer() or "")):
            return
        if not self.admin_configured:
            raise PermissionDenied(
                "model admin calls are off on this server: configure --admin-tokens-file (or, for local development "
                "only, --admin-loopback)"
            )
        if caller == "":
            raise Unauthenticated("model admin calls need an admin bearer token: 'authorization: Bearer <token>'")
        raise PermissionDenied("this token may not administer models (it is not in --admin-tokens-file)")

    def _response(self, changes: list[str]) -> lstm_pb2.ModelAdminResponse:
        return lstm_pb2.ModelAdminResponse(
            changes=changes,
            models=[codec.version_info(v) for v in self.plane.model_versions()],
            failures=codec.failures(self.plane.model_failures()),
        )

    async def ReloadModels(
        self, request: lstm_pb2.ReloadModelsRequest, context: Context
    ) -> lstm_pb2.ModelAdminResponse:
        self._authorize(context)
        return self._response(await self.plane.reload_models())

    async def LoadModel(self, request: lstm_pb2.LoadModelRequest, context: Context) -> lstm_pb2.ModelAdminResponse:
        self._authorize(context)
        return self._response(await self.plane.load_model(request.name, request.version))

    async def UnloadModel(self, request: lstm_pb2.UnloadModelRequest, context: Context) -> lstm_pb2.ModelAdminResponse:
        self._authorize(context)
        return self._response(await self.plane.unload_model(request.name, request.version))

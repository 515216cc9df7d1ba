"""Transport security and authentication options shared by both clients and the load generator.

Client("lstm.example.com:50051", tls=True, token=os.environ["LSTM_TOKEN"])              # system roots
Client("10.0.0.7:50051", tls=TlsConfig(ca="ca.pem", server_name="lstm.example.com"))   # a private CA
Client("10.0.0.7:50051", tls=TlsConfig(ca="ca.pem", cert="client.pem", key="client.key"))  # mutual TLS
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

AUTHORIZATION_KEY = "authorization"

Pem = str | Path | bytes  # a file's path, or the PEM text itself (bytes, or a str starting with -----BEGIN)


def _read(value: Pem | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """TLS for the connection to the server.

    ca: the certificate(s) that signed the server's certificate; None trusts the system's roots.
    cert, key: this client's certificate chain and private key, for a server that requires client certificates
        (mutual TLS); both or neither.
    server_name: check the server's certificate for this name rather than the target's host (connecting by IP
        address, or through a tunnel).
    """

    ca: Pem | None = None
    cert: Pem | None = None
    key: Pem | None = field(default=None, repr=False)  # never printed: it may be the private key itself
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TlsConfig: give both cert and key (mutual TLS), or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files now: a missing one fails here, not at the first call."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key), certificate_chain=_read(self.cert)
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def channel_security(
    tls: bool | TlsConfig, credentials: grpc.ChannelCredentials | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """The channel credentials (None: plaintext) and extra channel options of a client's `tls` / `credentials`."""
    if credentials is not None:
        if tls is not False:
            raise ValueError("give tls= or credentials=, not both")
        return credentials, []
    if tls is False:
        return None, []
    config = TlsConfig() if tls is True else tls
    return config.credentials(), config.options()


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a bearer token on every call (empty without one)."""
    if token is None:
        return ()
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be non-empty printable ASCII without spaces")
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)

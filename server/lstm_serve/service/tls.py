"""TLS, and mutual TLS, on the gRPC port, with certificates that are re-read when their files change.

gRPC asks `CertificateFiles.fetch` before every new connection's handshake (from one of its own threads); it looks at
the files' modification stamps and, when one changed, loads the files again, so that a renewed certificate (certbot,
cert-manager, a rotated client CA) is served to new connections without a restart. Connections already open keep the
certificate they started with. A new set that does not load (a key that does not match its certificate, a file half
written) is logged and skipped: the server keeps the last good set, and tries again at the next change. Replace the
files by renaming complete new ones over them, the key first.

The files are checked with Python's ssl module (the PEM parses, the key belongs to the certificate) before gRPC gets
them, so that a broken set stops the start with one line instead of failing every handshake.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]


class TlsError(Exception):
    """The certificate files cannot be used; the message is one line for the operator."""


class CertificateFiles:
    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self._lock = threading.Lock()  # fetch() runs on gRPC's threads
        self._stamp: Stamp = ()
        self._read_stamp: Stamp = ()  # the files as the last read found them
        self.reloads = 0

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca is not None else [])

    def _stamps(self) -> Stamp:
        stamps = []
        for path in self._paths():
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Reads and checks the files; raises TlsError saying what is wrong. What is checked is the very bytes that are
        handed to gRPC, and only a read during which no file changed counts (a rotation renames two files)."""
        try:
            stamp = self._stamps()
            cert, key = self.cert.read_bytes(), self.key.read_bytes()
            ca = self.client_ca.read_bytes() if self.client_ca is not None else None
            if self._stamps() != stamp:
                raise TlsError("the certificate files changed while being read; trying again at the next connection")
        except OSError as exc:
            raise TlsError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
        self._read_stamp = stamp
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            with tempfile.TemporaryDirectory() as scratch:  # ssl loads a chain from files only: check the bytes read
                cert_file, key_file = Path(scratch, "cert.pem"), Path(scratch, "key.pem")
                cert_file.write_bytes(cert)
                key_file.write_bytes(key)
                check.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(
                f"{self.cert} and {self.key} are not a PEM certificate chain and its private key ({exc})"
            ) from None
        if ca is not None:
            try:
                check.load_verify_locations(cadata=ca.decode("ascii"))
            except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
                raise TlsError(f"{self.client_ca} holds no PEM CA certificate ({exc})") from None
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """For gRPC, before each handshake: a new configuration when the files changed, else None (keep the one in
        use). Never raises."""
        with self._lock:
            try:
                if self._stamps() == self._stamp:
                    return None
            except OSError:
                return None  # a file being replaced: look again at the next connection
            try:
                config = self.load()
            except TlsError as exc:
                log.error("TLS certificates changed but cannot be used, the previous ones stay in force: %s", exc)
                # said once per change, not per connection: the files as READ, so a later change is seen
                self._stamp = self._read_stamp
                return None
            self.reloads += 1
            log.info("TLS certificates re-read from %s", ", ".join(str(p) for p in self._paths()))
            return config

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials serving these files, re-read when they change; raises TlsError if they cannot be used."""
        initial = self.load()
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self.fetch,  # type: ignore[arg-type]  # None means "no change", as gRPC documents
            require_client_authentication=self.mutual,
        )

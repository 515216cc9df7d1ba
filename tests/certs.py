"""Certificates made at test time with the openssl command: a CA, server certificates for 127.0.0.1 / localhost, and
client certificates. EC P-256 keys (fast to make). Nothing is committed; every test makes its own under tmp_path."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.procs import require

DAYS = "2"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run([require("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)


@dataclass(frozen=True)
class Ca:
    """A self-signed certificate authority in `directory`, issuing server and client certificates there."""

    directory: Path
    name: str = "test-ca"

    @property
    def cert(self) -> Path:
        return self.directory / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @classmethod
    def make(cls, directory: Path, name: str = "test-ca") -> Ca:
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(directory, name)
        _key(ca.key)
        _openssl(
            "req", "-x509", "-new", "-key", str(ca.key), "-out", str(ca.cert), "-days", DAYS, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip
        return ca

    def issue(self, name: str, *, server: bool) -> Issued:
        """A leaf certificate `name`.pem / `name`.key: for a server (SAN 127.0.0.1 and localhost) or a client."""
        key, csr, cert = (self.directory / f"{name}{ext}" for ext in (".key", ".csr", ".pem"))
        ext = self.directory / f"{name}.ext"
        if server:
            ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        else:
            ext.write_text("extendedKeyUsage=clientAuth\n")
        _key(key)
        _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=self.directory)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-CAcreateserial",
            "-out", str(cert), "-days", DAYS, "-extfile", str(ext),
            cwd=self.directory,
        )  # fmt: skip
        return Issued(cert, key)

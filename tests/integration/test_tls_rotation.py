"""A certificate rotation by two renames (`mv key.new key && mv cert.new cert`) is taken up even when a handshake
sees the half-rotated pair in between. (Found in review: the failed check recorded the files as they were after it,
so the complete new pair was never loaded.)"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from lstm_serve.service.tls import CertificateFiles
from tests.certs import Ca


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    root = tmp_path_factory.mktemp("pki")
    ca = Ca.make(root / "ca")
    return ca.issue("old", server=True), ca.issue("new", server=True)


def test_rename_during_a_failed_check_is_never_loaded(pairs, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    old, new = pairs
    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    cert.write_bytes(old.cert.read_bytes())
    key.write_bytes(old.key.read_bytes())
    files = CertificateFiles(cert, key)
    files.load()  # what credentials() does at start

    # the operator's rotation, step 1: the new key renamed over the old one
    staged_key = tmp_path / "tls.key.new"
    staged_key.write_bytes(new.key.read_bytes())
    os.replace(staged_key, key)
    staged_cert = tmp_path / "tls.pem.new"
    staged_cert.write_bytes(new.cert.read_bytes())

    real = ssl.SSLContext

    class RacingContext(real):  # type: ignore[misc,valid-type]
        def load_cert_chain(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                return super().load_cert_chain(*args, **kwargs)  # new key + old cert: fails, as it should
            finally:
                # step 2 of the rotation lands while fetch() is handling that failure (microseconds later)
                if staged_cert.exists():
                    os.replace(staged_cert, cert)

    monkeypatch.setattr(ssl, "SSLContext", RacingContext)
    assert files.fetch() is None  # the mismatched set is skipped: correct
    monkeypatch.setattr(ssl, "SSLContext", real)

    # the files on disk are now a complete, matching new pair ...
    CertificateFiles(cert, key).load()
    # ... but the running server never takes them: every later handshake keeps the old certificate
    assert files.fetch() is not None, "the good new certificate pair on disk is never loaded"

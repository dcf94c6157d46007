"""TLS for the ext_proc and health ports (``--secure-serving``).

Two sources of the server certificate:

* none given: a self-signed ECDSA P-256 certificate is generated in memory at
  start-up (valid for ``localhost``/``127.0.0.1``, one year). Envoy connects with
  an empty ``validation_context``, like the GIE reference deployments do;
* ``--cert-path DIR`` holding ``tls.crt`` and ``tls.key`` (a Kubernetes TLS
  secret mount): the files are re-read when their modification time changes.
  gRPC asks :meth:`CertDir.fetch` on each new handshake, so a renewed secret is
  served to new connections without a restart; a half-written pair (unreadable)
  keeps the previous certificate.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pdroute import tlsutil

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"


def self_signed(common_name: str = "pdroute-epp") -> tuple[bytes, bytes]:
    """A fresh (key PEM, certificate PEM) pair, generated in memory."""
    return tlsutil.self_signed(common_name)


class CertDir:
    """``tls.crt``/``tls.key`` in a directory, reloaded when they change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, float] | None = None
        self.reloads = 0
        pair = self._read()
        if pair is None:
            raise ValueError(
                f"--cert-path {path}: expected readable {CERT_FILE} and {KEY_FILE} (PEM)"
            )
        self.key_pem, self.cert_pem = pair

    def _mtimes(self) -> tuple[float, float]:
        return (
            os.stat(self.path / CERT_FILE).st_mtime,
            os.stat(self.path / KEY_FILE).st_mtime,
        )

    def _read(self) -> tuple[bytes, bytes] | None:
        try:
            stamp = self._mtimes()
            cert = (self.path / CERT_FILE).read_bytes()
            key = (self.path / KEY_FILE).read_bytes()
            x509.load_pem_x509_certificate(cert)
            serialization.load_pem_private_key(key, password=None)
        except (OSError, ValueError):
            log.warning("could not load the TLS pair from %s", self.path, exc_info=True)
            return None
        self._stamp = stamp
        return key, cert

    def changed(self) -> bool:
        try:
            return self._mtimes() != self._stamp
        except OSError:
            return False

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-config fetcher: a new config when the files changed."""
        if not self.changed():
            return None
        pair = self._read()
        if pair is None:
            return None
        self.key_pem, self.cert_pem = pair
        self.reloads += 1
        log.info("reloaded the TLS certificate from %s", self.path)
        return grpc.ssl_server_certificate_configuration([pair])


def server_credentials(cert_path: Path | None) -> Callable[[], grpc.ServerCredentials]:
    """A factory of credentials for ``--secure-serving``: a reloading cert dir or one
    self-signed pair. gRPC consumes a dynamic credentials object when a port is
    bound, so each server (ext_proc, health) needs its own: call the factory once
    per port. The files are read (and validated) now, so a bad dir fails at start-up.
    """
    if cert_path is None:
        pair = self_signed()
        return lambda: grpc.ssl_server_credentials([pair])
    cd = CertDir(cert_path)

    def make() -> grpc.ServerCredentials:
        initial = grpc.ssl_server_certificate_configuration([(cd.key_pem, cd.cert_pem)])
        return grpc.dynamic_ssl_server_credentials(initial, cd.fetch)  # type: ignore[arg-type]

    return make


def _load_pair(ctx: ssl.SSLContext, key_pem: bytes, cert_pem: bytes) -> None:
    """``load_cert_chain`` from PEM bytes (it only reads files): a private temp dir,
    removed at once."""
    with tempfile.TemporaryDirectory(prefix="pdroute-tls-") as d:
        key = Path(d) / KEY_FILE
        cert = Path(d) / CERT_FILE
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert.write_bytes(cert_pem)
        ctx.load_cert_chain(cert, key)


def _h2_context(key_pem: bytes, cert_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    _load_pair(ctx, key_pem, cert_pem)
    return ctx


def server_ssl_context(cert_path: Path | None) -> Callable[[], ssl.SSLContext]:
    """The same two certificate sources for the EPP's own HTTP/2 server, as
    ``ssl`` contexts negotiating ALPN ``h2``. With a cert dir, each handshake checks
    the files' modification times (two ``stat`` calls; Envoy keeps its connections,
    so handshakes are rare) and switches the connection to a context built from
    the renewed pair; a half-written pair keeps the previous one."""
    if cert_path is None:
        key_pem, cert_pem = self_signed()
        return lambda: _h2_context(key_pem, cert_pem)
    cd = CertDir(cert_path)
    current = [_h2_context(cd.key_pem, cd.cert_pem)]

    def on_hello(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if cd.fetch() is not None:  # the files changed and the new pair is valid
            current[0] = _h2_context(cd.key_pem, cd.cert_pem)
        sslobj.context = current[0]

    def make() -> ssl.SSLContext:
        base = _h2_context(cd.key_pem, cd.cert_pem)
        base.sni_callback = on_hello
        return base

    return make

"""Running the gateway: uvicorn on a socket we bind ourselves (port 0 works, and the
address is printed once it listens), plain HTTP on loopback or HTTPS with client
certificates from the federation CA.

uvicorn (0.55) does not hand the client certificate to the app (no ASGI TLS extension,
``scope["extensions"]["tls"]``), so the gateway never relies on it: with ``--tls`` the
TLS handshake itself requires a certificate the federation CA issued and has not revoked
(``CERT_REQUIRED``, the CRL checked for the leaf). The gateway acts as its ``--as``
identity whoever connects, so the certificate must be of that same identity (the
professional's own software on another host): any other federation certificate, a
patient's or another professional's, is refused when the handshake completes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from cryptography import x509

from dmp.certificates import principal_from_certificate
from dmp.errors import DmpError
from dmp.fhir.federation import Federation
from dmp.fhir.gateway import build_app
from dmp.identity import Principal
from dmp.pki import Credentials

log = logging.getLogger("dmp.fhir")


@dataclass(frozen=True)
class TlsFiles:
    """The gateway's own server certificate and key, and what clients must present."""

    cert: Path
    key: Path
    ca: Path
    crl: Path | None


def server_context(tls: TlsFiles, only: Principal) -> ssl.SSLContext:
    """HTTPS that requires a client certificate from the federation CA, not revoked, of
    the identity ``only`` (the one the gateway acts as). The
    CA's revocation list is read again when it changes, as nodes and the directory do:
    each handshake is handed a context built on the CRL in force (through the SNI
    callback, the one hook ssl gives before the client certificate is verified)."""
    state: dict[str, object] = {}

    def current() -> ssl.SSLContext:
        stamp = _stamp(tls.crl)
        if state.get("stamp") != stamp or "context" not in state:
            state["context"] = _context(tls)
            state["stamp"] = stamp
        context = state["context"]
        assert isinstance(context, ssl.SSLContext)
        return context

    def pick(connection: ssl.SSLObject, _name: str | None, _context: ssl.SSLContext) -> None:
        connection.context = current()

    outer = _context(tls)
    outer.sni_callback = pick
    outer.sslobject_class = _only(only)
    return outer


def _only(expected: Principal) -> type[ssl.SSLObject]:
    """TLS connections whose handshake fails unless the client's (verified) certificate is
    of ``expected``: ssl has no verify callback, so the check runs once the handshake has
    verified the chain, before any byte of HTTP is read."""

    class OnlyIdentity(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            try:
                peer = principal_from_certificate(x509.load_der_x509_certificate(der or b""))
            except (DmpError, ValueError):
                peer = None
            if peer is None or peer.uri != expected.uri:
                role = peer.role.value if peer is not None else "unknown"
                log.warning(
                    "FHIR gateway: refused a client certificate of another identity (%s)", role
                )
                raise ssl.SSLError(
                    f"the client certificate is not {expected.identity}'s: this gateway acts"
                    " as its own identity only"
                )

    return OnlyIdentity


def _stamp(path: Path | None) -> tuple[int, int] | None:
    try:
        info = path.stat() if path is not None else None
    except FileNotFoundError:
        return None
    return (info.st_mtime_ns, info.st_size) if info is not None else None


def _context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(tls.ca))
    if tls.crl is not None and tls.crl.exists():
        context.load_verify_locations(cafile=str(tls.crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.set_alpn_protocols(["http/1.1"])
    return context


def bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    credentials: Credentials,
    directory: str,
    listen: str,
    *,
    tls: TlsFiles | None = None,
    max_body: int,
    node: str | None = None,
    timeout: float = 10,
    announce: Callable[[str], None] = print,
) -> int:
    """Serve until SIGTERM or SIGINT; return the exit status."""
    sock = bind(listen)
    host, port = sock.getsockname()[:2]
    federation = Federation(directory, credentials, node=node, timeout=timeout)
    app = build_app(federation, max_body=max_body, loopback=tls is None)
    factory = None
    if tls is not None:
        context = server_context(tls, credentials.principal)

        def factory(
            _config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]
        ) -> ssl.SSLContext:
            return context

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,  # request lines carry INS numbers in their query strings
        ssl_context_factory=factory,
        lifespan="off",
        server_header=False,
    )
    server = uvicorn.Server(config)
    scheme = "https" if tls is not None else "http"
    shown = f"[{host}]" if ":" in host else host
    announce(
        f"FHIR gateway for {credentials.principal.identity} at {scheme}://{shown}:{port}/"
        f" listening on {shown}:{port}"
    )
    sys.stdout.flush()

    def stop(_signum: int, _frame: object) -> None:
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        federation.close()
        sock.close()
    return 0

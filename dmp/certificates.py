"""Certificates of the federation: names, keys, files, and who a certificate belongs to.

Who a certificate belongs to is the single ``urn:dmp:...`` URI in its SubjectAltName
(:func:`principal_from_certificate`); a node's certificate also carries the DNS name
``node-<region>.dmp.internal`` (:func:`node_tls_name`), the TLS target the directory checks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dmp.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from dmp.identity import (
    URN_PREFIX,
    Principal,
    Role,
    check_profession,
    parse_identity,
    parse_uri,
)

log = logging.getLogger("dmp.pki")

CA_COMMON_NAME = "DMP federation root CA"
ORGANIZATION = "DMP federation"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
#: The DNS domain of the names that say which region a node serves (never resolved: a
#: reserved private-use top-level domain, so no public name can collide).
NODE_NAME_DOMAIN = "dmp.internal"

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
_LOCK_FILE = ".pki.lock"

SERVICE_DAYS = 825
PERSON_DAYS = 365
CRL_DAYS = 30
# Certificates start a little in the past so that a peer whose clock is slightly behind
# does not see a brand-new certificate as "not yet valid".
_CLOCK_SKEW = timedelta(minutes=5)

_SERVICE_ROLES = (Role.NODE, Role.DIRECTORY)
_HOSTNAME = re.compile(
    r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


# --------------------------------------------------------------------------- keys, files


def node_tls_name(region: str) -> str:
    """The DNS name in node R's certificate only: the TLS target the directory checks."""
    return f"node-{region}.{NODE_NAME_DOMAIN}"


def certificate_dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of a certificate's SubjectAltName (none if it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [str(name) for name in san.get_values_for_type(x509.DNSName)]


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM private key, which must be ECDSA P-256; InvalidArgument otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidArgument("the private key is not an ECDSA P-256 key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a file by replacing it: a temporary file in the same directory, created with
    mode 0600 (so a private key is never readable by others, not even half-written), then
    chmod to ``mode``, fsync and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _read_file(path: Path, what: str, remedy: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FailedPrecondition(f"{what} {path} is missing: {remedy}") from None
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {what} {path}: {exc.strerror}") from None


def _load_cert_file(path: Path, what: str, remedy: str) -> x509.Certificate:
    data = _read_file(path, what, remedy)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise FailedPrecondition(f"{what} {path} is not a PEM certificate") from None


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ca_public_key(ca_cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FailedPrecondition("the federation CA certificate does not hold an ECDSA key")
    return key


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_ca_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# --------------------------------------------------------------------------- identities


def _first_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return ""


def principal_from_certificate(cert: x509.Certificate) -> Principal:
    """The federation identity a certificate was issued to.

    Role and key come from the single ``urn:dmp:`` URI of the SubjectAltName, the name from
    the subject's CN (empty when the CN is just the identity, as for services issued without
    a name), the profession from the subject's TITLE (practitioners only). Raises
    Unauthenticated if the certificate names no valid federation identity.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Unauthenticated(
            "the certificate has no SubjectAltName: it is not a federation certificate"
        ) from None
    except ValueError as exc:
        raise Unauthenticated(f"the certificate has malformed extensions: {exc}") from None
    uris = [
        uri
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(URN_PREFIX)
    ]
    if len(uris) != 1:
        raise Unauthenticated(
            "a federation certificate carries exactly one urn:dmp: URI in its SubjectAltName,"
            f" this one carries {len(uris)}"
        )
    try:
        role, key = parse_uri(uris[0])
    except InvalidArgument as exc:
        raise Unauthenticated(f"invalid federation identity in certificate: {exc}") from None
    name = _first_attribute(cert.subject, NameOID.COMMON_NAME)
    profession = ""
    if role is Role.PRACTITIONER:
        profession = _first_attribute(cert.subject, NameOID.TITLE)
        try:
            check_profession(profession)
        except InvalidArgument as exc:
            raise Unauthenticated(
                f"practitioner certificate without a valid profession: {exc}"
            ) from None
    if name == Principal(role=role, key=key).identity:
        name = ""
    return Principal(role=role, key=key, name=name, profession=profession)


@functools.lru_cache(maxsize=4096)
def certificate_from_pem(pem: bytes) -> x509.Certificate:
    """A certificate from PEM (cached); Unauthenticated if it is not one."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise Unauthenticated("the peer certificate is not a PEM X.509 certificate") from None


@functools.lru_cache(maxsize=4096)
def principal_from_pem(pem: bytes) -> Principal:
    """The principal of a PEM certificate (cached: called on every RPC with the peer cert)."""
    return principal_from_certificate(certificate_from_pem(pem))


def _issue_command(identity: str, pki_dir: Path) -> str:
    """The `dmp pki issue ...` command that creates the files of an identity."""
    try:
        role, key = parse_identity(identity)
    except InvalidArgument:
        return f"`dmp pki issue ... --pki {pki_dir}`"
    if role is Role.NODE:
        args = f"node --region {key}"
    elif role is Role.DIRECTORY:
        args = "directory"
    elif role is Role.PRACTITIONER:
        args = f'practitioner --rpps {key} --profession PROFESSION --name "NAME"'
    else:
        args = f'patient --ins {key} --name "NAME"'
    return f"`dmp pki issue {args} --pki {pki_dir}`"


def _canonical_identity(identity: str) -> str:
    role, key = parse_identity(identity)
    return Principal(role=role, key=key).identity


def certificate_sha256(cert: x509.Certificate | bytes | str) -> str:
    """SHA-256 of a certificate's DER (given as a certificate or its PEM): how a signed
    statement names a node's certificate, and how two PEMs are compared."""
    if not isinstance(cert, x509.Certificate):
        cert = x509.load_pem_x509_certificate(
            cert.encode("ascii") if isinstance(cert, str) else cert
        )
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether the CA signed `cert` (its validity dates and the CRL are the caller's)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True

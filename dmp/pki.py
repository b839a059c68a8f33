"""The federation PKI: one root CA, a certificate per identity, a CRL.

Every key is ECDSA P-256 (grpcio's TLS refuses Ed25519) and every signature SHA-256.
A PKI directory holds:

- ``ca.pem`` / ``ca.key``: the self-signed root CA (the key is mode 0600 and never leaves
  the national operator);
- ``crl.pem``: the revocation list signed by the CA;
- ``<identity>.pem`` / ``<identity>.key``: one leaf certificate and key per identity, named
  ``node-<region>``, ``directory``, ``practitioner-<RPPS>`` or ``patient-<INS>``.

Who a certificate belongs to is the single ``urn:dmp:...`` URI in its SubjectAltName
(:func:`principal_from_certificate`); services (nodes, directory) also carry DNS names and
IP addresses so that clients can check the host name.

A node's certificate also carries the DNS name ``node-<region>.dmp.internal``
(:func:`node_tls_name`), which no other certificate may carry: the directory connects to
region R's announced address with that name as the TLS target, so that standard host name
verification refuses any server that is not node R, wherever it listens.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import functools
import ipaddress
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dmp.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from dmp.identity import (
    URN_PREFIX,
    Principal,
    Role,
    check_profession,
    check_rpps,
    parse_identity,
    parse_uri,
)
from dmp.ins import normalize_ins
from dmp.regions import check_region

__all__ = [
    "CA_COMMON_NAME",
    "DEFAULT_HOSTS",
    "ORGANIZATION",
    "Credentials",
    "IssuedIdentity",
    "Pki",
    "RevocationList",
    "certificate_dns_names",
    "certificate_from_pem",
    "generate_key",
    "load_credentials",
    "load_private_key",
    "node_tls_name",
    "principal_from_certificate",
    "principal_from_pem",
]

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


def _check_principal(principal: Principal) -> Principal:
    """Validate a principal before a certificate is issued to it (InvalidArgument)."""
    role, key = parse_uri(principal.uri)
    if (role, key) != (principal.role, principal.key):
        raise InvalidArgument(f"{principal.uri!r} is not a canonical federation identity")
    if role is Role.PRACTITIONER:
        check_profession(principal.profession)
    elif principal.profession:
        raise InvalidArgument(f"only practitioners have a profession, not a {role.value}")
    if len(principal.name) > 64:
        raise InvalidArgument(f"name {principal.name!r} is longer than 64 characters")
    return principal


def _check_reserved(principal: Principal, host: str) -> None:
    """Only node R's certificate may carry node-R.dmp.internal, and no other such name."""
    folded = host.lower().rstrip(".")
    if folded != NODE_NAME_DOMAIN and not folded.endswith("." + NODE_NAME_DOMAIN):
        return
    if principal.role is Role.NODE and folded == node_tls_name(principal.key):
        return
    raise InvalidArgument(
        f"host {host!r} is reserved: names under .{NODE_NAME_DOMAIN} say which region a node"
        f" serves, and {principal.uri} may carry none but its own"
        + (
            f" ({node_tls_name(principal.key)}, added for it)"
            if principal.role is Role.NODE
            else ""
        )
    )


def _host_names(principal: Principal, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for raw in dict.fromkeys(host.strip() for host in hosts):
        if not raw:
            raise InvalidArgument("a host name must not be empty")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(raw)))
            continue
        except ValueError:
            pass
        if not _HOSTNAME.match(raw):
            raise InvalidArgument(
                f"host {raw!r} is neither an IP address nor a DNS name (ASCII labels)"
            )
        _check_reserved(principal, raw)
        names.append(x509.DNSName(raw))
    return names


# --------------------------------------------------------------------------- the PKI


@dataclass(frozen=True)
class IssuedIdentity:
    """One certificate found in a PKI directory, as `dmp pki list` shows it."""

    identity: str
    uri: str
    name: str
    profession: str
    not_after: datetime
    revoked: bool
    #: Start of validity (None: not known, taken as already valid).
    not_before: datetime | None = None

    def state(self, now: datetime | None = None) -> str:
        """``revoked``, ``expired``, ``not yet valid`` or ``valid``."""
        now = now or _utc_now()
        if self.revoked:
            return "revoked"
        if self.not_after <= now:
            return "expired"
        if self.not_before is not None and now < self.not_before:
            return "not yet valid"
        return "valid"


class Pki:
    """A PKI directory holding the federation root CA, the CRL and the issued certificates.

    ``Pki(directory)`` needs an existing CA (``Pki.init`` creates one); it raises
    FailedPrecondition otherwise.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        if not self.ca_pem_path.is_file() or not self.ca_key_path.is_file():
            raise FailedPrecondition(
                f"no federation CA in {self.directory}: run"
                f" `dmp pki init --pki {self.directory}` first"
            )
        self._ca_cert = _load_cert_file(
            self.ca_pem_path, "CA certificate", f"run `dmp pki init --pki {self.directory}`"
        )
        self._ca_key: ec.EllipticCurvePrivateKey | None = None

    @classmethod
    def load(cls, directory: Path) -> Pki:
        """The PKI in ``directory``; FailedPrecondition if it holds no CA."""
        return cls(directory)

    @classmethod
    def init(cls, directory: Path, *, days: int = 3650) -> Pki:
        """Create the root CA and an empty CRL in ``directory`` (created if needed).

        Refuses with FailedPrecondition if the directory already holds a CA: a new CA would
        silently invalidate every certificate issued by the old one.
        """
        if days <= 0:
            raise InvalidArgument(f"days must be positive, not {days}")
        directory = Path(directory)
        for name in (CA_FILE, CA_KEY_FILE):
            if (directory / name).exists():
                raise FailedPrecondition(
                    f"{directory} already holds a federation CA ({name}): refusing to replace"
                    " it, since a new CA would invalidate every certificate issued so far"
                )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPrecondition(f"cannot create {directory}: {exc.strerror}") from None
        if not directory.is_dir():
            raise FailedPrecondition(f"{directory} is not a directory")

        key = generate_key()
        now = _utc_now()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        public_key = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(key, hashes.SHA256())
        )
        # The key first: a ca.pem without its key would look like a CA that cannot sign.
        _write_private(directory / CA_KEY_FILE, _key_pem(key))
        _write_public(directory / CA_FILE, _cert_pem(cert))
        pki = cls(directory)
        pki._ca_key = key
        pki._write_crl([], crl_number=1)
        log.debug("created the federation root CA in %s", directory)
        return pki

    # -- paths

    @property
    def ca_pem_path(self) -> Path:
        return self.directory / CA_FILE

    @property
    def ca_key_path(self) -> Path:
        return self.directory / CA_KEY_FILE

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    def cert_path(self, identity: str) -> Path:
        """DIR/<identity>.pem; InvalidArgument if ``identity`` is not an identity name."""
        return self.directory / f"{_canonical_identity(identity)}.pem"

    def key_path(self, identity: str) -> Path:
        """DIR/<identity>.key; InvalidArgument if ``identity`` is not an identity name."""
        return self.directory / f"{_canonical_identity(identity)}.key"

    @property
    def ca_certificate(self) -> x509.Certificate:
        return self._ca_cert

    def _signing_key(self) -> ec.EllipticCurvePrivateKey:
        if self._ca_key is None:
            data = _read_file(
                self.ca_key_path, "CA key", f"run `dmp pki init --pki {self.directory}`"
            )
            try:
                key = load_private_key(data)
            except InvalidArgument as exc:
                raise FailedPrecondition(f"CA key {self.ca_key_path}: {exc}") from None
            if key.public_key().public_numbers() != _ca_public_key(self._ca_cert).public_numbers():
                raise FailedPrecondition(
                    f"CA key {self.ca_key_path} does not match CA certificate {self.ca_pem_path}"
                )
            self._ca_key = key
        return self._ca_key

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize read-modify-write of the CRL between processes."""
        with open(self.directory / _LOCK_FILE, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # -- issuing

    def issue(
        self,
        principal: Principal,
        *,
        hosts: Sequence[str] = DEFAULT_HOSTS,
        days: int | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> tuple[Path, Path]:
        """Issue a certificate and a new key to ``principal``; return (cert path, key path).

        Services (nodes, directory) get serverAuth+clientAuth and the ``hosts`` as DNS/IP
        SANs, for ``days`` (default 825); people get clientAuth only, for 365 days by
        default. ``not_before``/``not_after`` override the validity (tests use them to make
        expired certificates). Existing files of the identity are replaced (renewal).
        """
        _check_principal(principal)
        service = principal.role in _SERVICE_ROLES
        if days is not None and days <= 0:
            raise InvalidArgument(f"days must be positive, not {days}")
        now = _utc_now()
        start = _as_utc(not_before) if not_before is not None else now - _CLOCK_SKEW
        if not_after is not None:
            end = _as_utc(not_after)
        else:
            lifetime = timedelta(days=days or (SERVICE_DAYS if service else PERSON_DAYS))
            end = (_as_utc(not_before) if not_before is not None else now) + lifetime
            ca_end = self._ca_cert.not_valid_after_utc
            if end > ca_end:
                log.warning("%s: validity cut to the CA's expiry %s", principal.identity, ca_end)
                end = ca_end
        if end <= start:
            raise InvalidArgument(
                f"the certificate would expire ({end}) before it starts ({start})"
            )

        alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(principal.uri)]
        if service:
            alt_names += _host_names(principal, hosts)
        subject_attributes = [
            x509.NameAttribute(NameOID.COMMON_NAME, principal.name or principal.identity),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
        if principal.role is Role.PRACTITIONER:
            subject_attributes.append(x509.NameAttribute(NameOID.TITLE, principal.profession))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if service:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)

        key = generate_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject_attributes))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(_authority_key_identifier(self._ca_cert), critical=False)
            .sign(self._signing_key(), hashes.SHA256())
        )
        cert_path = self.cert_path(principal.identity)
        key_path = self.key_path(principal.identity)
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, _cert_pem(cert))
        log.debug("issued %s until %s (serial %x)", principal.uri, end, cert.serial_number)
        return cert_path, key_path

    def issue_node(
        self, region: str, hosts: Sequence[str] = DEFAULT_HOSTS, days: int | None = None
    ) -> Principal:
        """Issue node R's certificate: the hosts, and node_tls_name(R) always."""
        principal = Principal(Role.NODE, check_region(region))
        self.issue(principal, hosts=(*hosts, node_tls_name(principal.key)), days=days)
        return principal

    def issue_directory(
        self, hosts: Sequence[str] = DEFAULT_HOSTS, days: int | None = None
    ) -> Principal:
        principal = Principal(Role.DIRECTORY)
        self.issue(principal, hosts=hosts, days=days)
        return principal

    def issue_practitioner(
        self, rpps: str, profession: str, name: str, days: int | None = None
    ) -> Principal:
        principal = Principal(
            Role.PRACTITIONER,
            check_rpps(rpps),
            name=name.strip(),
            profession=check_profession(profession),
        )
        self.issue(principal, days=days)
        return principal

    def issue_patient(self, ins: str, name: str, days: int | None = None) -> Principal:
        principal = Principal(Role.PATIENT, normalize_ins(ins), name=name.strip())
        self.issue(principal, days=days)
        return principal

    # -- revocation

    def _read_crl(self) -> x509.CertificateRevocationList:
        data = _read_file(
            self.crl_path,
            "CRL",
            "it is created by `dmp pki init`; restore it from a backup (an empty one would"
            " forget every revocation)",
        )
        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError:
            raise FailedPrecondition(f"CRL {self.crl_path} is not a PEM CRL") from None
        if crl.issuer != self._ca_cert.subject or not crl.is_signature_valid(
            _ca_public_key(self._ca_cert)
        ):
            raise FailedPrecondition(f"CRL {self.crl_path} is not signed by the federation CA")
        return crl

    def _write_crl(self, revoked: Sequence[x509.RevokedCertificate], *, crl_number: int) -> None:
        now = _utc_now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._ca_cert.subject)
            .last_update(now)
            .next_update(now + timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(crl_number), critical=False)
            .add_extension(_authority_key_identifier(self._ca_cert), critical=False)
        )
        for entry in revoked:
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._signing_key(), hashes.SHA256())
        _write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def revoked_serials(self) -> frozenset[int]:
        """The serial numbers in the CRL (FailedPrecondition if it is missing or bad)."""
        return frozenset(entry.serial_number for entry in self._read_crl())

    def revoke(self, identity: str) -> None:
        """Add the identity's current certificate to the CRL and re-sign it.

        Earlier entries are kept; revoking the same certificate again only re-signs the CRL
        (pushing its next update back). NotFound if the identity has no certificate here.
        """
        cert_path = self.cert_path(identity)
        if not cert_path.is_file():
            raise NotFound(
                f"no certificate for {identity!r} in {self.directory}:"
                f" `dmp pki list --pki {self.directory}` shows the issued identities"
            )
        cert = _load_cert_file(cert_path, "certificate", "re-issue it with `dmp pki issue`")
        with self._locked():
            crl = self._read_crl()
            entries = list(crl)
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is None:
                entries.append(
                    x509.RevokedCertificateBuilder()
                    .serial_number(cert.serial_number)
                    .revocation_date(_utc_now())
                    .build()
                )
            try:
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            except x509.ExtensionNotFound:
                number = 0
            self._write_crl(entries, crl_number=number + 1)
        log.debug("revoked %s (serial %x)", cert_path.stem, cert.serial_number)

    # -- listing

    def list(self) -> builtins.list[IssuedIdentity]:
        """Every certificate issued in this directory, sorted by identity."""
        revoked = self.revoked_serials()
        found: list[IssuedIdentity] = []
        for path in sorted(self.directory.glob("*.pem")):
            if path.name in (CA_FILE, CRL_FILE):
                continue
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                principal = principal_from_certificate(cert)
            except (OSError, ValueError, Unauthenticated) as exc:
                log.warning("skipping %s: not a federation certificate (%s)", path, exc)
                continue
            found.append(
                IssuedIdentity(
                    identity=path.stem,
                    uri=principal.uri,
                    name=principal.name,
                    profession=principal.profession,
                    not_after=cert.not_valid_after_utc,
                    revoked=cert.serial_number in revoked,
                    not_before=cert.not_valid_before_utc,
                )
            )
        return sorted(found, key=lambda issued: issued.identity)


# --------------------------------------------------------------------------- revocation


class RevocationList:
    """The revoked serials of the federation CRL, kept in memory and refreshed on change.

    ``is_revoked`` is cheap: at most once per ``check_interval`` seconds it stats the file
    and re-reads it only if its inode, mtime or size changed. A CRL that is missing,
    unreadable or not signed by the CA is ignored with a warning and the last good set is
    kept; at construction it raises FailedPrecondition. Thread-safe.
    """

    def __init__(
        self, crl_path: Path, ca_cert: x509.Certificate, *, check_interval: float = 1.0
    ) -> None:
        self._path = Path(crl_path)
        self._ca_cert = ca_cert
        self._ca_key = _ca_public_key(ca_cert)
        self._interval = check_interval
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None
        self._serials: dict[int, datetime]
        try:
            self._stamp, self._serials = self._read()
        except _BadCrl as exc:
            raise FailedPrecondition(str(exc)) from None
        self._next_check = time.monotonic() + check_interval

    @property
    def path(self) -> Path:
        return self._path

    @property
    def revoked_serials(self) -> frozenset[int]:
        return frozenset(self._serials)

    def is_revoked(self, cert: x509.Certificate) -> bool:
        self._maybe_refresh()
        return cert.serial_number in self._serials

    def revoked_at(self, cert: x509.Certificate) -> datetime | None:
        """When the CA revoked `cert` (the CRL entry's revocation date), None if it did not:
        what a certificate signed before then stays valid (a patient's directives)."""
        self._maybe_refresh()
        return self._serials.get(cert.serial_number)

    def reload(self) -> bool:
        """Re-read the CRL now, whether or not it changed; True if it was read and good."""
        with self._lock:
            return self._refresh(force=True)

    def _maybe_refresh(self) -> None:
        if time.monotonic() < self._next_check:
            return
        # Another thread already refreshing: keep answering from the current set.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() >= self._next_check:
                self._refresh(force=False)
        finally:
            self._lock.release()

    def _refresh(self, *, force: bool) -> bool:
        """Re-read if forced or the file changed; called with the lock held."""
        self._next_check = time.monotonic() + self._interval
        try:
            stamp = self._stat()
        except _BadCrl as exc:
            if force or self._stamp is not None:
                log.warning("%s; keeping the last good revocation list", exc)
            self._stamp = None
            return False
        if not force and stamp == self._stamp:
            return True
        try:
            stamp, serials = self._read()
        except _BadCrl as exc:
            # Remember the bad file so the warning is logged once, not at every check.
            self._stamp = stamp
            log.warning("%s; keeping the last good revocation list", exc)
            return False
        if serials != self._serials:
            log.info("revocation list %s: %d revoked certificate(s)", self._path, len(serials))
        self._stamp, self._serials = stamp, serials
        return True

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise _BadCrl(f"CRL {self._path} cannot be read: {exc.strerror}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> tuple[tuple[int, int, int], dict[int, datetime]]:
        try:
            with open(self._path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as exc:
            raise _BadCrl(f"CRL {self._path} cannot be read: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError:
            raise _BadCrl(f"CRL {self._path} is not a PEM CRL") from None
        try:
            valid = crl.issuer == self._ca_cert.subject and crl.is_signature_valid(self._ca_key)
        except (InvalidSignature, ValueError, TypeError):
            valid = False
        if not valid:
            raise _BadCrl(f"CRL {self._path} is not signed by the federation CA")
        next_update = crl.next_update_utc
        if next_update is not None and next_update < _utc_now():
            log.warning(
                "CRL %s is stale (next update was due %s): re-sign it with the CA",
                self._path,
                next_update,
            )
        return stamp, {entry.serial_number: entry.revocation_date_utc for entry in crl}


class _BadCrl(Exception):
    pass


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """What a process needs for mutual TLS: the CA, its certificate and key, who it is."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    principal: Principal


def load_credentials(pki_dir: Path, identity: str) -> Credentials:
    """Read DIR/ca.pem and DIR/<identity>.pem/.key and check they belong together.

    Needs neither the CA key nor the CRL, so a node's directory can hold only its own
    files. FailedPrecondition names a missing or wrong file and the command that makes it.
    """
    pki_dir = Path(pki_dir)
    canonical = _canonical_identity(identity)
    issue = _issue_command(canonical, pki_dir)
    ca_path = pki_dir / CA_FILE
    cert_path = pki_dir / f"{canonical}.pem"
    key_path = pki_dir / f"{canonical}.key"
    ca_pem = _read_file(
        ca_path,
        "CA certificate",
        f"copy it from the federation PKI or run `dmp pki init --pki {pki_dir}`",
    )
    cert_pem = _read_file(cert_path, "certificate", f"run {issue}")
    key_pem = _read_file(key_path, "private key", f"run {issue}")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise FailedPrecondition(f"CA certificate {ca_path} is not a PEM certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise FailedPrecondition(f"certificate {cert_path} is not a PEM certificate") from None
    try:
        key = load_private_key(key_pem)
    except InvalidArgument as exc:
        raise FailedPrecondition(f"private key {key_path}: {exc}") from None
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise FailedPrecondition(
            f"certificate {cert_path} was not issued by the CA in {ca_path}:"
            f" re-issue it with {issue}"
        ) from None
    cert_key = cert.public_key()
    if (
        not isinstance(cert_key, ec.EllipticCurvePublicKey)
        or cert_key.public_numbers() != key.public_key().public_numbers()
    ):
        raise FailedPrecondition(
            f"private key {key_path} does not match certificate {cert_path}: re-issue with {issue}"
        )
    try:
        principal = principal_from_certificate(cert)
    except Unauthenticated as exc:
        raise FailedPrecondition(f"certificate {cert_path}: {exc}") from None
    if principal.identity != canonical:
        raise FailedPrecondition(
            f"certificate {cert_path} was issued to {principal.uri}, not to {canonical}"
        )
    return Credentials(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, principal=principal)

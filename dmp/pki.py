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
import ipaddress
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dmp.certificates import (
    _CLOCK_SKEW,
    _HOSTNAME,
    _LOCK_FILE,
    _SERVICE_ROLES,
    CA_COMMON_NAME,
    CA_FILE,
    CA_KEY_FILE,
    CRL_DAYS,
    CRL_FILE,
    DEFAULT_HOSTS,
    NODE_NAME_DOMAIN,
    ORGANIZATION,
    PERSON_DAYS,
    SERVICE_DAYS,
    _as_utc,
    _authority_key_identifier,
    _ca_public_key,
    _canonical_identity,
    _cert_pem,
    _key_pem,
    _load_cert_file,
    _read_file,
    _utc_now,
    _write_private,
    _write_public,
    certificate_dns_names,
    certificate_from_pem,
    generate_key,
    issued_by,
    load_private_key,
    node_tls_name,
    principal_from_certificate,
    principal_from_pem,
)
from dmp.credentials import Credentials, load_credentials
from dmp.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated
from dmp.identity import (
    Principal,
    Role,
    check_profession,
    check_rpps,
    parse_uri,
)
from dmp.ins import normalize_ins
from dmp.regions import check_region
from dmp.revocation import RevocationList

__all__ = [
    "CA_COMMON_NAME",
    "CA_FILE",
    "CA_KEY_FILE",
    "CRL_DAYS",
    "CRL_FILE",
    "DEFAULT_HOSTS",
    "NODE_NAME_DOMAIN",
    "ORGANIZATION",
    "PERSON_DAYS",
    "SERVICE_DAYS",
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
        self.revoke_certificate(cert)

    def revoke_certificate(self, cert: x509.Certificate) -> None:
        """Revoke a certificate this CA issued, current or not (a region's predecessor
        node after a hand-over, whose identity the successor's certificate now holds)."""
        if not issued_by(cert, self._ca_cert):
            raise FailedPrecondition(
                f"this certificate was not issued by the CA in {self.directory}"
            )
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
        log.debug("revoked serial %x", cert.serial_number)

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

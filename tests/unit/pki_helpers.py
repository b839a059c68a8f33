"""What the PKI tests share: identities, and reading back what the PKI wrote."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from dmp.ins import make_ins
from dmp.pki import Pki

RPPS = "10003456789"
INS = make_ins("1850275123456")
WRONG_KEY_INS = INS[:-1] + str((int(INS[-1]) + 1) % 10)


def read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def dns_and_ips(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return san.get_values_for_type(x509.DNSName), ips


def read_crl(pki: Pki) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pki.crl_path.read_bytes())


def ca_public_key(pki: Pki) -> ec.EllipticCurvePublicKey:
    key = read_cert(pki.ca_pem_path).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key

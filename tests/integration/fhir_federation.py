"""A federation for the FHIR gateway's tests: a directory and three nodes over mutual TLS
(SQLite files or PostgreSQL databases), one patient's records spread over the regions, and
`dmp fhir serve` processes on real ports that the tests reach over real HTTP.

What the gateway answers is validated with fhirclient's R4 (4.0.1) models, an FHIR
implementation that is not ours: every resource is parsed strictly (unknown elements,
wrong types and missing required elements refused) and serialized back.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fhirclient.models.fhirelementfactory import FHIRElementFactory

from directory.app import RunningDirectory
from dmp.cli.patient import changed
from dmp.client import DirectoryClient, NodeClient, view_request
from dmp.pki import Pki, load_credentials
from dmp.v1 import record_pb2
from node.app import RunningNode
from tests.federation import (
    DOCTOR,
    OTHER_PATIENT,
    PATIENT,
    REGIONS,
    draft,
    identity_of,
    make_pki,
    running_directory,
    running_node,
    wait_for,
    wait_listening,
)

INS_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
RPPS_SYSTEM = "https://rpps.esante.gouv.fr"
DOC = f"practitioner-{DOCTOR}"
K = record_pb2

#: (region, kind, LOINC code, title, content type, content, days ago, confidentiality)
RECORDS: list[tuple[str, int, str, str, str, bytes, int, int]] = [
    ("11", K.RECORD_KIND_DOCUMENT, "11488-4", "Compte rendu de consultation", "application/pdf",
     b"%PDF-1.4 consultation\n" + bytes(range(256)) * 1200, 10, K.CONFIDENTIALITY_NORMAL),
    ("11", K.RECORD_KIND_DOCUMENT, "18842-5", "Lettre de sortie", "text/plain",
     "Sortie le 3 mars, état stable.\n".encode(), 40, K.CONFIDENTIALITY_RESTRICTED),
    ("11", K.RECORD_KIND_DOCUMENT, "11488-4", "Consultation de suivi", "text/plain",
     b"suivi", 400, K.CONFIDENTIALITY_NORMAL),
    ("53", K.RECORD_KIND_ALLERGY, "48765-2", "Allergie : pénicillines", "application/fhir+json",
     b'{"resourceType":"AllergyIntolerance"}', 20, K.CONFIDENTIALITY_NORMAL),
    ("53", K.RECORD_KIND_IMMUNIZATION, "11369-6", "Vaccination : grippe", "application/fhir+json",
     b'{"resourceType":"Immunization"}', 30, K.CONFIDENTIALITY_NORMAL),
    ("84", K.RECORD_KIND_OBSERVATION, "8716-3", "Constantes vitales", "application/fhir+json",
     b'{"resourceType":"Observation"}', 5, K.CONFIDENTIALITY_NORMAL),
    ("84", K.RECORD_KIND_CONDITION, "11450-4", "Problème : diabète de type 2", "text/plain",
     b"diabete", 60, K.CONFIDENTIALITY_NORMAL),
    ("84", K.RECORD_KIND_PRESCRIPTION, "57833-6", "Ordonnance", "application/pdf",
     b"%PDF-1.4 ordonnance", 2, K.CONFIDENTIALITY_NORMAL),
]  # fmt: skip


@dataclass
class Gateway:
    process: subprocess.Popen[str]
    address: str
    scheme: str = "http"
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.address}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@dataclass
class FhirFed:
    root: Path
    pki_dir: Path
    pki: Pki
    directory: RunningDirectory
    nodes: dict[str, RunningNode]
    #: Record id → (region, content) of everything written.
    written: dict[str, tuple[str, record_pb2.Record, bytes]] = field(default_factory=dict)
    gateways: list[Gateway] = field(default_factory=list)

    @property
    def directory_address(self) -> str:
        return f"127.0.0.1:{self.directory.port}"

    def gateway(self, identity: str, *extra: str) -> Gateway:
        """`dmp fhir serve` as its own process; its log goes to a file (a pipe nobody
        reads would fill and stall it)."""
        log_path = self.root / f"gateway-{len(self.gateways)}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "dmp.cli.main", "fhir", "serve",
                    "--pki", str(self.pki_dir), "--as", identity,
                    "--directory", self.directory_address, "--listen", "127.0.0.1:0", *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )  # fmt: skip
        scheme = "https" if "--tls" in extra else "http"
        gateway = Gateway(process, wait_listening(process), scheme, log_path)
        self.gateways.append(gateway)
        return gateway

    def close(self) -> None:
        for gateway in self.gateways:
            gateway.stop()

    def by_title(self, title: str) -> tuple[str, record_pb2.Record, bytes]:
        return next(v for v in self.written.values() if v[1].title == title)


def _write_records(fed: FhirFed) -> None:
    creds = load_credentials(fed.pki_dir, DOC)
    now = datetime.now(UTC)
    with DirectoryClient(fed.directory_address, creds) as directory:
        directory.register_patient(identity_of(PATIENT), timeout=10)
        directory.register_patient(identity_of(OTHER_PATIENT, "LEROY", ("MARIE",)), timeout=10)
    for region, kind, code, title, media, content, days, confidentiality in RECORDS:
        record = draft(PATIENT, kind=kind, code=code, title=title)
        record.content_type = media
        record.confidentiality = confidentiality  # type: ignore[assignment]
        record.effective_time.FromDatetime(now - timedelta(days=days))
        with NodeClient(f"127.0.0.1:{fed.nodes[region].port}", creds) as node:
            stored = node.put_record(record, content, patient=identity_of(PATIENT))
        fed.written[stored.id] = (region, stored, content)

    def located() -> bool:
        with DirectoryClient(fed.directory_address, creds) as directory:
            view = directory.view(view_request(PATIENT), timeout=10)
        return len(view.records) == len(RECORDS)

    wait_for(located, "the directory to locate every record", timeout=30)


def mask(fed: FhirFed, record_id: str) -> None:
    """The patient masks a record (their own signed directives)."""
    creds = load_credentials(fed.pki_dir, f"patient-{PATIENT}")
    with DirectoryClient(fed.directory_address, creds) as directory:
        directory.set_directives(changed(directory.directives(PATIENT), "mask", record_id))


@contextmanager
def running_fhir_federation(root: Path, db: Callable[[str], str]) -> Iterator[FhirFed]:
    pki_dir = root / "pki"
    pki = make_pki(pki_dir)
    with ExitStack() as stack:
        directory = stack.enter_context(
            running_directory(pki_dir, db("directory"), health_interval=0.2, region_deadline=2.0)
        )
        nodes = {
            region: stack.enter_context(
                running_node(
                    pki_dir, region, db(f"node-{region}"), directory=f"127.0.0.1:{directory.port}"
                )
            )
            for region in REGIONS
        }
        wait_for(
            lambda: len([r for r in directory.discovery.routes().values() if r.healthy]) == 3,
            "3 healthy nodes",
        )
        fed = FhirFed(root, pki_dir, pki, directory, nodes)
        stack.callback(fed.close)
        _write_records(fed)
        yield fed


# -- validation with fhirclient's R4 models -------------------------------------------------


def validate(resource: dict[str, Any]) -> Any:
    """Parse ``resource`` strictly with fhirclient's R4 models and serialize it back (which
    checks required elements); return the model."""
    model = FHIRElementFactory.instantiate(resource["resourceType"], resource)
    assert type(model).__name__ == resource["resourceType"], f"not an R4 {resource['resourceType']}"
    model.as_json()
    return model


def outcome_issues(resource: dict[str, Any]) -> list[dict[str, Any]]:
    validate(resource)
    assert resource["resourceType"] == "OperationOutcome"
    return list(resource["issue"])


# -- a server certificate for the gateway, from the federation CA ---------------------------


def gateway_server_cert(pki_dir: Path, out: Path) -> tuple[Path, Path]:
    """What an operator would issue for the gateway's host (localhost, 127.0.0.1)."""
    import ipaddress

    ca_cert = x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhir-gateway")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / "gateway.pem", out / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

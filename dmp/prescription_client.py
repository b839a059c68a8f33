"""The typed client of e-prescriptions: PrescriptionService at a node or at the directory
(the same service: the directory relays each act to the node the id names).

Each call signs a fresh access assertion for its one operation on the one prescription
(record_id = the prescription id); a pharmacist who scanned an id need not know the
patient's INS, so the assertion names the patient only when the caller gives it (a
patient's own calls name themselves). `create` builds the prescription, signs it with the
prescriber's own key and sends it. Answers are the contract's messages, or the domain
values of dmp/prescriptions.py.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from dmp.client import Operation, _Client
from dmp.errors import FailedPrecondition
from dmp.identity import Role
from dmp.pki import CRL_FILE, Credentials, RevocationList, principal_from_certificate
from dmp.prescriptions import build_prescription, new_prescription_id, sign_prescription
from dmp.signing import SignatureVerifier
from dmp.v1 import access_pb2
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import prescription_pb2 as pb
from dmp.v1.prescription_pb2_grpc import PrescriptionServiceStub

FIND_PRESCRIPTIONS = access_pb2.OPERATION_FIND_PRESCRIPTIONS
READ_PRESCRIPTION = access_pb2.OPERATION_READ_PRESCRIPTION
DISPENSE = access_pb2.OPERATION_DISPENSE
CANCEL_PRESCRIPTION = access_pb2.OPERATION_CANCEL_PRESCRIPTION


@dataclass
class Found:
    """A patient's prescriptions, newest first, and how each region answered (at the
    directory; a node answers for itself and names no region)."""

    prescriptions: list[pb.StoredPrescription] = field(default_factory=list)
    regions: dict[str, dpb.RegionStatus] = field(default_factory=dict)


def idempotency_key() -> str:
    """A fresh idempotency key for one dispensing (its retries reuse it)."""
    return uuid.uuid4().hex


def federation_verifier(pki_dir: Path, credentials: Credentials) -> SignatureVerifier:
    """Checks signatures against the federation CA of `credentials` and the CRL in
    `pki_dir`: what anyone verifies a prescription's signature with."""
    ca = x509.load_pem_x509_certificate(credentials.ca_pem)
    return SignatureVerifier(ca, RevocationList(Path(pki_dir) / CRL_FILE, ca))


def node_region(target: str, credentials: Credentials, *, timeout: float = 5.0) -> str:
    """The region of the node at `target` (HOST:PORT), from the certificate it presents
    in a TLS handshake checked against the federation CA."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise FailedPrecondition(f"node address {target!r} must be HOST:PORT")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the node's URI names it, not the host name we dialled
    context.load_verify_locations(cadata=credentials.ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as private:  # ssl loads a client key from files only
        cert, key = Path(private) / "cert.pem", Path(private) / "key.pem"
        cert.write_bytes(credentials.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(credentials.key_pem)
        context.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise FailedPrecondition(
            f"cannot learn the region of the node at {target} ({exc}): give it with --region"
        ) from None
    principal = principal_from_certificate(x509.load_der_x509_certificate(der or b""))
    if principal.role is not Role.NODE:
        raise FailedPrecondition(f"{target} is {principal.uri}, not a regional node")
    return principal.key


class PrescriptionClient(_Client):
    """PrescriptionService at a node or at the directory, as one identity."""

    _stub_type = PrescriptionServiceStub
    stub: PrescriptionServiceStub

    def _signed(
        self, operation: Operation, prescription_id: str, patient_ins: str
    ) -> tuple[tuple[str, bytes], ...]:
        principal = self.signer.principal
        if not patient_ins and principal.role is Role.PATIENT:
            patient_ins = principal.key
        return self.assertion(patient_ins, operation=operation, record_id=prescription_id)

    def create(
        self,
        patient_ins: str,
        lines: Sequence[pb.PrescriptionLine],
        *,
        region: str,
        organization: str = "",
        renewals: int = 0,
        min_interval_days: int = 0,
        dispense_before: datetime | None = None,
        treatment_end: datetime | None = None,
        prescription_id: str = "",
        timeout: float = 10,
    ) -> pb.StoredPrescription:
        """Write a prescription held by the node of `region`: built, signed with our own
        (the prescriber's) key, and stored; the prescription as stored."""
        prescription = build_prescription(
            prescription_id=prescription_id or new_prescription_id(region),
            patient_ins=patient_ins,
            prescriber=self.signer.principal,
            organization=organization,
            lines=list(lines),
            renewals=renewals,
            min_interval_days=min_interval_days,
            now=datetime.now(UTC),
            dispense_before=dispense_before,
            treatment_end=treatment_end,
        )
        return self.store(sign_prescription(prescription, self.signer), timeout=timeout)

    def store(self, signed: pb.SignedPrescription, *, timeout: float = 10) -> pb.StoredPrescription:
        """Store a prescription already signed (a retry sends the same bytes)."""
        answer: pb.CreatePrescriptionResponse = self.stub.CreatePrescription(
            pb.CreatePrescriptionRequest(signed=signed), timeout=timeout
        )
        return answer.prescription

    def get(
        self, prescription_id: str, *, patient_ins: str = "", timeout: float = 10
    ) -> pb.StoredPrescription:
        """One prescription, its signature and its state (by its id, as scanned)."""
        answer: pb.GetPrescriptionResponse = self.stub.GetPrescription(
            pb.GetPrescriptionRequest(prescription_id=prescription_id),
            timeout=timeout,
            metadata=self._signed(READ_PRESCRIPTION, prescription_id, patient_ins),
        )
        return answer.prescription

    def claim(
        self,
        prescription_id: str,
        pharmacy: str,
        *,
        hold_seconds: int = 0,
        patient_ins: str = "",
        timeout: float = 10,
    ) -> pb.StoredPrescription:
        """Hold the prescription for `pharmacy` while it prepares the dispensing."""
        answer: pb.ClaimPrescriptionResponse = self.stub.ClaimPrescription(
            pb.ClaimPrescriptionRequest(
                prescription_id=prescription_id, pharmacy=pharmacy, hold_seconds=hold_seconds
            ),
            timeout=timeout,
            metadata=self._signed(DISPENSE, prescription_id, patient_ins),
        )
        return answer.prescription

    def release(
        self, prescription_id: str, *, patient_ins: str = "", timeout: float = 10
    ) -> pb.StoredPrescription:
        """Give up our own hold."""
        answer: pb.ReleasePrescriptionResponse = self.stub.ReleasePrescription(
            pb.ReleasePrescriptionRequest(prescription_id=prescription_id),
            timeout=timeout,
            metadata=self._signed(DISPENSE, prescription_id, patient_ins),
        )
        return answer.prescription

    def dispense(
        self,
        prescription_id: str,
        lines: Iterable[pb.DispensedLine],
        *,
        pharmacy: str,
        key: str = "",
        patient_ins: str = "",
        timeout: float = 10,
    ) -> tuple[pb.Dispensation, pb.StoredPrescription]:
        """Record one dispensing (a retry with the same `key` answers the first outcome);
        the dispensing as recorded and the prescription's state after it."""
        dispensation = pb.Dispensation(
            prescription_id=prescription_id,
            lines=list(lines),
            pharmacy=pharmacy,
            idempotency_key=key or idempotency_key(),
        )
        answer: pb.DispensePrescriptionResponse = self.stub.DispensePrescription(
            pb.DispensePrescriptionRequest(dispensation=dispensation),
            timeout=timeout,
            metadata=self._signed(DISPENSE, prescription_id, patient_ins),
        )
        return answer.dispensation, answer.prescription

    def cancel(
        self, prescription_id: str, reason: str, *, patient_ins: str = "", timeout: float = 10
    ) -> pb.StoredPrescription:
        """Cancel our own prescription (or its remaining renewals)."""
        answer: pb.CancelPrescriptionResponse = self.stub.CancelPrescription(
            pb.CancelPrescriptionRequest(prescription_id=prescription_id, reason=reason),
            timeout=timeout,
            metadata=self._signed(CANCEL_PRESCRIPTION, prescription_id, patient_ins),
        )
        return answer.prescription

    def find(
        self,
        patient_ins: str,
        *,
        statuses: Iterable[pb.PrescriptionStatus.ValueType] = (),
        timeout: float = 10,
    ) -> Found:
        """The patient's prescriptions (by default those still dispensable), newest
        first, with each region's status at the directory."""
        answer: pb.FindPrescriptionsResponse = self.stub.FindPrescriptions(
            pb.FindPrescriptionsRequest(patient_ins=patient_ins, statuses=list(statuses)),
            timeout=timeout,
            metadata=self.assertion(patient_ins, operation=FIND_PRESCRIPTIONS),
        )
        return Found(list(answer.prescriptions), {s.region: s for s in answer.regions})


__all__ = [
    "CANCEL_PRESCRIPTION",
    "DISPENSE",
    "FIND_PRESCRIPTIONS",
    "READ_PRESCRIPTION",
    "Found",
    "PrescriptionClient",
    "federation_verifier",
    "idempotency_key",
    "node_region",
]

"""The demo's e-prescription scene: a doctor in region 11 prescribes with one renewal, a
pharmacist in region 84 scans the id and dispenses through the directory, a second
pharmacy tries the same day and is refused, and the patient sees both in their history.

Everything goes through the typed clients, as a prescriber's and a pharmacy's software
would; the scene prints what the federation answered, refusals included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from dmp.client import DirectoryClient
from dmp.pki import Pki, load_credentials
from dmp.prescription_client import PrescriptionClient, federation_verifier
from dmp.prescriptions import parse_line, verify_prescription
from dmp.printing import dispensation_text, print_history, print_prescription, state_text
from dmp.regions import region_name
from dmp.server import error_reason
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import prescription_pb2 as pb

PRESCRIBING_REGION = "11"
DISPENSING_REGION = "84"
#: (RPPS, profession, name, where they work) of the scene's professionals.
DOCTOR = ("10000001101", "doctor", "Dr Hélène BERNARD", "Cabinet médical Alésia, Paris 14e")
PHARMACIST = ("10000008401", "pharmacist", "Mme Chloé MOREL", "Pharmacie de la Croix-Rousse, Lyon")
OTHER_PHARMACIST = ("10000008402", "pharmacist", "M. Hugo FAURE", "Pharmacie des Alpes, Grenoble")
LINES = (
    "3400935955838|1|1 comprimé|3 fois par jour|7 jours",
    "3400930000014|2|1 sachet|matin et soir|30 jours",
)
RENEWAL_INTERVAL_DAYS = 28


class SceneError(Exception):
    """The scene saw what the rules forbid: one line for the operator."""


@dataclass(frozen=True)
class SceneResult:
    prescription_id: str
    refusal_reason: str


def _identity(person: tuple[str, str, str, str]) -> str:
    return f"practitioner-{person[0]}"


def issue_identities(pki_dir: Path) -> None:
    """The scene's professionals, in the demo's PKI."""
    pki = Pki.load(pki_dir)
    for rpps, profession, name, _ in (DOCTOR, PHARMACIST, OTHER_PHARMACIST):
        pki.issue_practitioner(rpps, profession, name)


def _all_remaining(stored: pb.StoredPrescription) -> list[pb.DispensedLine]:
    return [
        pb.DispensedLine(line=r.line, quantity=r.quantity)
        for r in stored.state.remaining
        if r.quantity > 0
    ]


def run_scene(
    pki_dir: Path, directory: str, nodes: dict[str, str], patient_ins: str, patient_name: str
) -> SceneResult:
    """Play the scene against a running federation; print it as it goes."""
    issue_identities(pki_dir)
    doctor, pharmacist, other = DOCTOR, PHARMACIST, OTHER_PHARMACIST
    print(
        f"== {doctor[2]} ({doctor[1]}, {doctor[3]}, region {PRESCRIBING_REGION}"
        f" {region_name(PRESCRIBING_REGION)}) prescribes for {patient_name}, one renewal"
        f" after {RENEWAL_INTERVAL_DAYS} days (dmp prescription create)"
    )
    with PrescriptionClient(
        nodes[PRESCRIBING_REGION], load_credentials(pki_dir, _identity(doctor))
    ) as prescriber:
        stored = prescriber.create(
            patient_ins,
            [parse_line(text) for text in LINES],
            region=PRESCRIBING_REGION,
            organization=doctor[3],
            renewals=1,
            min_interval_days=RENEWAL_INTERVAL_DAYS,
        )
    prescription_id = pb.Prescription.FromString(stored.signed.prescription).id
    print(f"prescription {prescription_id}: signed with the doctor's key, held by node 11")
    print()
    print(
        f"== {pharmacist[2]} ({pharmacist[3]}, region {DISPENSING_REGION}"
        f" {region_name(DISPENSING_REGION)}) scans {prescription_id}: through the directory"
        " (dmp prescription show, dispense)"
    )
    creds = load_credentials(pki_dir, _identity(pharmacist))
    with PrescriptionClient(directory, creds) as pharmacy:
        stored = pharmacy.get(prescription_id)
        prescription, signer = verify_prescription(
            stored.signed, federation_verifier(pki_dir, creds), lasting=True
        )
        print_prescription(
            prescription, stored, f"verified: signed by {signer.name} ({signer.uri})"
        )
        dispensation, after = pharmacy.dispense(
            prescription_id, _all_remaining(stored), pharmacy=pharmacist[3]
        )
    print(f"dispensed: {dispensation_text(dispensation)}")
    print(f"now {state_text(after)}")
    print()
    print(f"== the same day, {other[2]} ({other[3]}) tries to dispense {prescription_id} too")
    with PrescriptionClient(directory, load_credentials(pki_dir, _identity(other))) as second:
        try:
            second.dispense(prescription_id, _all_remaining(stored), pharmacy=other[3])
        except grpc.RpcError as exc:
            reason = error_reason(exc) or exc.code().name
            print(f"refused: {exc.code().name} {reason}: {exc.details()}")
        else:
            raise SceneError(f"a second pharmacy dispensed {prescription_id} the same day")
    print()
    print(f"== {patient_name} reads who accessed this prescription (dmp patient history)")
    with DirectoryClient(directory, load_credentials(pki_dir, f"patient-{patient_ins}")) as patient:
        history = patient.access_history(patient_ins, limit=1000)
    mine = [e for e in history.events if prescription_id in e.participant_object_record_ids]
    print_history(dpb.GetAccessHistoryResponse(events=mine, regions=history.regions))
    return SceneResult(prescription_id, reason)

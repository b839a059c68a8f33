"""What e-prescription leaves behind, with a directory, over mTLS, the node on SQLite and
PostgreSQL: the patient's directives apply (a blocked pharmacist is refused), the
prescription and each dispensing are records of the consolidated view linked to their
prescription (FHIR content), and every step is in the patient's access history."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from dmp.client import DirectoryClient
from dmp.directives import PatientDirectives
from dmp.ins import make_ins
from dmp.pki import load_credentials
from dmp.prescriptions import ALREADY_DISPENSED
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import record_pb2
from node.app import RunningNode
from tests.federation import DOCTOR, OTHER_DOCTOR, running_directory, wait_for
from tests.integration.prescription_helpers import (
    PHARMACISTS,
    Actor,
    make_rx_pki,
    patient,
    practitioner,
    refusal,
    rx_id,
    rx_node,
)

#: Patients of this module only: each test has its own.
BLOCKING = make_ins("1010275123001")
FOLLOWED = make_ins("1020275123002")
MASKING = make_ins("1030275123003")


@dataclass
class Fed:
    pki_dir: Path
    directory_port: int
    node: RunningNode

    def actor(self, identity: str) -> Actor:
        return Actor(self.pki_dir, identity, self.node.port)

    def directory(self, identity: str) -> DirectoryClient:
        credentials = load_credentials(self.pki_dir, identity)
        return DirectoryClient(f"127.0.0.1:{self.directory_port}", credentials)


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rx-trail-pki")
    pki = make_rx_pki(directory)
    pki.issue_patient(BLOCKING, "Louise BLOQUE")
    pki.issue_patient(FOLLOWED, "Paul SUIVI")
    pki.issue_patient(MASKING, "Marc MASQUE")
    return directory


@pytest.fixture
def fed(rx_pki: Path, db_url: str, tmp_path: Path) -> Iterator[Fed]:
    with running_directory(rx_pki, f"sqlite:///{tmp_path / 'directory.db'}") as directory:
        address = f"127.0.0.1:{directory.port}"
        with rx_node(rx_pki, db_url, directory=address) as (node, _):
            yield Fed(rx_pki, directory.port, node)


def test_a_pharmacist_the_patient_blocked_is_refused(fed: Fed) -> None:
    ins = BLOCKING
    blocked = PHARMACISTS[1]
    with fed.directory(patient(ins)) as me:
        me.set_directives(PatientDirectives(ins, version=1, blocked_rpps=frozenset({blocked})))
    doctor, refused, allowed = (
        fed.actor(practitioner(DOCTOR)),
        fed.actor(practitioner(blocked)),
        fed.actor(practitioner(PHARMACISTS[0])),
    )
    try:
        rx = rx_id(doctor.prescribe(patient=ins))
        for call in (
            lambda: refused.get(rx),
            lambda: refused.claim(rx),
            lambda: refused.dispense(rx),
            lambda: refused.find(ins),
        ):
            answer = refusal(call)
            assert answer.code == grpc.StatusCode.PERMISSION_DENIED
            assert "blocked" in answer.message
        assert allowed.dispense(rx).dispensation.dispensing == 0
    finally:
        for actor in (doctor, refused, allowed):
            actor.close()
    with fed.directory(patient(ins)) as me:
        history = me.access_history(ins).events
    refusals = [
        e for e in history if e.active_participant_user_id == f"urn:dmp:practitioner:{blocked}"
    ]
    assert refusals and {e.status_code for e in refusals} == {"PERMISSION_DENIED"}


def test_records_and_history_of_a_prescription(fed: Fed) -> None:
    ins = FOLLOWED
    doctor = fed.actor(practitioner(DOCTOR))
    first, second = fed.actor(practitioner(PHARMACISTS[0])), fed.actor(practitioner(PHARMACISTS[1]))
    try:
        rx = rx_id(doctor.prescribe(patient=ins, renewals=0))
        assert [rx_id(s) for s in first.find(ins)] == [rx]
        first.get(rx)
        first.claim(rx)
        first.release(rx)
        given = first.dispense(rx).dispensation
        assert refusal(lambda: second.dispense(rx)).reason == ALREADY_DISPENSED
        other = rx_id(doctor.prescribe(patient=ins))
        doctor.cancel(other, "doublon")
    finally:
        for actor in (doctor, first, second):
            actor.close()

    with fed.directory(practitioner(DOCTOR)) as reader:
        wait_for(
            lambda: len(reader.view(dpb.GetConsolidatedViewRequest(patient_ins=ins)).records) == 3,
            "the three records in the consolidated view",
        )
        records = reader.view(dpb.GetConsolidatedViewRequest(patient_ins=ins)).records
        by_kind = {(r.kind, r.prescription_id): r for r in records}
        dispensation = by_kind[(record_pb2.RECORD_KIND_DISPENSATION, rx)]
        assert dispensation.id == given.id
        assert dispensation.type_code.code == "60593-1"
        assert dispensation.author.identity == f"urn:dmp:practitioner:{PHARMACISTS[0]}"
        prescription = by_kind[(record_pb2.RECORD_KIND_PRESCRIPTION, rx)]
        assert prescription.type_code.code == "57833-6"
        assert prescription.author.identity == f"urn:dmp:practitioner:{DOCTOR}"
        assert (record_pb2.RECORD_KIND_PRESCRIPTION, other) in by_kind
        chunks = list(reader.fetch_content(dispensation.id, "11", ins))
        content = json.loads(b"".join(c.chunk for c in chunks))
        resource = content["entry"][0]["resource"]
        assert resource["resourceType"] == "MedicationDispense"
        assert resource["authorizingPrescription"][0]["identifier"]["value"] == rx
        assert resource["quantity"]["value"] == 2

    with fed.directory(patient(ins)) as me:
        history = me.access_history(ins).events
    steps = {(e.event_type, e.status_code) for e in history}
    for step in (
        ("prescription-create", "OK"),
        ("prescription-find", "OK"),
        ("prescription-read", "OK"),
        ("prescription-claim", "OK"),
        ("prescription-release", "OK"),
        ("prescription-dispense", "OK"),
        ("prescription-dispense", "FAILED_PRECONDITION"),
        ("prescription-cancel", "OK"),
    ):
        assert step in steps, (step, sorted(steps))
    refused = [e for e in history if e.status_code == "FAILED_PRECONDITION"]
    assert refused[0].active_participant_user_id == f"urn:dmp:practitioner:{PHARMACISTS[1]}"
    assert all(e.participant_object_patient_ins == ins for e in history)


def test_a_prescription_the_patient_masked_is_found_by_no_other_professional(fed: Fed) -> None:
    """Masking the prescription's record hides the prescription itself from professionals
    (its search and its reading) but its prescriber's; a pharmacist given its id by the
    patient still reads and dispenses it."""
    ins = MASKING
    doctor, other, pharmacist, me = (
        fed.actor(practitioner(DOCTOR)),
        fed.actor(practitioner(OTHER_DOCTOR)),
        fed.actor(practitioner(PHARMACISTS[0])),
        fed.actor(patient(ins)),
    )
    try:
        rx = rx_id(doctor.prescribe(patient=ins))
        (written,) = [r for r in me.records_of(ins) if r.prescription_id == rx]
        with fed.directory(patient(ins)) as directory:
            directory.set_directives(
                PatientDirectives(ins, version=1, masked_record_ids=frozenset({written.id}))
            )
        wait_for(lambda: not other.find(ins), "the masked prescription out of another's search")
        answer = refusal(lambda: other.get(rx))
        assert answer.code == grpc.StatusCode.PERMISSION_DENIED and "masked" in answer.message
        assert not pharmacist.find(ins)
        assert [rx_id(s) for s in doctor.find(ins)] == [rx]
        assert [rx_id(s) for s in me.find(ins)] == [rx]
        assert rx_id(pharmacist.get(rx)) == rx
        assert pharmacist.dispense(rx).dispensation.dispensing == 0
    finally:
        for actor in (doctor, other, pharmacist, me):
            actor.close()

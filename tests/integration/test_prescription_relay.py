"""Issue 11 through the directory, over real mutual TLS on SQLite and PostgreSQL: every
act on a prescription is relayed to the node its id names with the caller's own
assertion, and the node's answer (refusals with their status, message and ErrorInfo
reason) reaches the caller exactly as the node gave it; a region without a reachable
node is UNAVAILABLE naming it; the directory audits each relay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from directory.prescribing import WRITE_AT_THE_NODE
from dmp.cli.patient import changed
from dmp.client import DirectoryClient
from dmp.pki import load_credentials
from dmp.prescription_client import federation_verifier
from dmp.prescriptions import (
    ALREADY_DISPENSED,
    CANCELLED,
    HELD_BY_ANOTHER_PHARMACY,
    QUANTITY_EXCEEDED,
    new_prescription_id,
    verify_prescription,
)
from dmp.v1 import prescription_pb2 as pb
from tests.federation import DOCTOR, wait_for
from tests.integration.prescription_federation import (
    DOC,
    RxFed,
    pharmacist,
    pharmacy,
    prescription_id,
    refusal,
    running_rx_federation,
)

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def fed(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[RxFed]:
    with running_rx_federation(pki_dir, db_factory) as federation:
        yield federation


def lines(quantity: int) -> list[pb.DispensedLine]:
    return [pb.DispensedLine(line=0, quantity=quantity)]


def test_a_prescription_read_through_the_directory_verifies(fed: RxFed) -> None:
    ins = fed.new_patient(("11", "84"))
    stored = fed.prescribe(ins, region="11")
    pid = prescription_id(stored)
    assert pid.startswith("RX-11-") and stored.region == "11"
    # A pharmacist in another region has only the scanned id: no INS in the assertion.
    read = fed.rx(pharmacist("84")).get(pid)
    verifier = federation_verifier(fed.pki_dir, load_credentials(fed.pki_dir, DOC))
    prescription, signer = verify_prescription(read.signed, verifier)
    assert (prescription.id, prescription.patient_ins) == (pid, ins)
    assert signer.key == DOCTOR
    assert read.region == "11"
    assert read.state.status == pb.PRESCRIPTION_STATUS_ACTIVE
    assert read.signed == stored.signed  # the bytes as signed, unchanged by the relay
    # The same read at the node itself answers the same prescription.
    direct = fed.rx(pharmacist("84"), "11").get(pid)
    assert direct.signed == read.signed and direct.state == read.state


def test_a_prescription_is_written_at_its_node_and_the_directory_says_where(fed: RxFed) -> None:
    ins = fed.new_patient(("11",))
    answer = refusal(lambda: fed.prescribe(ins, region="11", through_directory=True))
    assert (answer.code, answer.reason) == (FAILED_PRECONDITION, WRITE_AT_THE_NODE)
    assert f"(11 at {fed.address('11')})" in answer.details
    assert fed.rx(DOC, "11").find(ins).prescriptions == []


def test_claim_release_dispense_and_their_refusals_pass_through_unchanged(fed: RxFed) -> None:
    ins = fed.new_patient(("11",))
    pid = prescription_id(fed.prescribe(ins, region="11"))
    first = fed.rx(pharmacist("84"))
    second, second_at_node = fed.rx(pharmacist("53")), fed.rx(pharmacist("53"), "11")

    held = first.claim(pid, pharmacy("84"))
    assert held.state.held_by_caller and held.state.HasField("held_until")
    relayed = refusal(lambda: second.claim(pid, pharmacy("53")))
    direct = refusal(lambda: second_at_node.claim(pid, pharmacy("53")))
    assert relayed == direct
    assert (relayed.code, relayed.reason) == (FAILED_PRECONDITION, HELD_BY_ANOTHER_PHARMACY)
    assert names_no_holder(relayed.details)
    released = first.release(pid)
    assert not released.state.HasField("held_until")

    relayed = refusal(lambda: second.dispense(pid, lines(3), pharmacy=pharmacy("53")))
    direct = refusal(lambda: second_at_node.dispense(pid, lines(3), pharmacy=pharmacy("53")))
    assert relayed == direct
    assert (relayed.code, relayed.reason) == (FAILED_PRECONDITION, QUANTITY_EXCEEDED)

    dispensation, after = first.dispense(pid, lines(2), pharmacy=pharmacy("84"))
    assert dispensation.prescription_id == pid and dispensation.dispensing == 0
    assert dispensation.pharmacy == pharmacy("84")
    assert after.state.status == pb.PRESCRIPTION_STATUS_COMPLETED

    relayed = refusal(lambda: second.dispense(pid, lines(2), pharmacy=pharmacy("53")))
    direct = refusal(lambda: second_at_node.dispense(pid, lines(2), pharmacy=pharmacy("53")))
    assert relayed == direct
    assert (relayed.code, relayed.reason) == (FAILED_PRECONDITION, ALREADY_DISPENSED)
    # Nothing more was dispensed by the refusals.
    state = first.get(pid).state
    assert len(state.dispensations) == 1
    assert [d.lines[0].quantity for d in state.dispensations] == [2]


def test_a_cancellation_is_relayed_and_then_refuses_dispensing(fed: RxFed) -> None:
    ins = fed.new_patient(("11",))
    pid = prescription_id(fed.prescribe(ins, region="11"))
    cancelled = fed.rx(DOC).cancel(pid, "erreur de posologie")
    assert cancelled.state.status == pb.PRESCRIPTION_STATUS_CANCELLED
    pharmacy_client = fed.rx(pharmacist("84"))
    relayed = refusal(lambda: pharmacy_client.dispense(pid, lines(2), pharmacy=pharmacy("84")))
    direct = refusal(
        lambda: fed.rx(pharmacist("84"), "11").dispense(pid, lines(2), pharmacy=pharmacy("84"))
    )
    assert relayed == direct
    assert (relayed.code, relayed.reason) == (FAILED_PRECONDITION, CANCELLED)


def test_a_region_without_a_reachable_node_is_unavailable_naming_it(fed: RxFed) -> None:
    ins = fed.new_patient(("11",))
    client = fed.rx(pharmacist("84"))
    unknown = new_prescription_id("93")  # no node serves region 93
    answer = refusal(lambda: client.get(unknown))
    assert answer.code == UNAVAILABLE
    assert "region 93" in answer.details
    pid = prescription_id(fed.prescribe(ins, region="84"))
    fed.nodes["84"].stop(grace=None)
    answer = refusal(lambda: client.dispense(pid, lines(2), pharmacy=pharmacy("84")))
    assert answer.code == UNAVAILABLE
    assert "region 84" in answer.details


def test_the_directory_audits_each_relay_and_the_node_names_the_relay(fed: RxFed) -> None:
    ins = fed.new_patient(("11",))
    pid = prescription_id(fed.prescribe(ins, region="11"))
    pharmacist_client = fed.rx(pharmacist("84"))
    pharmacist_client.get(pid)
    pharmacist_client.dispense(pid, lines(2), pharmacy=pharmacy("84"))
    refusal(lambda: pharmacist_client.dispense(pid, lines(2), pharmacy=pharmacy("84")))
    with DirectoryClient(fed.address(), load_credentials(fed.pki_dir, f"patient-{ins}")) as patient:
        history = patient.access_history(ins, limit=1000)
    about = [e for e in history.events if pid in e.participant_object_record_ids]
    who = f"urn:dmp:practitioner:{pharmacist('84').split('-', 1)[1]}"
    at_directory = [
        e for e in about if not e.audit_source_region and e.active_participant_user_id == who
    ]
    at_node = [
        e for e in about if e.audit_source_region == "11" and e.active_participant_user_id == who
    ]
    # The read and the dispensing at the directory (the refusal names no patient there:
    # the pharmacist gave only the id), and the node's own events, relayed.
    assert {e.status_code for e in at_directory} >= {"OK"}
    assert len([e for e in at_directory if e.status_code == "OK"]) == 2
    assert {e.status_code for e in at_node} >= {"OK", "FAILED_PRECONDITION"}
    assert all(e.relaying_participant == "urn:dmp:directory" for e in at_node)


def names_no_holder(details: str) -> bool:
    """Who holds a prescription is not said to another pharmacy."""
    return all(name not in details for name in (pharmacy("84"), "Pharmacien 84"))


def test_a_retry_through_the_directory_answers_the_first_dispensing(fed: RxFed) -> None:
    ins = fed.new_patient(("11",))
    pid = prescription_id(fed.prescribe(ins, region="11", renewals=1))
    client = fed.rx(pharmacist("84"))
    first, _ = client.dispense(pid, lines(2), pharmacy=pharmacy("84"), key="caisse-84-0001")
    again, after = client.dispense(pid, lines(2), pharmacy=pharmacy("84"), key="caisse-84-0001")
    assert again == first
    assert len(after.state.dispensations) == 1
    assert after.state.status == pb.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED
    # The renewal is the next dispensing; none remains after it.
    assert after.state.renewals_remaining == 0


def test_the_patients_block_applies_with_or_without_the_ins(fed: RxFed) -> None:
    """Given the INS, the directory refuses a blocked pharmacist itself, at once; with a
    scanned id only, the owning node does (it takes the patient from the prescription and
    sees a directive change within its staleness bound), and its refusal comes back as it
    gave it."""
    ins = fed.new_patient(("11",))
    pid = prescription_id(fed.prescribe(ins, region="11"))
    blocked_rpps = pharmacist("53").split("-", 1)[1]
    with DirectoryClient(fed.address(), load_credentials(fed.pki_dir, f"patient-{ins}")) as me:
        me.set_directives(changed(me.directives(ins), "block", blocked_rpps))
    blocked = fed.rx(pharmacist("53"))
    with_ins = refusal(lambda: blocked.get(pid, patient_ins=ins))

    def refused_without_ins() -> bool:
        try:
            blocked.get(pid)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.PERMISSION_DENIED
        return False

    wait_for(refused_without_ins, "node 11 to apply the block (staleness bound 5 s)")
    without = refusal(lambda: blocked.get(pid))
    assert with_ins.code == without.code == grpc.StatusCode.PERMISSION_DENIED
    assert "blocked" in with_ins.details and "blocked" in without.details
    # Another pharmacist still reads it, and the patient reads their own.
    assert prescription_id(fed.rx(pharmacist("84")).get(pid)) == pid
    assert prescription_id(fed.rx(f"patient-{ins}").get(pid)) == pid

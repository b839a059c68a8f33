"""Who may retire a record, what a write may carry, what a node may tell the index.

Regression tests of the security issue's items 1, 7, 8 (identity reads), 10 and 11: a
directory and one node over real mutual TLS, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest

from directory.app import RunningDirectory
from dmp.assertion import Metadata, sign_assertion
from dmp.audit.events import EventType
from dmp.cli.patient import changed
from dmp.directives import PatientDirectives, from_proto, sign_directives
from dmp.ins import make_ins
from dmp.pki import load_credentials
from dmp.signing import Signer
from dmp.tls import secure_channel
from dmp.v1 import access_pb2, directory_service_pb2_grpc, node_service_pb2_grpc, record_pb2
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from node.app import RunningNode
from tests.federation import (
    DOCTOR,
    OTHER_DOCTOR,
    OTHER_PATIENT,
    PATIENT,
    PHARMACIST,
    draft,
    identity_of,
    running_directory,
    running_node,
    wait_for,
)

REGION = "53"
DOC = f"practitioner-{DOCTOR}"
OTHER = f"practitioner-{OTHER_DOCTOR}"
PHARMA = f"practitioner-{PHARMACIST}"
ME = f"patient-{PATIENT}"
RESULT = "11502-2"  # LOINC laboratory report


@dataclass
class Fed:
    pki_dir: Path
    directory: RunningDirectory
    node: RunningNode
    _channels: dict[tuple[str, int], grpc.Channel] = field(default_factory=dict)

    def channel(self, identity: str, port: int) -> grpc.Channel:
        if (identity, port) not in self._channels:
            creds = load_credentials(self.pki_dir, identity)
            self._channels[identity, port] = secure_channel(f"127.0.0.1:{port}", creds)
        return self._channels[identity, port]

    def at_node(self, identity: str) -> node_service_pb2_grpc.NodeServiceStub:
        return node_service_pb2_grpc.NodeServiceStub(self.channel(identity, self.node.port))

    def at_directory(self, identity: str) -> directory_service_pb2_grpc.DirectoryServiceStub:
        port = self.directory.port
        return directory_service_pb2_grpc.DirectoryServiceStub(self.channel(identity, port))

    def md(self, identity: str, ins: str = PATIENT) -> Metadata:
        signer = Signer(load_credentials(self.pki_dir, identity))
        return sign_assertion(signer, ins, operation=access_pb2.OPERATION_VIEW)

    def put(self, identity: str, record: record_pb2.Record) -> record_pb2.Record:
        request = npb.PutRecordRequest(record=record, content=b"content")
        return self.at_node(identity).PutRecord(request, timeout=10).record

    def view_ids(self, identity: str, ins: str = PATIENT) -> set[str]:
        request = dpb.GetConsolidatedViewRequest(patient_ins=ins, page_size=1000)
        view = self.at_directory(identity).GetConsolidatedView(
            request, metadata=self.md(identity, ins), timeout=10
        )
        return {r.id for r in view.records}

    def set_directives(self, change: str, target: str = "") -> None:
        stub = self.at_directory(ME)
        answer = stub.GetDirectives(dpb.GetDirectivesRequest(patient_ins=PATIENT), timeout=10)
        current = (
            from_proto(access_pb2.Directives.FromString(answer.directives.directives))
            if answer.HasField("directives")
            else PatientDirectives(PATIENT)
        )
        signed = sign_directives(
            Signer(load_credentials(self.pki_dir, ME)), changed(current, change, target)
        )
        stub.SetDirectives(dpb.SetDirectivesRequest(directives=signed), timeout=10)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


@pytest.fixture
def fed(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[Fed]:
    with ExitStack() as stack:
        directory = stack.enter_context(
            running_directory(pki_dir, db_factory("directory"), health_interval=0.2)
        )
        address = f"127.0.0.1:{directory.port}"
        node = stack.enter_context(
            running_node(pki_dir, REGION, db_factory("node"), directory=address)
        )
        federation = Fed(pki_dir, directory, node)
        stack.callback(federation.close)
        stub = federation.at_directory(DOC)
        stub.RegisterPatient(dpb.RegisterPatientRequest(patient=identity_of(PATIENT)))
        wait_for(
            lambda: any(r.healthy for r in directory.discovery.routes().values()),
            "the node to be routed",
        )
        yield federation


def failure(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def new_version(of: record_pb2.Record, title: str = "Compte rendu corrigé") -> record_pb2.Record:
    record = record_pb2.Record()
    record.CopyFrom(of)
    record.ClearField("id")
    record.title = title
    record.supersedes = of.id
    return record


# -- item 1: only the author supersedes --------------------------------------------------


def test_only_the_author_of_a_record_writes_its_new_version(fed: Fed) -> None:
    report = fed.put(DOC, draft(title="Compte rendu du Dr Martin"))
    result = draft(kind=record_pb2.RECORD_KIND_OBSERVATION, code=RESULT, title="Résultat")
    result.hidden_from_patient = True
    hidden = fed.put(DOC, result)
    masked = fed.put(DOC, draft(title="Compte rendu masqué"))
    fed.set_directives("mask", masked.id)
    note = draft(kind=record_pb2.RECORD_KIND_PATIENT_NOTE, code="51855-5", title="Ma note")
    nowhere = new_version(report)
    nowhere.supersedes = "no-such-record"
    reference = failure(lambda: fed.put(OTHER, nowhere))
    assert reference.code() == grpc.StatusCode.FAILED_PRECONDITION

    attempts = {
        "a pharmacist, over a doctor's report he cannot read": (PHARMA, report),
        "another doctor, over a record the patient masked": (OTHER, masked),
        "another doctor, over a colleague's report": (OTHER, report),
        "the patient, over a doctor's report": (ME, report),
        "the patient, over a result hidden from them": (ME, hidden),
    }
    for what, (identity, previous) in attempts.items():
        attempt = new_version(previous)
        if identity == ME:
            attempt.kind = record_pb2.RECORD_KIND_PATIENT_NOTE
            attempt.type_code.code = "51855-5"
            attempt.hidden_from_patient = False
        refused = failure(partial(fed.put, identity, attempt))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, what
        # The same answer as for an id that does not exist: nothing learnt of the record.
        assert refused.details() == reference.details().replace("no-such-record", previous.id)

    # Every original is still the current version, in the doctor's view.
    assert {report.id, hidden.id, masked.id} <= fed.view_ids(DOC)

    # The author may; the write's audit event names the retired version too.
    corrected = fed.put(DOC, new_version(report))
    assert corrected.version == 2 and corrected.supersedes == report.id
    assert fed.view_ids(DOC) >= {corrected.id} and report.id not in fed.view_ids(DOC)
    assert fed.node.audit is not None
    writes = [
        e.event
        for e in fed.node.audit.events_for_patient(PATIENT, limit=50)
        if e.event.event_type == EventType.WRITE
        and corrected.id in e.event.participant_object_record_ids
    ]
    assert [list(e.participant_object_record_ids) for e in writes] == [[corrected.id, report.id]]

    # A patient supersedes their own note, and only theirs.
    mine = fed.put(ME, note)
    assert fed.put(ME, new_version(mine, "Ma note corrigée")).supersedes == mine.id


# -- item 10: a record id tells nothing of records one may not read ---------------------


def test_a_taken_record_id_says_nothing_of_its_record(fed: Fed) -> None:
    stub = fed.at_directory(DOC)
    stub.RegisterPatient(
        dpb.RegisterPatientRequest(patient=identity_of(OTHER_PATIENT, "LEROY", ("MARIE",)))
    )
    theirs = fed.put(DOC, draft(OTHER_PATIENT, title="Compte rendu de Mme Leroy"))
    same_patient = fed.put(DOC, draft(title="Compte rendu de M. Dupont"))
    answers = []
    for taken in (theirs, same_patient):
        refused = failure(partial(fed.put, OTHER, draft(record_id=taken.id)))
        assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
        assert OTHER_PATIENT not in (refused.details() or "")
        answers.append((refused.details() or "").replace(taken.id, "ID"))
    assert answers[0] == answers[1]
    assert "cannot be used" in answers[0]
    # The author retrying the same put gets their record; with other content, the reason.
    assert fed.put(DOC, draft(title="Compte rendu de M. Dupont", record_id=same_patient.id))
    changed_put = failure(lambda: fed.put(DOC, draft(title="Autre", record_id=same_patient.id)))
    assert "already exists" in (changed_put.details() or "")


# -- item 11: bad input never reaches the database ----------------------------------------


def test_bad_fields_are_refused_naming_the_field(fed: Fed) -> None:
    far = draft()
    far.effective_time.seconds = 2**62
    long_code = draft(code="1" * 10_000)
    nul = draft(title="Compte rendu\x00caché")
    rlo = draft(title="Compte rendu \u202egpj.exe")
    bad_type = draft()
    bad_type.content_type = "text/plain\n"
    cases = {
        "record.effective_time": far,
        "record.type_code.code": long_code,
        "record.title": nul,
        "record.content_type": bad_type,
    }
    for name, record in {**cases, "record.title ": rlo}.items():
        refused = failure(partial(fed.put, DOC, record))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert name.strip() in (refused.details() or ""), refused.details()
    listing = npb.ListRecordsRequest(patient_ins=PATIENT)
    listing.since.seconds = 2**62
    refused = failure(
        lambda: fed.at_node(DOC).ListRecords(listing, metadata=fed.md(DOC), timeout=10)
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "since" in (refused.details() or "")
    assert fed.view_ids(DOC) == set()  # nothing was stored


def test_a_blocked_professional_cannot_reveal_a_record(fed: Fed) -> None:
    result = draft(kind=record_pb2.RECORD_KIND_OBSERVATION, code=RESULT, title="Résultat")
    result.hidden_from_patient = True
    hidden = fed.put(DOC, result)
    fed.set_directives("block", DOCTOR)
    assert hidden.id not in fed.view_ids(ME)  # this view carries the new set to the node
    reveal = npb.RevealRecordRequest(record_id=hidden.id)
    refused = failure(lambda: fed.at_node(DOC).RevealRecord(reveal, timeout=10))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "blocked" in (refused.details() or "")
    assert hidden.id not in fed.view_ids(ME)


# -- item 7: reports never create identities ------------------------------------------------


def test_a_node_cannot_squat_an_identity_or_report_nonsense(fed: Fed) -> None:
    newcomer = make_ins("2991075012345")
    squat = identity_of(newcomer, "SQUATTEUR", ("FAUX",))
    node = fed.at_directory(f"node-{REGION}")
    node.ReportFragments(
        dpb.ReportFragmentsRequest(fragments=[dpb.FragmentReport(patient=squat, record_count=2)]),
        timeout=10,
    )
    # The fragment is located, the identity is not created by the report ...
    traits, fragments = fed.directory.index.get(newcomer)
    assert [(f.region, f.record_count) for f in fragments] == [(REGION, 2)]
    assert traits.empty
    # ... so the patient's real registration succeeds.
    real = identity_of(newcomer, "VRAI", ("NOM",))
    registered = fed.at_directory(DOC).RegisterPatient(
        dpb.RegisterPatientRequest(patient=real), timeout=10
    )
    assert registered.created and registered.patient.birth_family_name == "VRAI"
    for report in (
        dpb.FragmentReport(patient=identity_of(newcomer), record_count=-3),
        dpb.FragmentReport(patient=identity_of(newcomer), record_count=1),
    ):
        if report.record_count > 0:
            report.last_update.seconds = 2**40
        request = dpb.ReportFragmentsRequest(fragments=[report])
        refused = failure(partial(node.ReportFragments, request, timeout=10))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fragments[0]" in (refused.details() or "")
    _, fragments = fed.directory.index.get(newcomer)
    assert [(f.region, f.record_count) for f in fragments] == [(REGION, 2)]


# -- item 8: reads of identity traits and directives are audited ----------------------------


def test_identity_conflict_reviews_and_node_directive_reads_are_audited(fed: Fed) -> None:
    impostor = identity_of(PATIENT, "AUTRE", ("NOM",))
    conflict = failure(
        lambda: fed.at_directory(OTHER).RegisterPatient(
            dpb.RegisterPatientRequest(patient=impostor), timeout=10
        )
    )
    assert conflict.code() == grpc.StatusCode.FAILED_PRECONDITION

    def events(detail: str) -> list[str]:
        return [
            e.event.active_participant_user_id
            for e in fed.directory.audit.events_for_patient(PATIENT, limit=100)
            if e.event.detail == detail
        ]

    operator = fed.at_directory("directory")
    listed = operator.ListIdentityConflicts(dpb.ListIdentityConflictsRequest(), timeout=10)
    assert [c.ins for c in listed.conflicts] == [PATIENT]
    assert events("identity conflict review") == ["urn:dmp:directory"]

    node = fed.at_directory(f"node-{REGION}")
    node.GetDirectives(dpb.GetDirectivesRequest(patient_ins=PATIENT), timeout=10)
    assert events("patient directives for the node's access checks") == [f"urn:dmp:node:{REGION}"]

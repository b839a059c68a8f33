"""Issue 4 §6 over mutual TLS: the patient's own access (their record only, their notes,
what is hidden from them), and refusals that say nothing of whether a patient exists.
Helpers: access_federation.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

from dmp.policy import HIDDEN_FROM_PATIENT_US
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import record_pb2
from tests.federation import DOCTOR, PHARMACIST
from tests.integration.access_federation import (
    ALL_REGIONS,
    DIRECTORY,
    DOC,
    NOT_FOUND,
    OTHER,
    PERMISSION_DENIED,
    REASON,
    SPECIAL,
    Fed,
    K,
    check_view,
    code_of,
    eventually,
    patient_identity,
    practitioner,
    record,
    refusal,
    setup,
)

# -- hidden from the patient until revealed, or 30 days -----------------------------------


def test_hidden_from_the_patient_until_its_author_reveals_it(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    result = fed.put("11", record(ins, f"result-{ins}", code="11502-2", hidden=True))
    other = fed.put("11", record(ins, f"visible-{ins}"))
    fed.wait_fragments(ins, {"11": 2})
    check_view(fed.view(me, ins), {other.id})
    assert fed.listed_ids(me, "11", ins) == {other.id}
    assert code_of(lambda: fed.get_record(me, "11", ins, result.id)) == NOT_FOUND
    assert code_of(lambda: fed.fetch(me, ins, result)) == NOT_FOUND
    for identity in (DOC, OTHER):  # hidden from the patient only
        check_view(fed.view(identity, ins), {result.id, other.id})
    # Only its author reveals it.
    for identity in (OTHER, me, DIRECTORY):
        reveal = fed.node(identity, "11").RevealRecord
        err = refusal(partial(reveal, npb.RevealRecordRequest(record_id=result.id), timeout=10))
        assert err.code() == NOT_FOUND, identity
    check_view(fed.view(me, ins), {other.id})
    revealed = (
        fed.node(DOC, "11")
        .RevealRecord(npb.RevealRecordRequest(record_id=result.id), timeout=10)
        .record
    )
    assert revealed.HasField("revealed_time")
    check_view(fed.view(me, ins), {result.id, other.id})
    assert fed.listed_ids(me, "11", ins) == {result.id, other.id}
    assert fed.fetch(me, ins, result) == b"content"


def test_hidden_from_the_patient_shows_after_30_days(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    result = fed.put(SPECIAL, record(ins, f"result30-{ins}", code="11502-2", hidden=True))
    other = fed.put(SPECIAL, record(ins, f"other30-{ins}"))
    fed.wait_fragments(ins, {SPECIAL: 2})
    try:
        check_view(fed.view(me, ins), {other.id})
        fed.clock.offset_us = HIDDEN_FROM_PATIENT_US - 3600 * 1_000_000  # an hour short
        check_view(fed.view(me, ins), {other.id})
        assert fed.listed_ids(me, SPECIAL, ins) == {other.id}
        fed.clock.offset_us = HIDDEN_FROM_PATIENT_US + 60 * 1_000_000
        check_view(fed.view(me, ins), {result.id, other.id})
        assert fed.listed_ids(me, SPECIAL, ins) == {result.id, other.id}
        assert fed.fetch(me, ins, result) == b"content"
    finally:
        fed.clock.offset_us = 0


# -- the patient's own access -----------------------------------------------------------------


def test_a_patient_reads_their_own_record_and_no_one_elses(fed: Fed) -> None:
    ins, neighbour, unknown = fed.new_patient(), fed.new_patient(), fed.unknown_patient()
    me = patient_identity(ins)
    mine = fed.put("11", record(ins, f"mine-{ins}"))
    theirs = fed.put("11", record(neighbour, f"theirs-{neighbour}"))
    fed.wait_fragments(ins, {"11": 1})
    fed.wait_fragments(neighbour, {"11": 1})
    check_view(fed.view(me, ins), {mine.id})
    assert fed.listed_ids(me, "11", ins) == {mine.id}
    details: dict[str, set[str]] = {}
    for target in (neighbour, unknown):  # a patient who exists, one who does not
        for signed_for in (target, ins):  # an assertion for them, or for myself
            md = partial(fed.md, me, signed_for)  # a fresh one for each call
            calls: dict[str, Callable[[], object]] = {
                "view": partial(
                    fed.dir(me).GetConsolidatedView,
                    dpb.GetConsolidatedViewRequest(patient_ins=target),
                    metadata=md(),
                    timeout=10,
                ),
                "patient": partial(
                    fed.dir(me).GetPatient,
                    dpb.GetPatientRequest(ins=target),
                    metadata=md(),
                    timeout=10,
                ),
                "node": partial(
                    fed.node(me, "11").ListRecords,
                    npb.ListRecordsRequest(patient_ins=target),
                    metadata=md(),
                    timeout=10,
                ),
            }
            for name, call in calls.items():
                err = refusal(call)
                assert err.code() == PERMISSION_DENIED, (name, target, signed_for)
                details.setdefault(f"{name}-{signed_for == ins}", set()).add(err.details() or "")
    # Same answer whether the other patient exists or not.
    assert all(len(answers) == 1 for answers in details.values()), details
    # Someone else's record by id, with my own assertion: not among what I may see.
    assert code_of(lambda: fed.get_record(me, "11", ins, theirs.id)) == NOT_FOUND
    assert code_of(lambda: fed.fetch(me, ins, theirs)) == NOT_FOUND


def test_patient_notes_are_written_by_the_patient_in_their_own_record(fed: Fed) -> None:
    ins, neighbour = fed.new_patient(), fed.new_patient()
    me = patient_identity(ins)
    note = fed.put("53", record(ins, f"note-{ins}", K.RECORD_KIND_PATIENT_NOTE, "51855-5"), me)
    assert note.author.identity == f"urn:dmp:patient:{ins}"
    fed.wait_fragments(ins, {"53": 1})
    check_view(fed.view(DOC, ins), {note.id})
    check_view(fed.view(practitioner(PHARMACIST), ins), set())
    refused_writes: list[tuple[str, record_pb2.Record]] = [
        (me, record(neighbour, f"note-{neighbour}", K.RECORD_KIND_PATIENT_NOTE, "51855-5")),
        (me, record(ins, f"doc-by-patient-{ins}")),
        (me, record(ins, f"rx-by-patient-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6")),
        (DOC, record(ins, f"note-by-doctor-{ins}", K.RECORD_KIND_PATIENT_NOTE, "51855-5")),
        (DIRECTORY, record(ins, f"by-directory-{ins}")),
        ("node-11", record(ins, f"by-node-{ins}")),
    ]
    for writer, attempt in refused_writes:
        err = refusal(partial(fed.put, "53", attempt, writer))
        assert err.code() == PERMISSION_DENIED, (writer, attempt.id)

    def ingest() -> object:
        stream = iter([npb.IngestRecordsRequest(put=npb.PutRecordRequest(
            record=record(ins, f"ingested-by-patient-{ins}"), content=b"x"))])  # fmt: skip
        return fed.node(me, "53").IngestRecords(stream, timeout=10)

    assert code_of(ingest) == PERMISSION_DENIED
    check_view(fed.view(me, ins), {note.id})


# -- 3. PERMISSION_DENIED before existence ------------------------------------------------


def test_refusals_come_before_any_lookup_of_the_patient(fed: Fed) -> None:
    existing, ghost = fed.new_patient(), fed.new_patient()  # ghost: directives, no record
    doc = fed.put("11", record(existing, f"exists-{existing}"))
    fed.wait_fragments(existing, {"11": 1})
    for ins in (existing, ghost):
        fed.set_directives(ins, "block", DOCTOR)
    fed.set_directives(ghost, "emergency", "refuse")
    check_view(fed.view(patient_identity(existing), existing), {doc.id})  # carries the set
    # The ghost is unknown to the index: an allowed professional learns only that.
    assert code_of(lambda: fed.get_patient(OTHER, ghost)) == NOT_FOUND
    empty = fed.view(OTHER, ghost)
    assert list(empty.records) == [] and list(empty.regions) == []

    def answers(identity: str, ins: str, emergency: str | None = None) -> dict[str, str]:
        calls: dict[str, Callable[[], object]] = {
            "patient": lambda: fed.get_patient(identity, ins, emergency),
            "view": lambda: fed.view(identity, ins, emergency),
        }
        for region in ALL_REGIONS:
            eventually(
                partial(fed.listed, identity, region, ins, emergency),
                PERMISSION_DENIED,
                f"node {region} to refuse",
            )
            calls[region] = partial(fed.listed, identity, region, ins, emergency)
        found = {}
        for name, call in calls.items():
            err = refusal(call)
            assert err.code() == PERMISSION_DENIED, (identity, ins, name)
            found[name] = err.details() or ""
        return found

    # The blocked doctor: the same refusal for a patient with records and one without.
    assert answers(DOC, ghost) == answers(DOC, existing)
    # An emergency refused by a patient who has no record yet.
    answers(OTHER, ghost, REASON)
    # A patient asking about a patient who does not exist, or one who does.
    me = patient_identity(fed.new_patient())
    assert answers(me, fed.unknown_patient()) == answers(me, existing)


# -- bugs found ---------------------------------------------------------------------------


def test_the_directory_counts_no_record_the_caller_may_not_see(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    with setup():
        fed.put("11", record(ins, f"count-visible-{ins}"))
        fed.put("11", record(ins, f"count-hidden-{ins}", code="11502-2", hidden=True))
        fed.wait_fragments(ins, {"11": 2})
        visible = Counter(r.region for r in fed.view(me, ins).records)
        assert visible == {"11": 1}
    for fragment in fed.get_patient(me, ins).fragments:
        assert fragment.record_count <= visible[fragment.region], fragment

"""The audit trail's building blocks: events, Merkle tree, checkpoints, FHIR export."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from cryptography import x509

from dmp.audit.checkpoints import sign_checkpoint, verify_checkpoint
from dmp.audit.events import DCM, EVENT_TYPES, AuditEvent, EventType, Outcome, outcome_for_status
from dmp.audit.fhir import export_events, fhir_audit_event
from dmp.audit.log import AuditLog
from dmp.audit.merkle import (
    EMPTY_ROOT,
    MerkleFrontier,
    event_leaf_hash,
    leaf_hash,
    merkle_root,
    node_hash,
)
from dmp.audit.tables import audit_tables
from dmp.audit.verify import verify_log
from dmp.db import make_engine, new_metadata, sqlite_url
from dmp.errors import FailedPrecondition
from dmp.ins import make_ins
from dmp.pki import Credentials, Pki, load_credentials
from dmp.purposes import Purpose

INS = make_ins("1850275123456")
DOCTOR = "urn:dmp:practitioner:10000000001"
NODE = "urn:dmp:node:11"

# Certificate Transparency's reference vectors for RFC 6962 (entries d0..d7, roots of the
# trees of their first 1..8 entries).
CT_ENTRIES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki.init(tmp_path_factory.mktemp("pki"))
    pki.issue_node("11")
    pki.issue_node("53")
    return pki


@pytest.fixture(scope="module")
def node11(pki: Pki) -> Credentials:
    return load_credentials(pki.directory, "node-11")


def _event(**overrides: object) -> AuditEvent:
    values: dict[str, object] = {
        "event_type": EventType.READ_RECORD,
        "event_date_time": 1_767_225_600_123_456,
        "purpose_of_use": Purpose.EMERGENCY,
        "emergency_reason": "inconscient aux urgences",
        "active_participant_user_id": DOCTOR,
        "active_participant_user_name": "Dr Claire MARTIN",
        "active_participant_role": "doctor",
        "relaying_participant": "urn:dmp:directory",
        "audit_source_id": NODE,
        "audit_source_region": "11",
        "participant_object_patient_ins": INS,
        "participant_object_record_ids": ("rec-1", "rec-2"),
        "request_id": "req-1",
        "detail": "2 records",
    }
    values.update(overrides)
    return AuditEvent(**values)  # type: ignore[arg-type]


# -- Merkle tree ------------------------------------------------------------------------


def test_the_empty_tree_hashes_to_the_hash_of_nothing() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert merkle_root([]) == EMPTY_ROOT
    assert MerkleFrontier().root() == EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_the_certificate_transparency_vectors(size: int) -> None:
    leaves = [leaf_hash(entry) for entry in CT_ENTRIES[:size]]
    assert merkle_root(leaves).hex() == CT_ROOTS[size - 1]
    frontier = MerkleFrontier()
    for leaf in leaves:
        frontier.append(leaf)
    assert frontier.root().hex() == CT_ROOTS[size - 1]


def test_leaf_and_node_hashes_use_the_rfc_6962_prefixes() -> None:
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert (
        node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )
    # An event's entry is its position then its canonical JSON.
    assert event_leaf_hash(7, b"{}") == leaf_hash((7).to_bytes(8, "big") + b"{}")


def test_the_frontier_agrees_with_the_recursive_definition_for_sizes_1_to_70() -> None:
    rng = random.Random(6962)
    leaves = [rng.randbytes(32) for _ in range(70)]
    frontier = MerkleFrontier()
    for size, leaf in enumerate(leaves, start=1):
        frontier.append(leaf)
        assert frontier.size == size
        assert frontier.root() == merkle_root(leaves[:size]), size


def test_the_root_depends_on_the_order_of_the_leaves() -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(5)]
    swapped = [leaves[0], leaves[3], leaves[2], leaves[1], leaves[4]]
    assert merkle_root(leaves) != merkle_root(swapped)


# -- events -----------------------------------------------------------------------------


def test_canonical_bytes_are_sorted_compact_utf8_and_stable() -> None:
    event = _event(active_participant_user_name="Dr Hélène ÉTIENNE")
    expected = (
        '{"active_participant_role":"doctor",'
        '"active_participant_user_id":"urn:dmp:practitioner:10000000001",'
        '"active_participant_user_name":"Dr Hélène ÉTIENNE",'
        '"audit_source_id":"urn:dmp:node:11","audit_source_region":"11",'
        '"detail":"2 records","emergency_reason":"inconscient aux urgences",'
        '"event_action_code":"R","event_date_time":1767225600123456,"event_id":"110110",'
        '"event_outcome_indicator":0,"event_type":"read-record",'
        f'"participant_object_patient_ins":"{INS}",'
        '"participant_object_record_ids":["rec-1","rec-2"],'
        '"purpose_of_use":"EMERGENCY","relaying_participant":"urn:dmp:directory",'
        '"request_id":"req-1","status_code":"OK"}'
    ).encode()
    assert event.canonical_bytes() == expected
    assert AuditEvent.from_json(expected) == event
    assert AuditEvent.from_json(expected).canonical_bytes() == expected


def test_to_dict_and_from_dict_round_trip_and_ignore_unknown_keys() -> None:
    event = _event()
    data = event.to_dict()
    assert data["participant_object_record_ids"] == ["rec-1", "rec-2"]
    assert AuditEvent.from_dict(data) == event
    assert AuditEvent.from_dict({**data, "some_later_field": 1}) == event
    # Enumerations are stored as their plain values.
    assert type(event.event_type) is str and type(event.purpose_of_use) is str


@pytest.mark.parametrize("event_type", list(EVENT_TYPES))
def test_each_event_type_gets_its_documented_code_and_action(event_type: str) -> None:
    event = AuditEvent(event_type=event_type)
    code = EVENT_TYPES[event_type]
    assert (event.event_id, event.event_action_code) == (code.event_id, code.action)
    assert event.code == code
    assert event.event_date_time > 0


def test_atna_codes_of_the_main_actions() -> None:
    assert AuditEvent(event_type="view").event_id == "110112"
    assert AuditEvent(event_type="read-record").event_id == "110110"
    assert EVENT_TYPES["read-content"].system == DCM
    assert EVENT_TYPES["directive-change"].system == "urn:dmp:audit-event-type"


def test_invalid_events_are_refused() -> None:
    with pytest.raises(ValueError, match="no standard code"):
        AuditEvent(event_type="teleport")
    custom = AuditEvent(event_type="teleport", event_id="110100", event_action_code="E")
    assert custom.code.system == DCM and custom.code.display == "Application Activity"
    with pytest.raises(ValueError, match="event_action_code"):
        AuditEvent(event_type="view", event_action_code="X")
    with pytest.raises(ValueError, match="outcome"):
        AuditEvent(event_type="view", event_outcome_indicator=3)
    with pytest.raises(ValueError, match="purpose"):
        AuditEvent(event_type="view", purpose_of_use="FUN")
    with pytest.raises(ValueError, match="not a string"):
        AuditEvent(event_type="view", participant_object_record_ids="abc")  # type: ignore[arg-type]


def test_free_text_is_cut_so_that_an_event_always_fits() -> None:
    event = AuditEvent(
        event_type="refused", detail="x" * 5000, participant_object_patient_ins="9" * 99
    )
    assert len(event.detail) == 500
    assert len(event.participant_object_patient_ins) == 32


def test_outcome_follows_the_grpc_status() -> None:
    assert outcome_for_status("OK") is Outcome.SUCCESS
    assert outcome_for_status("PERMISSION_DENIED") is Outcome.MINOR_FAILURE
    assert outcome_for_status("UNAVAILABLE") is Outcome.SERIOUS_FAILURE
    assert outcome_for_status("DATA_LOSS") is Outcome.MAJOR_FAILURE


def test_summary_names_time_actor_action_and_emergency() -> None:
    line = _event().summary()
    assert line.startswith("2026-01-01T00:00:00.123456Z read-record by " + DOCTOR)
    assert "Dr Claire MARTIN" in line and "EMERGENCY ('inconscient aux urgences')" in line


# -- checkpoints ------------------------------------------------------------------------


def test_a_checkpoint_verifies_with_the_owners_certificate(pki: Pki, node11: Credentials) -> None:
    ca = pki.ca_certificate
    checkpoint = sign_checkpoint(node11, 42, b"\x01" * 32, signed_at_us=1_767_225_600_000_000)
    assert checkpoint.source_id == NODE
    assert checkpoint.message() == (
        b"dmp-audit-checkpoint\nurn:dmp:node:11\n42\n" + (b"01" * 32) + b"\n1767225600000000"
    )
    # Before the certificate was issued: refused.
    assert "outside the signer certificate's validity" in verify_checkpoint(checkpoint, ca)
    assert verify_checkpoint(sign_checkpoint(node11, 42, b"\x01" * 32), ca) == ""


def test_a_changed_checkpoint_does_not_verify(pki: Pki, node11: Credentials) -> None:
    ca = pki.ca_certificate
    good = sign_checkpoint(node11, 42, b"\x01" * 32)
    for forged in (
        sign_checkpoint(node11, 42, b"\x01" * 32, signed_at_us=good.signed_at_us + 1),
        type(good)(**{**good.__dict__, "tree_size": 41}),
        type(good)(**{**good.__dict__, "root_hash": b"\x02" * 32}),
    ):
        forged = type(good)(**{**forged.__dict__, "signature": good.signature})
        assert "does not verify" in verify_checkpoint(forged, ca)


def test_a_checkpoint_of_another_service_or_ca_does_not_verify(
    pki: Pki, node11: Credentials, tmp_path: Path
) -> None:
    node53 = load_credentials(pki.directory, "node-53")
    by_53 = sign_checkpoint(node53, 5, b"\x00" * 32, source_id=NODE)
    assert "not by the log's owner" in verify_checkpoint(by_53, pki.ca_certificate)
    other = Pki.init(tmp_path / "other")
    other.issue_node("11")
    impostor = load_credentials(other.directory, "node-11")
    forged = sign_checkpoint(impostor, 5, b"\x00" * 32)
    assert "not issued by the federation CA" in verify_checkpoint(forged, pki.ca_certificate)


def test_an_audit_log_is_signed_only_by_its_owner(node11: Credentials, tmp_path: Path) -> None:
    events, checkpoints = audit_tables(new_metadata())
    engine = make_engine(sqlite_url(tmp_path / "a.db"))
    with pytest.raises(FailedPrecondition, match="cannot be signed"):
        AuditLog(engine, events, checkpoints, source_id="urn:dmp:directory", signer=node11)
    unsigned = AuditLog(engine, events, checkpoints, source_id=NODE)
    with pytest.raises(FailedPrecondition, match="no signing key"):
        unsigned.checkpoint()


# -- tables, reading back, export ---------------------------------------------------------


def test_audit_tables_are_defined_once_per_metadata() -> None:
    metadata = new_metadata()
    events, checkpoints = audit_tables(metadata)
    assert audit_tables(metadata) == (events, checkpoints)
    assert {c.name for c in events.columns} == {
        "seq",
        "event_json",
        "leaf_hash",
        "event_date_time",
        "participant_object_patient_ins",
        "request_id",
    }
    assert [c.name for c in checkpoints.primary_key] == ["tree_size"]


def _log(tmp_path: Path, signer: Credentials | None = None) -> AuditLog:
    metadata = new_metadata()
    events, checkpoints = audit_tables(metadata)
    engine = make_engine(sqlite_url(tmp_path / "audit.db"))
    metadata.create_all(engine)
    return AuditLog(engine, events, checkpoints, source_id=NODE, region="11", signer=signer)


def test_events_come_back_for_the_patient_newest_first(tmp_path: Path) -> None:
    log = _log(tmp_path)
    other = make_ins("2920133012345")
    for i in range(1, 8):
        log.record(
            _event(
                participant_object_patient_ins=INS if i % 2 else other,
                event_date_time=1_000_000 * i,
                audit_source_id="",
                audit_source_region="",
            )
        )
    page = log.events_for_patient(INS, limit=3)
    assert [logged.seq for logged in page] == [7, 5, 3]
    assert all(logged.hash_ok for logged in page)
    assert page[0].event.audit_source_id == NODE and page[0].event.audit_source_region == "11"
    assert [e.seq for e in log.events_for_patient(INS, before_seq=page[-1].seq)] == [1]
    assert [e.seq for e in log.events_for_patient(INS, since_us=4_000_000)] == [7, 5]
    with pytest.raises(ValueError, match="does not belong"):
        log.record(_event(audit_source_id="urn:dmp:node:53"))


def test_fhir_audit_event_follows_r4_and_ihe(tmp_path: Path) -> None:
    resource = fhir_audit_event(_event(), seq=12)
    assert resource["resourceType"] == "AuditEvent"
    assert resource["id"] == "node-11-12"
    assert resource["type"] == {"system": DCM, "code": "110110", "display": "Patient Record"}
    assert resource["subtype"][0]["code"] == "read-record"
    assert resource["action"] == "R" and resource["outcome"] == "0"
    assert resource["recorded"] == "2026-01-01T00:00:00.123456Z"
    purpose = resource["purposeOfEvent"][0]
    assert purpose["coding"][0]["code"] == "ETREAT"
    assert purpose["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActReason"
    assert purpose["text"] == "inconscient aux urgences"
    user, relay = resource["agent"]
    assert user["requestor"] is True and relay["requestor"] is False
    # FR Core identifiers: a professional by their RPPS, a service by its URI.
    assert user["who"]["identifier"] == {
        "system": "https://rpps.esante.gouv.fr",
        "value": DOCTOR.rsplit(":", 1)[1],
    }
    assert user["role"][0]["text"] == "doctor"
    assert relay["who"]["identifier"] == {
        "system": "urn:ietf:rfc:3986",
        "value": "urn:dmp:directory",
    }
    assert resource["source"]["observer"]["identifier"] == {
        "system": "urn:ietf:rfc:3986",
        "value": NODE,
    }
    assert resource["source"]["observer"]["display"] == NODE
    assert resource["source"]["site"] == "11"
    patient, record1, record2, request = resource["entity"]
    assert patient["what"]["identifier"] == {"system": "urn:oid:1.2.250.1.213.1.4.8", "value": INS}
    assert patient["role"]["code"] == "1"
    assert [record1["what"]["identifier"]["value"], record2["what"]["identifier"]["value"]] == [
        "rec-1",
        "rec-2",
    ]
    assert request["type"]["code"] == "XrequestId"
    assert request["what"]["identifier"]["value"] == "req-1"
    purposes = {
        p: fhir_audit_event(_event(purpose_of_use=p))["purposeOfEvent"][0]["coding"][0]["code"]
        for p in ("CARE", "SELF")
    }
    assert purposes == {"CARE": "TREAT", "SELF": "PATRQT"}
    own = fhir_audit_event(
        _event(purpose_of_use="SELF", active_participant_user_id=f"urn:dmp:patient:{INS}")
    )
    assert own["agent"][0]["who"]["identifier"] == {
        "system": "urn:oid:1.2.250.1.213.1.4.8",
        "value": INS,
    }


def test_export_as_json_lines_and_as_a_fhir_bundle(tmp_path: Path) -> None:
    log = _log(tmp_path)
    for i in range(1, 4):
        log.record(_event(event_date_time=1_000_000 * i))
    lines = "".join(export_events(log._engine, log.events_table, fmt="jsonl")).splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[0])["event_id"] == "110110"
    since = list(export_events(log._engine, log.events_table, since_us=2_000_000, fmt="jsonl"))
    assert len(since) == 2
    bundle = json.loads("".join(export_events(log._engine, log.events_table, fmt="fhir")))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["node-11-1", "node-11-2", "node-11-3"]
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
    empty = json.loads(
        "".join(export_events(log._engine, log.events_table, since_us=9**15, fmt="fhir"))
    )
    assert empty["entry"] == []


# -- a large log -------------------------------------------------------------------------


def test_a_log_of_200k_events_verifies(tmp_path: Path, node11: Credentials, pki: Pki) -> None:
    """Built straight into SQLite (not through append, to be quick); no timing asserted:
    this only proves verification streams a large log. `dmp audit verify` of 1M events
    took about 6 s on a 2-vCPU machine."""
    count = 200_000
    log = _log(tmp_path, signer=node11)
    template_event = _event(event_date_time=1, request_id="REQ")
    template = (
        template_event.canonical_bytes()
        .decode()
        .replace('"event_date_time":1,', '"event_date_time":%d,')
        .replace('"request_id":"REQ"', '"request_id":"%s"')
    )
    sample = _event(event_date_time=77, request_id="r-77").canonical_bytes().decode()
    assert template % (77, "r-77") == sample

    def rows() -> Iterator[tuple[int, str, bytes, int, str, str]]:
        for seq in range(1, count + 1):
            when = 1_700_000_000_000_000 + seq
            request_id = f"r-{seq // 4}"
            text = template % (when, request_id)
            yield seq, text, event_leaf_hash(seq, text.encode()), when, INS, request_id

    with closing(sqlite3.connect(tmp_path / "audit.db")) as raw:
        raw.executemany("INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?)", rows())
        raw.commit()
    checkpoint = log.checkpoint()
    assert checkpoint is not None and checkpoint.tree_size == count
    report = verify_log(
        log._engine, log.events_table, log.checkpoints_table, pki.ca_pem_path.read_bytes()
    )
    assert report.ok, report.problems[:3]
    assert (report.events, report.checkpoints_verified, report.last_checkpoint_size) == (
        count,
        1,
        count,
    )
    assert report.source_id == NODE
    assert isinstance(x509.load_pem_x509_certificate(checkpoint.signer_cert_pem), x509.Certificate)

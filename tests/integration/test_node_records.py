"""The node's record use cases over real mutual TLS, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import record_pb2
from node.app import RunningNode
from tests.federation import (
    DOCTOR,
    OTHER_PATIENT,
    PATIENT,
    READ_CONTENT,
    READ_RECORD,
    Client,
    client,
    draft,
    running_node,
)

MiB = 1024 * 1024


@pytest.fixture
def node(pki_dir: Path, db_url: str) -> Iterator[RunningNode]:
    with running_node(pki_dir, "11", db_url, max_content=2 * MiB) as running:
        yield running


@pytest.fixture
def doctor(pki_dir: Path, node: RunningNode) -> Iterator[Client]:
    c = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
    yield c
    c.close()


def put(c: Client, record: record_pb2.Record, content: bytes = b"content") -> record_pb2.Record:
    return c.node.PutRecord(pb.PutRecordRequest(record=record, content=content), timeout=10).record


def content_of(c: Client, record_id: str) -> bytes:
    chunks = c.node.GetRecordContent(
        pb.GetRecordContentRequest(record_id=record_id),
        timeout=10,
        metadata=c.md(op=READ_CONTENT, record_id=record_id),
    )
    return b"".join(chunk.chunk for chunk in chunks)


def list_all(c: Client, request: pb.ListRecordsRequest) -> list[record_pb2.Record]:
    records: list[record_pb2.Record] = []
    while True:
        page = c.node.ListRecords(request, timeout=10, metadata=c.md(request.patient_ins))
        records.extend(page.records)
        if not page.next_page_token:
            return records
        request.page_token = page.next_page_token


class TestRecords:
    def test_put_then_get_returns_metadata_and_identical_content(self, doctor: Client) -> None:
        content = bytes(range(256)) * 10_000  # 2.5 MB > one chunk... capped below
        content = content[: 2 * MiB]
        stored = put(doctor, draft(), content)
        assert stored.id
        assert stored.version == 1
        assert stored.status == record_pb2.RECORD_STATUS_CURRENT
        assert stored.sha256 == hashlib.sha256(content).hexdigest()
        assert stored.size == len(content)
        assert stored.region == "11"
        assert stored.author.identity == f"urn:dmp:practitioner:{DOCTOR}"
        assert stored.author.profession == "doctor"
        got = doctor.node.GetRecord(
            pb.GetRecordRequest(record_id=stored.id),
            timeout=10,
            metadata=doctor.md(op=READ_RECORD, record_id=stored.id),
        ).record
        assert got == stored
        assert content_of(doctor, stored.id) == content

    def test_put_is_idempotent_on_id(self, doctor: Client) -> None:
        first = put(doctor, draft(record_id="cr-1"), b"same")
        again = put(doctor, draft(record_id="cr-1"), b"same")
        assert again == first

    def test_same_id_other_content_is_already_exists(self, doctor: Client) -> None:
        put(doctor, draft(record_id="cr-2"), b"one")
        with pytest.raises(grpc.RpcError) as err:
            put(doctor, draft(record_id="cr-2"), b"two")
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert content_of(doctor, "cr-2") == b"one"

    def test_new_version_supersedes_and_old_stays_readable(self, doctor: Client) -> None:
        v1 = put(doctor, draft(record_id="v1"), b"first")
        second = draft(record_id="v2")
        second.supersedes = v1.id
        v2 = put(doctor, second, b"second")
        assert v2.version == 2
        assert v2.supersedes == "v1"
        old = doctor.node.GetRecord(
            pb.GetRecordRequest(record_id="v1"),
            timeout=10,
            metadata=doctor.md(op=READ_RECORD, record_id="v1"),
        ).record
        assert old.status == record_pb2.RECORD_STATUS_SUPERSEDED
        assert content_of(doctor, "v1") == b"first"
        third = draft(record_id="v3")
        third.supersedes = v1.id
        with pytest.raises(grpc.RpcError) as err:
            put(doctor, third)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        current = list_all(
            doctor,
            pb.ListRecordsRequest(patient_ins=PATIENT, statuses=[record_pb2.RECORD_STATUS_CURRENT]),
        )
        assert [r.id for r in current] == ["v2"]

    def test_list_orders_newest_first_and_filters(self, doctor: Client) -> None:
        put(doctor, draft(record_id="a", effective_s=1_000))
        put(
            doctor,
            draft(
                record_id="b",
                effective_s=3_000,
                kind=record_pb2.RECORD_KIND_PRESCRIPTION,
                code="57833-6",
            ),
        )
        put(doctor, draft(record_id="c", effective_s=2_000, code="11502-2"))
        put(doctor, draft(OTHER_PATIENT, record_id="z", effective_s=5_000))
        everything = list_all(doctor, pb.ListRecordsRequest(patient_ins=PATIENT))
        assert [r.id for r in everything] == ["b", "c", "a"]
        by_kind = list_all(
            doctor,
            pb.ListRecordsRequest(patient_ins=PATIENT, kinds=[record_pb2.RECORD_KIND_DOCUMENT]),
        )
        assert [r.id for r in by_kind] == ["c", "a"]
        by_type = list_all(
            doctor, pb.ListRecordsRequest(patient_ins=PATIENT, type_codes=["11502-2"])
        )
        assert [r.id for r in by_type] == ["c"]
        window = pb.ListRecordsRequest(patient_ins=PATIENT)
        window.since.seconds = 1_500
        window.until.seconds = 3_000
        assert [r.id for r in list_all(doctor, window)] == ["c"]

    def test_paging_has_no_gap_and_no_repeat_under_concurrent_inserts(self, doctor: Client) -> None:
        for i in range(30):
            put(doctor, draft(record_id=f"p{i:02d}", effective_s=10_000 + i // 3))
        request = pb.ListRecordsRequest(patient_ins=PATIENT, page_size=7)
        seen: list[str] = []
        stop = threading.Event()

        def insert_more() -> None:
            i = 0
            while not stop.is_set() and i < 40:
                put(doctor, draft(record_id=f"new{i:02d}", effective_s=20_000 + i))
                i += 1

        writer = threading.Thread(target=insert_more)
        writer.start()
        try:
            while True:
                page = doctor.node.ListRecords(request, timeout=10, metadata=doctor.md())
                seen.extend(r.id for r in page.records)
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
        finally:
            stop.set()
            writer.join()
        original = [s for s in seen if s.startswith("p")]
        assert len(original) == len(set(original)) == 30
        assert len(seen) == len(set(seen))

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            (lambda r: setattr(r, "patient_ins", r.patient_ins[:-1] + "0"), "patient_ins"),
            # Stored as typed, a spaced INS would file the record where no one finds it.
            (lambda r: setattr(r, "patient_ins", " ".join(r.patient_ins)), "patient_ins"),
            (lambda r: setattr(r, "kind", 42), "kind"),
            (lambda r: setattr(r, "kind", 0), "kind"),
            (lambda r: setattr(r, "title", " "), "title"),
            (lambda r: r.type_code.ClearField("code"), "type_code"),
            (lambda r: setattr(r, "content_type", ""), "content_type"),
            (lambda r: setattr(r, "id", "bad id!"), "id"),
        ],
    )
    def test_bad_record_is_invalid_argument_naming_the_field(
        self, doctor: Client, change: object, field: str
    ) -> None:
        record = draft(record_id="bad-1")
        change(record)  # type: ignore[operator]
        with pytest.raises(grpc.RpcError) as err:
            put(doctor, record)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
        assert list_all(doctor, pb.ListRecordsRequest(patient_ins=PATIENT)) == []

    def test_list_bad_arguments(self, doctor: Client) -> None:
        for request, field in [
            (pb.ListRecordsRequest(patient_ins=PATIENT, page_size=-1), "page_size"),
            (pb.ListRecordsRequest(patient_ins=PATIENT, page_token="%%%"), "page_token"),
            (pb.ListRecordsRequest(patient_ins="123"), "patient_ins"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                doctor.node.ListRecords(request, timeout=10, metadata=doctor.md())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in err.value.details()

    def test_token_of_another_query_is_refused(self, doctor: Client) -> None:
        for i in range(3):
            put(doctor, draft(record_id=f"t{i}", effective_s=i + 1))
        page = doctor.node.ListRecords(
            pb.ListRecordsRequest(patient_ins=PATIENT, page_size=1),
            timeout=10,
            metadata=doctor.md(),
        )
        other = pb.ListRecordsRequest(
            patient_ins=PATIENT, page_size=1, page_token=page.next_page_token, type_codes=["x"]
        )
        with pytest.raises(grpc.RpcError) as err:
            doctor.node.ListRecords(other, timeout=10, metadata=doctor.md())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def test_content_over_the_maximum_is_resource_exhausted_and_not_stored(
        self, doctor: Client
    ) -> None:
        with pytest.raises(grpc.RpcError) as err:
            put(doctor, draft(record_id="big"), b"x" * (2 * MiB + 1))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as missing:
            doctor.node.GetRecord(
                pb.GetRecordRequest(record_id="big"),
                timeout=10,
                metadata=doctor.md(op=READ_RECORD, record_id="big"),
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    def test_unknown_record_is_not_found(self, doctor: Client) -> None:
        with pytest.raises(grpc.RpcError) as err:
            doctor.node.GetRecord(
                pb.GetRecordRequest(record_id="nope"),
                timeout=10,
                metadata=doctor.md(op=READ_RECORD, record_id="nope"),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


class TestWhoMay:
    def test_patient_may_not_write(self, pki_dir: Path, node: RunningNode) -> None:
        patient = client(pki_dir, f"patient-{PATIENT}", node.port)
        with pytest.raises(grpc.RpcError) as err:
            put(patient, draft())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        patient.close()

    def test_patient_reads_own_records_only(
        self, pki_dir: Path, node: RunningNode, doctor: Client
    ) -> None:
        mine = put(doctor, draft(record_id="mine"))
        hidden = draft(record_id="hidden")
        hidden.hidden_from_patient = True
        put(doctor, hidden)
        put(doctor, draft(OTHER_PATIENT, record_id="theirs"))
        patient = client(pki_dir, f"patient-{PATIENT}", node.port)
        listed = list_all(patient, pb.ListRecordsRequest(patient_ins=PATIENT))
        assert [r.id for r in listed] == [mine.id]
        with pytest.raises(grpc.RpcError) as err:
            patient.node.ListRecords(
                pb.ListRecordsRequest(patient_ins=OTHER_PATIENT),
                timeout=10,
                metadata=patient.md(OTHER_PATIENT),
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            patient.node.GetRecord(
                pb.GetRecordRequest(record_id="theirs"),
                timeout=10,
                metadata=patient.md(op=READ_RECORD, record_id="theirs"),
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        patient.close()

    def test_another_node_may_not_read(
        self, pki_dir: Path, node: RunningNode, doctor: Client
    ) -> None:
        put(doctor, draft(record_id="r"))
        other = client(pki_dir, "node-53", node.port)
        with pytest.raises(grpc.RpcError) as err:
            other.node.ListRecords(
                pb.ListRecordsRequest(patient_ins=PATIENT), timeout=10, metadata=doctor.md()
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        other.close()


class TestIngest:
    def stream(self, records: list[record_pb2.Record]) -> list[pb.IngestRecordsRequest]:
        return [
            pb.IngestRecordsRequest(put=pb.PutRecordRequest(record=r, content=r.id.encode()))
            for r in records
        ]

    def test_ingest_stores_a_stream_in_batches(
        self, pki_dir: Path, node: RunningNode, doctor: Client
    ) -> None:
        records = [draft(record_id=f"i{i:03d}", effective_s=i + 1) for i in range(2500)]
        answer = doctor.node.IngestRecords(iter(self.stream(records)), timeout=60)
        assert answer.stored_count == 2500
        listed = list_all(doctor, pb.ListRecordsRequest(patient_ins=PATIENT, page_size=1000))
        assert [r.id for r in listed] == [f"i{i:03d}" for i in reversed(range(2500))]
        assert content_of(doctor, "i042") == b"i042"
        again = doctor.node.IngestRecords(iter(self.stream(records[:10])), timeout=60)
        assert again.stored_count == 10  # retries of stored records
        assert (
            len(list_all(doctor, pb.ListRecordsRequest(patient_ins=PATIENT, page_size=1000)))
            == 2500
        )

    def test_a_bad_record_names_itself_and_what_was_stored(self, doctor: Client) -> None:
        records = [draft(record_id=f"b{i}", effective_s=i + 1) for i in range(5)]
        records[3].title = ""
        with pytest.raises(grpc.RpcError) as err:
            doctor.node.IngestRecords(iter(self.stream(records)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "record #3 (3 stored before it)" in err.value.details()
        assert "title" in err.value.details()
        stored = list_all(doctor, pb.ListRecordsRequest(patient_ins=PATIENT))
        assert sorted(r.id for r in stored) == ["b0", "b1", "b2"]

    def test_patient_may_not_ingest(self, pki_dir: Path, node: RunningNode) -> None:
        patient = client(pki_dir, f"patient-{PATIENT}", node.port)
        with pytest.raises(grpc.RpcError) as err:
            patient.node.IngestRecords(iter(self.stream([draft(record_id="x")])), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        patient.close()

"""The node's use cases on records: each audits its call, checks access through the policy
(node/access.py asks dmp/policy.py), then works through the record repository, a write in
one unit of work with its audit event and outbox entry.

The servicer (node/servicer.py) unpacks a request, calls one of these, packs the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dmp import tokens
from dmp.audit.calls import AuditedCall, Auditor, history_events
from dmp.audit.events import AuditEvent, EventType
from dmp.errors import DmpError
from dmp.ins import normalize_ins
from dmp.patients import Traits
from dmp.policy import ReadScope, check_history
from dmp.records import kind_name
from dmp.server import CallContext
from dmp.shared_commit import SharedCall, SharedCommit
from dmp.unit_of_work import UnitOfWork
from dmp.v1 import access_pb2, node_service_pb2, record_pb2
from node.access import NodeAccess
from node.drafts import Draft, Written, cannot_supersede
from node.ingest_batches import BatchWriter
from node.models import RecordRow
from node.store import RecordStore

MAX_EVENTS = 1000
#: An ingest stream commits a batch at this many records or bytes, whichever comes first.
BATCH_RECORDS = 1000
BATCH_BYTES = 64 * 1024 * 1024


class RecordService:
    """What a node does with records, for the person each call is for."""

    def __init__(
        self, engine: Engine, records: RecordStore, access: NodeAccess, auditor: Auditor
    ) -> None:
        self._engine = engine
        self._records = records
        self._access = access
        self._auditor = auditor
        # Concurrent single puts share one transaction and one durable commit.
        self.shared: SharedCommit[Draft, Written] = SharedCommit(
            engine, auditor.log, self._write_puts, on_commit=records.notify, name="put-commit"
        )

    # -- writes ---------------------------------------------------------------------------

    def put_record(
        self, context: CallContext, put: node_service_pb2.PutRecordRequest
    ) -> record_pb2.Record:
        """Store one record durably; idempotent on its id."""
        with self._auditor.call(context, EventType.WRITE, put.record.patient_ins) as audited:
            draft = self._draft(context, put)
            try:
                written = self._put(audited, draft)
            except IntegrityError:
                # A concurrent write won a race (PostgreSQL): the same record id (answer as
                # a retry), or the same new patient's identity row (write again, once).
                existing = self._records.find(draft.record_id)
                if existing is None:
                    written = self._put(audited, draft)
                else:
                    record = self._records.same_or_conflict(existing, draft)
                    audited.commit([record.id])
                    return record
            return written.record(self._records.region)

    def _put(self, audited: AuditedCall, draft: Draft) -> Written:
        """Write one record in the next shared transaction (dmp/shared_commit.py): its
        answer once its record and its audit event are durable."""
        return self.shared.submit(audited, draft)

    def _write_puts(self, session: Session, calls: Sequence[SharedCall[Draft]]) -> list[Written]:
        """The records of several single puts at once (one statement per table), each
        call's audit event naming its record and the version it retired."""
        drafts = [call.item for call in calls]
        previous = self._records.versions_to_retire(session, drafts)
        self._check_supersede(drafts, previous)
        written = self._records.write(session, drafts)
        for call, record in zip(calls, written, strict=True):
            ids = [record.id]
            if record.supersedes:
                call.audited.detail = f"supersedes {record.supersedes}"
                ids.append(record.supersedes)
            call.audit(ids, record.patient_ins)
        return written

    def ingest_records(
        self, context: CallContext, puts: Iterable[node_service_pb2.PutRecordRequest]
    ) -> int:
        """Store a stream of records, one unit of work per batch; return how many. Each batch
        is durable when the next starts; a failure names the item and how many were stored
        before it (puts are idempotent: sending the whole stream again is safe). A batch is
        written while the next one is read and validated (node/ingest_batches.py)."""
        with self._auditor.call(context, EventType.WRITE) as audited:
            batches = BatchWriter(self._flush, audited)
            try:
                batch: list[Draft] = []
                size = 0
                # The (kind, patient) writes the policy allowed this writer, this batch: its
                # answer is the same for every record of the pair, asked once a batch.
                allowed: set[tuple[int, str]] = set()
                identities: dict[bytes, Traits] = {}  # read once a batch
                for index, put in enumerate(puts):
                    audited.patient_ins = put.record.patient_ins  # a refusal names its patient
                    try:
                        batch.append(self._ingest_draft(context, put, allowed, identities))
                    except DmpError as exc:
                        stored = batches.wait() + self._flush(audited, batch)
                        exc.message = f"record #{index} ({stored} stored before it): {exc.message}"
                        raise
                    size += len(batch[-1].content)  # a message's bytes field is copied each read
                    if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                        batches.submit(batch)
                        batch, size = [], 0
                        allowed, identities = set(), {}
                return batches.wait() + self._flush(audited, batch)
            finally:
                batches.close()

    def _ingest_draft(
        self,
        context: CallContext,
        put: node_service_pb2.PutRecordRequest,
        allowed: set[tuple[int, str]],
        identities: dict[bytes, Traits],
    ) -> Draft:
        """`_draft`, the access check asked once per (kind, patient) in `allowed`, each
        identity read once in `identities`."""
        patient = put.patient if put.HasField("patient") else None
        draft = self._records.prepare(
            context.principal, put.record, put.content, patient, traits_memo=identities
        )
        pair = (draft.fields.kind, draft.fields.patient_ins)
        if pair not in allowed:
            self._access.writer(context, kind_name(pair[0]), pair[1])
            allowed.add(pair)
        return draft

    def reveal_record(self, context: CallContext, record_id: str) -> record_pb2.Record:
        """The author makes a record hidden from the patient visible to them. Revealing is a
        write: the patient's directives apply to the author."""
        with self._auditor.call(context, EventType.WRITE) as audited:
            audited.record_ids = (record_id,)
            audited.detail = "revealed to the patient"
            writer = context.principal
            found = self._records.authored(writer.uri, record_id)
            audited.patient_ins = found.patient_ins
            self._access.writer(context, found.kind, found.patient_ins)
            with self._unit(audited) as uow:
                record = self._records.reveal(uow.session, writer.uri, record_id)
                uow.audit()
                uow.commit()
            return record

    def _draft(self, context: CallContext, put: node_service_pb2.PutRecordRequest) -> Draft:
        """A validated record the writer may write, as their role and the patient's
        directives allow."""
        patient = put.patient if put.HasField("patient") else None
        draft = self._records.prepare(context.principal, put.record, put.content, patient)
        self._access.writer(context, kind_name(put.record.kind), put.record.patient_ins)
        return draft

    def _flush(self, audited: AuditedCall, batch: Sequence[Draft]) -> int:
        if not batch:
            return 0
        try:
            self._write(audited, batch)
        except IntegrityError:
            # A concurrent write (PostgreSQL) stored first a new patient's identity row or
            # a record id of this batch, which rolled back whole: written again, once, it
            # sees them (a record already stored is a retry or a conflict, as for a put).
            self._write(audited, batch)
        return len(batch)

    def _write(self, audited: AuditedCall, drafts: Sequence[Draft]) -> list[Written]:
        """In one unit of work (an ingest stream's batch): the supersede checks, the
        records, their outbox entry and one audit event per patient."""
        with self._unit(audited) as uow:
            previous = self._records.versions_to_retire(uow.session, drafts)
            self._check_supersede(drafts, previous)
            written = self._records.write(uow.session, drafts)
            if len(written) == 1 and written[0].supersedes:
                audited.detail = f"supersedes {written[0].supersedes}"
            audited.append_each(uow.session, _ids_by_patient(written))
            uow.commit()
        return written

    def _check_supersede(self, drafts: Sequence[Draft], previous: dict[str, RecordRow]) -> None:
        """Only who may replace a record writes its new version (dmp/policy.py); one answer
        whether the record is missing, another patient's or not theirs (the store answers
        for missing ones). Each draft's writer is its author."""
        in_batch = {d.record_id: d for d in drafts}
        for draft in drafts:
            replaced = draft.fields.supersedes
            if not replaced:
                continue
            writer = draft.author
            row = previous.get(replaced)
            if row is not None:  # e-prescription's records are the node's (prescription_id)
                allowed = (
                    row.patient_ins == draft.record.patient_ins
                    and row.prescription_id is None
                    and self._access.may_supersede(
                        writer, row.author_identity, row.kind, row.type_code
                    )
                )
            elif replaced in in_batch:  # written earlier in this batch (by its author)
                earlier = in_batch[replaced]
                allowed = earlier.record.patient_ins == draft.record.patient_ins and (
                    self._access.may_supersede(
                        writer,
                        earlier.author.uri,
                        kind_name(earlier.record.kind),
                        earlier.record.type_code.code,
                    )
                )
            else:
                continue  # the store refuses a missing one, with the same answer
            if not allowed:
                raise cannot_supersede(draft.record)

    def _unit(self, audited: AuditedCall) -> UnitOfWork:
        return UnitOfWork(self._engine, audited, on_commit=self._records.notify)

    # -- reads ----------------------------------------------------------------------------

    def get_record(self, context: CallContext, record_id: str) -> record_pb2.Record:
        with self._auditor.call(context, EventType.READ_RECORD) as audited:
            audited.record_ids = (record_id,)
            scope = self._reader(
                context, audited, access_pb2.OPERATION_READ_RECORD, record_id=record_id
            )
            record = self._records.get(scope, record_id)
            audited.commit([record.id])
            return record

    def record_content(
        self, context: CallContext, record_id: str
    ) -> Iterator[tuple[record_pb2.Record | None, bytes]]:
        """The record then its content in chunks; the read is audited before the first."""
        with self._auditor.call(context, EventType.READ_CONTENT) as audited:
            audited.record_ids = (record_id,)
            scope = self._reader(
                context, audited, access_pb2.OPERATION_READ_CONTENT, record_id=record_id
            )
            chunks = self._records.content(scope, record_id)
            first = next(chunks)
            audited.commit([record_id])
        yield first
        yield from chunks

    def list_records(
        self, context: CallContext, request: node_service_pb2.ListRecordsRequest
    ) -> node_service_pb2.ListRecordsResponse:
        with self._auditor.call(context, EventType.VIEW, request.patient_ins) as audited:
            patient = normalize_ins(request.patient_ins, "patient_ins")
            scope = self._reader(context, audited, access_pb2.OPERATION_VIEW, patient)
            response = self._records.list_records(scope, request)
            audited.commit([r.id for r in response.records])
            return response

    def access_events(
        self, context: CallContext, request: node_service_pb2.ListAccessEventsRequest
    ) -> list[AuditEvent]:
        """The patient's access history at this node: for the patient only."""
        with self._auditor.call(context, EventType.ACCESS_HISTORY, request.patient_ins) as audited:
            patient = normalize_ins(request.patient_ins, "patient_ins")
            self._reader(context, audited, access_pb2.OPERATION_ACCESS_HISTORY, patient)
            check_history(audited.assertion)
            limit = tokens.page_size(request.page_size, 100, MAX_EVENTS)
            events = history_events(
                self._auditor.log, patient, exclude_own=request.exclude_own, limit=limit
            )
            audited.commit()
            return events

    def _reader(
        self,
        context: CallContext,
        audited: AuditedCall,
        operation: access_pb2.Operation.ValueType,
        patient_ins: str | None = None,
        record_id: str | None = None,
    ) -> ReadScope:
        caller, scope = self._access.reader(
            context, operation, patient_ins, record_id, audited=audited
        )
        audited.caller(caller.assertion)
        return scope


def _ids_by_patient(written: Sequence[Written]) -> dict[str, list[str]]:
    """The ids each patient's audit event names: new records and the versions they retired."""
    patients: dict[str, list[str]] = {}
    for record in written:
        ids = patients.setdefault(record.patient_ins, [])
        ids.append(record.id)
        if record.supersedes:
            ids.append(record.supersedes)
    return patients

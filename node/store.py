"""The node's use cases on records: put, get, read content, list. One transaction each."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Engine,
    Select,
    Table,
    bindparam,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dmp import tokens
from dmp.clock import now_us, to_us
from dmp.db import writer
from dmp.errors import (
    AlreadyExists,
    DataLoss,
    DmpError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from dmp.fields import check_time
from dmp.identity import Principal
from dmp.patients import IDENTITY_CONFLICT, Traits, conflict_message, traits_of
from dmp.policy import ReadScope
from dmp.records import (
    CONFIDENTIALITY_NAMES,
    LOINC,
    check_record_id,
    kind_name,
    status_name,
    validate_draft,
)
from dmp.tls import DEFAULT_MAX_CONTENT
from dmp.v1 import node_service_pb2, page_token_pb2, patient_pb2, record_pb2
from node import integrity
from node.integrity import hash_row, hash_values
from node.models import PatientRow, RecordContentRow, RecordRow
from node.outbox import LocatorOutbox, Pending, announce
from node.records import fingerprint, to_proto
from node.scoping import readable, readable_key, readable_params, readable_shape

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
CHUNK_SIZE = 1024 * 1024
#: Core tables for batch inserts (no ORM object per record).
RECORDS: Table = RecordRow.__table__  # type: ignore[assignment]
CONTENTS: Table = RecordContentRow.__table__  # type: ignore[assignment]


#: Appends the trace of stored records in the transaction that stores them.
WriteAudit = Callable[[Session, list["Written"]], None]


#: The access check of a write, given the validated record (node/access.py).
WriteCheck = Callable[[record_pb2.Record], None]


#: Whether the writer may replace this stored record with a new version (dmp/policy.py).
SupersedeCheck = Callable[[RecordRow], bool]


@dataclass(frozen=True, slots=True)
class Written:
    """A record a write stored (or found already stored, for a retry)."""

    id: str
    patient_ins: str
    #: The stored row, or for a new record the values inserted.
    row: RecordRow | dict[str, Any]

    @property
    def supersedes(self) -> str:
        """The id of the version this write retired, if any."""
        value = self.row.supersedes if isinstance(self.row, RecordRow) else self.row["supersedes"]
        return value or ""

    def record(self, region: str) -> record_pb2.Record:
        row = self.row if isinstance(self.row, RecordRow) else RecordRow(**self.row)
        return to_proto(row, region)


@dataclass(frozen=True, slots=True)
class _Draft:
    """A validated record ready to insert."""

    record: record_pb2.Record
    content: bytes
    traits: Traits | None
    digest: str
    fingerprint: str
    record_id: str
    author: Principal
    may_supersede: SupersedeCheck | None


class RecordStore:
    """Records of one region, over one database."""

    def __init__(
        self,
        engine: Engine,
        region: str,
        *,
        max_content: int = DEFAULT_MAX_CONTENT,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self.region = region
        self.max_content = max_content
        self._clock = clock
        self._on_commit: Callable[[], None] | None = None
        self._list_statements: dict[tuple[Any, ...], Select[Any]] = {}
        self.outbox = LocatorOutbox(engine)

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Call `hook` after each committed record (wakes the locator outbox)."""
        self._on_commit = hook

    # -- writes ---------------------------------------------------------------------------

    def put(
        self,
        writer: Principal,
        record: record_pb2.Record,
        content: bytes,
        patient: patient_pb2.PatientIdentity | None = None,
        audit: WriteAudit | None = None,
        check: WriteCheck | None = None,
        supersede: SupersedeCheck | None = None,
    ) -> record_pb2.Record:
        """Store a record durably; idempotent on its id. The writer is checked before;
        `audit` appends the write's trace in the same transaction; `supersede` decides
        whether the writer may retire the version a new one supersedes."""
        draft = self._prepare(writer, record, content, patient, check, supersede)
        for attempt in range(2):
            try:
                with Session(self._writer) as session, session.begin():
                    written = self._write(session, [draft])
                    if audit is not None:
                        audit(session, written)
                    stored = written[0].record(self.region)
                break
            except IntegrityError:
                # A concurrent write won a race (PostgreSQL): the same record id (answer as
                # a retry), or the same new patient's identity row (write again, once).
                with Session(self._engine) as session:
                    existing = session.scalar(
                        select(RecordRow).where(RecordRow.id == draft.record_id)
                    )
                if existing is not None:
                    return self._same_or_conflict(existing, draft)
                if attempt == 1:
                    raise
        self._notify()
        return stored

    def put_many(
        self,
        writer: Principal,
        items: Iterable[tuple[record_pb2.Record, bytes, patient_pb2.PatientIdentity | None]],
        *,
        audit: WriteAudit | None = None,
        check: WriteCheck | None = None,
        supersede: SupersedeCheck | None = None,
        batch_records: int = 1000,
        batch_bytes: int = 64 * 1024 * 1024,
    ) -> int:
        """Store a stream of records, one transaction per batch; return how many. Each batch
        is durable when the next starts; a failure names the item and how many were stored
        before it (puts are idempotent: sending the whole stream again is safe)."""
        stored = 0
        batch: list[_Draft] = []
        size = 0

        def flush() -> None:
            nonlocal stored, batch, size
            if batch:
                with Session(self._writer) as session, session.begin():
                    written = self._write(session, batch)
                    if audit is not None:
                        audit(session, written)
                stored += len(batch)
                batch, size = [], 0
                self._notify()

        stream = iter(items)
        index = 0
        while True:
            try:
                item = next(stream, None)  # the stream may check each record as it comes
                if item is None:
                    break
                record, content, patient = item
                batch.append(self._prepare(writer, record, content, patient, check, supersede))
            except DmpError as exc:
                flush()
                exc.message = f"record #{index} ({stored} stored before it): {exc.message}"
                raise
            index += 1
            size += len(content)
            if len(batch) >= batch_records or size >= batch_bytes:
                flush()
        flush()
        return stored

    def _notify(self) -> None:
        if self._on_commit is not None:
            self._on_commit()

    def _prepare(
        self,
        writer: Principal,
        record: record_pb2.Record,
        content: bytes,
        patient: patient_pb2.PatientIdentity | None,
        check: WriteCheck | None,
        supersede: SupersedeCheck | None,
    ) -> _Draft:
        validate_draft(record)
        if check is not None:
            check(record)
        traits = None
        if patient is not None and patient.ins:
            traits = traits_of(patient, "patient")
            if traits.ins != record.patient_ins:
                raise InvalidArgument("patient.ins differs from record.patient_ins")
        if len(content) > self.max_content:
            raise ResourceExhausted(
                f"content is {len(content)} bytes: this node accepts at most"
                f" {self.max_content} bytes per record"
            )
        digest = hashlib.sha256(content).hexdigest()
        return _Draft(
            record=record,
            content=content,
            traits=traits if traits is not None and not traits.empty else None,
            digest=digest,
            fingerprint=fingerprint(record, digest, writer.uri),
            record_id=record.id or str(uuid.uuid4()),
            author=writer,
            may_supersede=supersede,
        )

    def _write(self, session: Session, drafts: Sequence[_Draft]) -> list[Written]:
        """Insert the drafts in the session's transaction (one INSERT per table for a batch);
        same id and same content is a retry, same id and other content is refused."""
        ids = [d.record_id for d in drafts]
        known = {
            row.id: row for row in session.scalars(select(RecordRow).where(RecordRow.id.in_(ids)))
        }
        pending: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        written: list[Written] = []
        merged: set[Traits] = set()
        now = self._clock()

        def insert_pending() -> None:
            if pending:
                session.execute(insert(RECORDS), pending)
                session.execute(insert(CONTENTS), contents)
                pending.clear()
                contents.clear()

        for draft in drafts:
            found = known.get(draft.record_id)
            if found is not None:
                self._same_or_conflict(found, draft)
                written.append(Written(found.id, found.patient_ins, found))
                continue
            if draft.traits is not None and draft.traits not in merged:
                _merge_traits(session, draft.traits)
                merged.add(draft.traits)
            if draft.record.supersedes:
                insert_pending()  # the version it supersedes may be in this batch
            values = self._new_row(session, draft, now)
            known[draft.record_id] = RecordRow(**values)
            pending.append(values)
            contents.append({"record_id": draft.record_id, "content": draft.content})
            written.append(Written(draft.record_id, draft.record.patient_ins, values))
        insert_pending()
        announce(session, (w.patient_ins for w in written), now)
        return written

    def _same_or_conflict(self, existing: RecordRow, draft: _Draft) -> record_pb2.Record:
        """A retry of the same put answers the stored record; anything else is refused. A
        caller learns nothing of a record it did not write: the same answer whoever holds
        the id, and no mention of its patient or content."""
        if existing.author_identity != draft.author.uri:
            raise AlreadyExists(
                f"record.id {draft.record_id!r} cannot be used: choose another id (a new"
                " UUID), or leave record.id empty and the node assigns one"
            )
        integrity.check([existing], self.region)
        if existing.fingerprint != draft.fingerprint:
            raise AlreadyExists(
                f"record {existing.id} already exists with other content or metadata:"
                " records are never overwritten; write a new version with `supersedes`"
            )
        return to_proto(existing, self.region)

    def _new_row(self, session: Session, draft: _Draft, created: int) -> dict[str, Any]:
        record = draft.record
        version = 1
        root_id = draft.record_id
        if record.supersedes:
            previous = session.scalar(select(RecordRow).where(RecordRow.id == record.supersedes))
            # One answer whether the record is missing, another patient's, or not the
            # writer's to replace: a refusal tells nothing of records one may not read.
            if (
                previous is None
                or previous.patient_ins != record.patient_ins
                or not self._may_supersede(draft, previous)
            ):
                raise FailedPrecondition(
                    f"record.supersedes {record.supersedes!r}: no such record of this patient that"
                    " you may supersede on this node; only the author of a record writes its"
                    " new version, on the node that holds it"
                )
            integrity.check([previous], self.region)  # never re-hash a damaged row
            if previous.status != "current":
                raise FailedPrecondition(
                    f"record {previous.id} is already superseded: supersede its latest version"
                )
            version = previous.version + 1
            root_id = previous.root_id
            session.execute(
                update(RecordRow)
                .where(RecordRow.id == previous.id)
                .values(status="superseded", row_hash=hash_row(previous, status="superseded"))
            )
        author = draft.author
        values = dict(
            id=draft.record_id,
            patient_ins=record.patient_ins,
            kind=kind_name(record.kind),
            type_system=record.type_code.system or LOINC,
            type_code=record.type_code.code.strip(),
            type_display=record.type_code.display,
            title=record.title.strip(),
            author_identity=author.uri,
            author_name=author.name,
            author_profession=author.profession,
            organization=record.organization,
            created_us=created,
            effective_us=to_us(record.effective_time)
            if record.HasField("effective_time")
            else created,
            status="current",
            version=version,
            supersedes=record.supersedes or None,
            root_id=root_id,
            confidentiality=CONFIDENTIALITY_NAMES.get(record.confidentiality, "normal"),
            hidden_from_patient=record.hidden_from_patient,
            revealed_us=None,
            content_type=record.content_type.strip(),
            size=len(draft.content),
            sha256=draft.digest,
            fingerprint=draft.fingerprint,
        )
        values["row_hash"] = hash_values(values)
        return values

    @staticmethod
    def _may_supersede(draft: _Draft, previous: RecordRow) -> bool:
        if draft.may_supersede is not None:
            return draft.may_supersede(previous)
        return previous.author_identity == draft.author.uri

    # -- reads ----------------------------------------------------------------------------

    def _readable_row(self, session: Session, scope: ReadScope, record_id: str) -> RecordRow:
        check_record_id(record_id)
        stmt = readable(select(RecordRow), scope, self._clock()).where(RecordRow.id == record_id)
        row = session.scalar(stmt)
        if row is None:
            raise NotFound(
                f"record {record_id} not found on node {self.region} among the records this"
                " access may see"
            )
        integrity.check([row], self.region)
        return row

    def _masked_roots(self, connection: Connection, scope: ReadScope) -> frozenset[str]:
        """The first-version ids of the records the patient masked (all versions masked),
        from rows whose integrity is checked: a damaged root would unmask versions."""
        if not scope.masked:
            return frozenset()
        rows = list(
            connection.execute(
                select(RECORDS).where(
                    RECORDS.c.patient_ins == scope.patient_ins,
                    RECORDS.c.id.in_(sorted(scope.masked)),
                )
            )
        )
        # The caller may not be allowed to know these ids (masked from them): not named.
        integrity.check(rows, self.region, name_them=False)
        return frozenset(row.root_id for row in rows)

    def get(self, scope: ReadScope, record_id: str) -> record_pb2.Record:
        with Session(self._engine) as session:
            row = self._readable_row(session, scope, record_id)
            return to_proto(row, self.region, self._masked_roots(session.connection(), scope))

    def content(
        self, scope: ReadScope, record_id: str
    ) -> Iterator[tuple[record_pb2.Record | None, bytes]]:
        """The record's metadata then its content in chunks, checked against its SHA-256."""
        with Session(self._engine) as session:
            row = self._readable_row(session, scope, record_id)
            blob = session.scalar(
                select(RecordContentRow.content).where(RecordContentRow.record_id == row.id)
            )
            record = to_proto(row, self.region, self._masked_roots(session.connection(), scope))
        if blob is None or hashlib.sha256(blob).hexdigest() != record.sha256:
            raise DataLoss(
                f"content of record {record_id} does not match its SHA-256: restore the node"
                " from its last verified backup"
            )
        if not blob:
            yield record, b""
            return
        for offset in range(0, len(blob), CHUNK_SIZE):
            yield (record if offset == 0 else None), blob[offset : offset + CHUNK_SIZE]

    def reveal(
        self,
        writer: Principal,
        record_id: str,
        audit: Callable[[Session, str], None] | None = None,
        check: Callable[[str, str], None] | None = None,
    ) -> record_pb2.Record:
        """The author makes a record hidden from the patient visible to them; `check(kind,
        patient_ins)` applies the patient's directives to the author first."""
        check_record_id(record_id)
        mine = select(RecordRow).where(
            RecordRow.id == record_id, RecordRow.author_identity == writer.uri
        )
        not_yours = NotFound(f"record {record_id}: no record of yours with this id on this node")
        if check is not None:
            with Session(self._engine) as session:
                found = session.scalar(mine)
                if found is None:
                    raise not_yours
                check(found.kind, found.patient_ins)
        with Session(self._writer) as session, session.begin():
            row = session.scalar(mine)
            if row is None:
                raise not_yours
            integrity.check([row], self.region)  # never re-hash a damaged row
            if row.revealed_us is None:
                row.revealed_us = self._clock()
                row.row_hash = hash_row(row)
            if audit is not None:
                audit(session, row.patient_ins)
            return to_proto(row, self.region)

    def list_records(
        self, scope: ReadScope, request: node_service_pb2.ListRecordsRequest
    ) -> node_service_pb2.ListRecordsResponse:
        size = tokens.page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query_print = tokens.query_fingerprint(request)
        after: tuple[int, str] | None = None
        if request.page_token:
            cursor = tokens.decode(request.page_token, page_token_pb2.RecordCursor, query_print)
            after = (cursor.effective_time_us, cursor.record_id)
        elif request.HasField("start_after"):
            start = check_time(request.start_after.effective_time, "start_after.effective_time")
            after = (to_us(start), check_record_id(request.start_after.record_id, "start_after"))
        # The statement of this shape is built once; the values of this call are parameters.
        key = (
            readable_key(scope),
            tuple(request.kinds),
            tuple(request.type_codes),
            request.HasField("since"),
            request.HasField("until"),
            tuple(request.statuses),
            after is not None,
            size,
        )
        stmt = self._list_statements.get(key)
        if stmt is None:
            stmt = self._list_statement(scope, request, after is not None, size)
            if len(self._list_statements) >= 1000:
                self._list_statements.clear()
            self._list_statements[key] = stmt
        params = readable_params(scope, self._clock())
        if request.HasField("since"):
            params["since_us"] = to_us(check_time(request.since, "since"))
        if request.HasField("until"):
            params["until_us"] = to_us(check_time(request.until, "until"))
        if after is not None:
            params["after_us"], params["after_id"] = after
        # Core rows on a plain connection: a list is read-only, no ORM object per record.
        with self._engine.connect() as connection:
            rows: list[Any] = list(connection.execute(stmt, params))
            roots = self._masked_roots(connection, scope)
        integrity.check(rows, self.region)
        response = node_service_pb2.ListRecordsResponse(
            records=[to_proto(row, self.region, roots) for row in rows[:size]]
        )
        if len(rows) > size:
            last = rows[size - 1]
            response.next_page_token = encode_cursor(last.effective_us, last.id, query_print)
        return response

    @staticmethod
    def _list_statement(
        scope: ReadScope, request: node_service_pb2.ListRecordsRequest, after: bool, size: int
    ) -> Select[Any]:
        """The list query of one shape; per-call values are bind parameters."""
        stmt = readable_shape(select(RecordRow.__table__), scope)
        if request.kinds:
            stmt = stmt.where(RecordRow.kind.in_([kind_name(k, "kinds") for k in request.kinds]))
        if request.type_codes:
            stmt = stmt.where(RecordRow.type_code.in_(list(request.type_codes)))
        if request.HasField("since"):
            stmt = stmt.where(RecordRow.effective_us >= bindparam("since_us"))
        if request.HasField("until"):
            stmt = stmt.where(RecordRow.effective_us < bindparam("until_us"))
        if request.statuses:
            stmt = stmt.where(RecordRow.status.in_([status_name(s) for s in request.statuses]))
        if after:
            stmt = stmt.where(
                tuple_(RecordRow.effective_us, RecordRow.id)
                < tuple_(bindparam("after_us"), bindparam("after_id"))
            )
        return stmt.order_by(RecordRow.effective_us.desc(), RecordRow.id.desc()).limit(size + 1)

    # -- locator --------------------------------------------------------------------------

    def pending_notifications(self, limit: int = 500) -> Pending:
        """Outbox rows to deliver: their seqs, and a summary per patient (node/outbox.py)."""
        return self.outbox.pending(limit)

    def acknowledge(self, seqs: Sequence[int]) -> None:
        """Forget the outbox rows the directory acknowledged: exactly those delivered."""
        self.outbox.acknowledge(seqs)


def _merge_traits(session: Session, traits: Traits) -> None:
    """Keep the traits writers give; refuse those that contradict the ones kept."""
    row = session.get(PatientRow, traits.ins)
    if row is None:
        session.add(PatientRow(ins=traits.ins, **PatientRow.values(traits)))
        return
    conflicts = row.traits().contradicts(traits)
    if conflicts:
        raise FailedPrecondition(conflict_message(traits.ins, conflicts), reason=IDENTITY_CONFLICT)
    row.fill(traits)


def encode_cursor(effective_us: int, record_id: str, query_print: bytes) -> str:
    return tokens.encode(
        page_token_pb2.RecordCursor(
            effective_time_us=effective_us, record_id=record_id, query_fingerprint=query_print
        )
    )

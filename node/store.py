"""The node's record repository: validates, writes in the caller's unit of work, reads within
a read scope. It knows nothing of who may do what (dmp/policy.py) or of audit."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from sqlalchemy import (
    Engine,
    Select,
    Table,
    bindparam,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from dmp import tokens
from dmp.clock import from_us, now_us, to_us
from dmp.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from dmp.fields import check_time
from dmp.identity import Principal
from dmp.patients import Traits, traits_of
from dmp.policy import ReadScope
from dmp.prepared import Prepared, prepare
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
from node.bulk import insert_rows, stored_keys
from node.drafts import Draft, Written, cannot_supersede
from node.integrity import hash_row, hash_values
from node.keys import PatientKey, Sealer, shredded_error
from node.models import RecordContentRow, RecordRow
from node.outbox import LocatorOutbox, Pending, announce
from node.patient_traits import merge_all
from node.records import fill, fingerprint_of, to_proto
from node.scoping import readable, readable_key, readable_params, readable_shape

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
CHUNK_SIZE = 1024 * 1024
#: Core tables for batch inserts (no ORM object per record).
RECORDS: Table = RecordRow.__table__  # type: ignore[assignment]
CONTENTS: Table = RecordContentRow.__table__  # type: ignore[assignment]


class RecordStore:
    """Records of one region, over one database."""

    def __init__(
        self,
        engine: Engine,
        region: str,
        *,
        max_content: int = DEFAULT_MAX_CONTENT,
        clock: Callable[[], int] = now_us,
        sealer: Sealer | None = None,
    ) -> None:
        self._engine = engine
        #: Encryption at rest (node/keys.py); None stores in clear (a node without a KEK).
        self.sealer = sealer
        self.region = region
        self.max_content = max_content
        self._clock = clock
        self._on_commit: Callable[[], None] | None = None
        self._list_statements: dict[tuple[Any, ...], Prepared] = {}
        self.outbox = LocatorOutbox(engine, sealer)

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Call `hook` after each committed record (wakes the locator outbox)."""
        self._on_commit = hook

    # -- writes ---------------------------------------------------------------------------

    def notify(self) -> None:
        """After each committed write (wakes the locator outbox)."""
        if self._on_commit is not None:
            self._on_commit()

    def prepare(
        self,
        writer: Principal,
        record: record_pb2.Record,
        content: bytes,
        patient: patient_pb2.PatientIdentity | None,
        *,
        prescription_id: str | None = None,
        traits_memo: dict[bytes, Traits] | None = None,
    ) -> Draft:
        """Validate a record to write (nothing of who may write it: the use case asks).
        `prescription_id` links a record the node writes from e-prescription to its
        prescription (Record.prescription_id is output only: a writer's is ignored).
        `traits_memo` keeps the traits of identities already read (a stream sends a
        patient's identity with each of their records), by the identity's bytes."""
        fields = validate_draft(record)
        traits = None
        if patient is not None and patient.ins:
            if traits_memo is None:
                traits = traits_of(patient, "patient")
            else:
                wire = patient.SerializeToString()
                traits = traits_memo.get(wire)
                if traits is None:
                    traits = traits_memo[wire] = traits_of(patient, "patient")
            if traits.ins != fields.patient_ins:
                raise InvalidArgument("patient.ins differs from record.patient_ins")
        if len(content) > self.max_content:
            raise ResourceExhausted(
                f"content is {len(content)} bytes: this node accepts at most"
                f" {self.max_content} bytes per record"
            )
        digest = hashlib.sha256(content).hexdigest()
        return Draft(
            record=record,
            content=content,
            traits=traits if traits is not None and not traits.empty else None,
            digest=digest,
            fingerprint=fingerprint_of(fields, digest, writer.uri),
            record_id=fields.id or str(uuid.uuid4()),
            author=writer,
            fields=fields,
            prescription_id=prescription_id,
        )

    def find(self, record_id: str) -> RecordRow | None:
        """The stored row of an id, whoever wrote it (to answer a write's retry)."""
        with Session(self._engine) as session:
            return session.scalar(select(RecordRow).where(RecordRow.id == record_id))

    def versions_to_retire(self, session: Session, drafts: Sequence[Draft]) -> dict[str, RecordRow]:
        """The stored rows the drafts supersede, by id, in the write's transaction."""
        ids = sorted({d.fields.supersedes for d in drafts if d.fields.supersedes})
        if not ids:
            return {}
        return {
            row.id: row for row in session.scalars(select(RecordRow).where(RecordRow.id.in_(ids)))
        }

    def write(self, session: Session, drafts: Sequence[Draft]) -> list[Written]:
        """Insert the drafts in the session's transaction (one INSERT per table for a batch);
        same id and same content is a retry, same id and other content is refused."""
        ids = [d.record_id for d in drafts]
        # Ids first (a new record's usually are not stored), the rows of the ones that are.
        present = stored_keys(session, RECORDS.c.id, ids)
        known: dict[str, RecordRow] = {}
        if present:
            known = {
                row.id: row
                for row in session.scalars(select(RecordRow).where(RecordRow.id.in_(present)))
            }
        pending: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        written: list[Written] = []
        now = self._clock()
        keys: dict[str, bytes] = {}
        # The patients of the new records (an id's first draft), each row locked and merged
        # once per batch, before their records.
        seen = set(known)
        given: list[Traits] = []
        for draft in drafts:
            if draft.record_id not in seen:
                seen.add(draft.record_id)
                if draft.traits is not None:
                    given.append(draft.traits)
        merge_all(session, given, self.sealer, keys, now)
        #: Rows this write inserts, by id: a row object only for an id sent twice.
        fresh: dict[str, dict[str, Any]] = {}

        def insert_pending() -> None:
            if pending:
                session.flush()  # the patients' rows first (the driver does not flush)
                insert_rows(session, RECORDS, pending)
                insert_rows(session, CONTENTS, contents)
                pending.clear()
                contents.clear()

        for draft in drafts:
            found = known.get(draft.record_id)
            if found is None and draft.record_id in fresh:  # the same id twice in the batch
                found = known[draft.record_id] = RecordRow(**fresh[draft.record_id])
            if found is not None:
                message = self.same_or_conflict(found, draft, session)
                written.append(Written(found.id, found.patient_ins, found, message))
                continue
            if draft.fields.supersedes:
                insert_pending()  # the version it supersedes may be in this batch
            values = self._new_row(session, draft, now)
            fresh[draft.record_id] = values
            stored, content = values, draft.content
            if self.sealer is not None:
                ins = draft.fields.patient_ins
                if ins not in keys:
                    keys[ins] = self.sealer.key_for_write(session, ins, now)
                stored, content = self.sealer.seal_row(keys[ins], values, content)
            pending.append(stored)
            contents.append({"record_id": draft.record_id, "content": content})
            written.append(Written(draft.record_id, draft.fields.patient_ins, values))
        insert_pending()
        announce(session, (w.patient_ins for w in written), now)
        return written

    def same_or_conflict(
        self, existing: RecordRow, draft: Draft, session: Session | None = None
    ) -> record_pb2.Record:
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
        if existing.sealed is None:
            return to_proto(existing, self.region)
        if session is not None:
            return self._protos(session.connection(), [existing])[0]
        with self._engine.connect() as connection:
            return self._protos(connection, [existing])[0]

    def _new_row(self, session: Session, draft: Draft, created: int) -> dict[str, Any]:
        record = draft.record
        version = 1
        root_id = draft.record_id
        if record.supersedes:
            # Locked (PostgreSQL; SQLite's writer holds the lock): a concurrent reveal or
            # `dmp node encrypt` of it cannot slip between this read and its re-hash.
            # populate_existing: the row as the lock sees it, not the copy the supersede
            # check loaded before a concurrent writer retired it (that copy would still say
            # "current", and both writers would fork the record).
            previous = session.scalar(
                select(RecordRow)
                .where(RecordRow.id == record.supersedes)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
            # One answer whether the record is missing, another patient's, or not the
            # writer's to replace: a refusal tells nothing of records one may not read.
            if previous is None or previous.patient_ins != record.patient_ins:
                raise cannot_supersede(record)
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
        fields = draft.fields
        effective_us = fields.effective_us
        values = {
            "id": draft.record_id,
            "patient_ins": fields.patient_ins,
            "kind": kind_name(fields.kind),
            "type_system": fields.type_system or LOINC,
            "type_code": fields.type_code.strip(),
            "type_display": fields.type_display,
            "title": fields.title.strip(),
            "author_identity": author.uri,
            "author_name": author.name,
            "author_profession": author.profession,
            "organization": fields.organization,
            "created_us": created,
            "effective_us": created if effective_us is None else effective_us,
            "status": "current",
            "version": version,
            "supersedes": fields.supersedes or None,
            "root_id": root_id,
            "confidentiality": CONFIDENTIALITY_NAMES.get(fields.confidentiality, "normal"),
            "hidden_from_patient": fields.hidden_from_patient,
            "revealed_us": None,
            "content_type": fields.content_type.strip(),
            "size": len(draft.content),
            "sha256": draft.digest,
            "fingerprint": draft.fingerprint,
            "prescription_id": draft.prescription_id,
        }
        values["row_hash"] = hash_values(values)
        return values

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
            connection = session.connection()
            return self._protos(connection, [row], self._masked_roots(connection, scope))[0]

    def content(
        self, scope: ReadScope, record_id: str
    ) -> Iterator[tuple[record_pb2.Record | None, bytes]]:
        """The record's metadata then its content in chunks, checked against its SHA-256."""
        with Session(self._engine) as session:
            row = self._readable_row(session, scope, record_id)
            blob = session.scalar(
                select(RecordContentRow.content).where(RecordContentRow.record_id == row.id)
            )
            connection = session.connection()
            key = self._keys(connection, [row]).get(row.patient_ins)
            record = self._protos(connection, [row], self._masked_roots(connection, scope), key)[0]
        if blob is not None and row.sealed is not None:
            blob = self._open_content(row, key, blob)
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

    def authored(self, author_uri: str, record_id: str) -> RecordRow:
        """A record its author wrote on this node; the same NotFound for any other id."""
        check_record_id(record_id)
        with Session(self._engine) as session:
            row = session.scalar(self._authored(author_uri, record_id))
        if row is None:
            raise _not_yours(record_id)
        return row

    def reveal(self, session: Session, author_uri: str, record_id: str) -> record_pb2.Record:
        """Make a record hidden from the patient visible to them, in the session's
        transaction; revealing twice keeps the first time."""
        row = session.scalar(self._authored(author_uri, record_id).with_for_update())
        if row is None:
            raise _not_yours(record_id)
        integrity.check([row], self.region)  # never re-hash a damaged row
        if row.revealed_us is None:
            row.revealed_us = self._clock()
            row.row_hash = hash_row(row)
        return self._protos(session.connection(), [row])[0]

    @staticmethod
    def _authored(author_uri: str, record_id: str) -> Select[RecordRow]:
        return select(RecordRow).where(
            RecordRow.id == record_id, RecordRow.author_identity == author_uri
        )

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
            stmt = prepare(
                self._list_statement(scope, request, after is not None, size),
                self._engine.dialect,
                "StoredRecord",
            )
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
        # The compiled list query on the driver's cursor: no ORM object, no execution
        # context per call. Alone it is its own snapshot (no BEGIN); with the masked roots
        # or the patients' data keys to read too, all of them read in one transaction.
        with self._engine.connect() as connection:
            if scope.masked or self.sealer is not None:
                connection.begin()
            rows = stmt.fetch(connection, params)
            roots = self._masked_roots(connection, scope)
            integrity.check(rows, self.region)
            response = node_service_pb2.ListRecordsResponse()
            self._protos(connection, rows[:size], roots, into=response.records)
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

    def messages(self, connection: Connection, rows: Sequence[Any]) -> list[record_pb2.Record]:
        """The messages of stored rows read outside any access scope (the operator's
        export), integrity checked and sealed metadata opened, as every read gives them."""
        integrity.check(rows, self.region)
        return self._protos(connection, rows)

    # -- encryption at rest ----------------------------------------------------------------

    def _keys(self, connection: Connection, rows: Sequence[Any]) -> dict[str, PatientKey]:
        sealed = [row.patient_ins for row in rows if row.sealed is not None]
        if not sealed:
            return {}
        if self.sealer is None:
            raise FailedPrecondition(
                f"node {self.region} holds encrypted records but was started without its"
                " KEK: restart it with --kek-file"
            )
        return self.sealer.keys_for_read(connection, sealed)

    def _protos(
        self,
        connection: Connection,
        rows: Sequence[Any],
        roots: frozenset[str] = frozenset(),
        key: PatientKey | None = None,
        *,
        into: RepeatedCompositeFieldContainer[record_pb2.Record] | None = None,
    ) -> list[record_pb2.Record]:
        """The messages of stored rows (integrity checked), sealed metadata opened; a
        shredded patient's records keep their clear metadata, their free text empty.
        With `into`, they are built in place there (an answer's list), not copied in."""
        if into is None:
            records = [to_proto(row, self.region, roots) for row in rows]
        else:
            records = [fill(into.add(), row, self.region, roots) for row in rows]
        if not any(row.sealed is not None for row in rows):
            return records
        keys = self._keys(connection, rows) if key is None else {rows[0].patient_ins: key}
        for row, record in zip(rows, records, strict=True):
            if row.sealed is None:
                continue
            found = keys.get(row.patient_ins)
            if found is not None and found.shredded_us is not None:
                record.shredded_time.CopyFrom(from_us(found.shredded_us))
            if found is None or found.key is None:
                continue  # shredded: nothing to open (content reads say so)
            opened = Sealer.open_metadata(found.key, row)
            record.title = opened["title"]
            record.type_code.display = opened["type_display"]
            record.organization = opened["organization"]
            record.author.name = opened["author_name"]
        return records

    def _open_content(self, row: Any, key: PatientKey | None, blob: bytes) -> bytes:
        if key is None or key.key is None:
            if key is not None and key.shredded_us is not None:
                raise shredded_error(row.id, key.shredded_us)
            raise DataLoss(
                f"record {row.id}: its patient's data key is missing on node {self.region};"
                " the node's operator must restore it from the last verified backup"
            )
        return Sealer.open_content(key.key, row, blob)

    # -- locator --------------------------------------------------------------------------

    def pending_notifications(self, limit: int = 500) -> Pending:
        """Outbox rows to deliver: their seqs, and a summary per patient (node/outbox.py)."""
        return self.outbox.pending(limit)

    def acknowledge(self, seqs: Sequence[int]) -> None:
        """Forget the outbox rows the directory acknowledged: exactly those delivered."""
        self.outbox.acknowledge(seqs)


def _not_yours(record_id: str) -> NotFound:
    return NotFound(f"record {record_id}: no record of yours with this id on this node")


def encode_cursor(effective_us: int, record_id: str, query_print: bytes) -> str:
    return tokens.encode(
        page_token_pb2.RecordCursor(
            effective_time_us=effective_us, record_id=record_id, query_fingerprint=query_print
        )
    )

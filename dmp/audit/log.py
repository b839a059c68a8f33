"""The append-only audit log of one service and its group commit."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    Engine,
    Table,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.event import listen
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from dmp.assertion import replayed
from dmp.audit.checkpoints import Checkpoint, sign_checkpoint
from dmp.audit.events import AuditEvent
from dmp.audit.merkle import MerkleFrontier, event_leaf_hash
from dmp.db import rows_insert_sql, writer
from dmp.errors import DataLoss, DmpError, FailedPrecondition
from dmp.failures import audit_failure
from dmp.group_commit import GroupCommit, Pending
from dmp.kept_connection import KeptConnection
from dmp.nonces import StoredNonces
from dmp.pki import Credentials

log = logging.getLogger("dmp.audit")


#: The columns of an event's row, in the order `_insert` gives their values.
_EVENT_COLUMNS = (
    "seq",
    "event_json",
    "leaf_hash",
    "event_date_time",
    "participant_object_patient_ins",
    "request_id",
)
#: At most this many events per INSERT (6 bound values each: far below SQLite's limit).
_ROWS_PER_INSERT = 500


@dataclass(frozen=True)
class LoggedEvent:
    """An event as read back from the log, with its position and whether its stored leaf
    hash still matches it."""

    seq: int
    event: AuditEvent
    hash_ok: bool


#: An event waiting to be committed, with the nonce of the call's assertion to insert in the
#: same transaction (None when there is none, or it is already stored).
_Item = tuple[AuditEvent, "Nonce | None"]
Nonce = tuple[bytes, int]


class AuditLog:
    """The append-only audit log of one service over its database.

    ``append`` writes in the caller's transaction (a write and its event commit together);
    ``record`` commits the event on its own before returning, so that a read serves data
    only once its trace is durable, and raises :class:`Unavailable` if it cannot. There is
    no way to update or delete an event through this class.

    With a ``signer`` (the service's own credentials, whose identity must be ``source_id``)
    ``checkpoint`` signs the current tree head (and calls each of ``on_checkpoint``);
    ``start`` takes one every ``checkpoint_interval`` seconds when events were added and as
    soon as ``checkpoint_every`` events were, ``close`` a last one.

    Appends are serialized by the database: on SQLite by the write lock (callers pass a
    transaction of :func:`dmp.db.writer`), on PostgreSQL by a transaction-scoped advisory
    lock (READ COMMITTED, the default isolation), so ``seq`` has no gaps and follows commit
    order even across processes (directory replicas share one log).
    """

    def __init__(
        self,
        engine: Engine,
        events_table: Table,
        checkpoints_table: Table,
        *,
        source_id: str,
        region: str = "",
        signer: Credentials | None = None,
        checkpoint_interval: float = 60.0,
        checkpoint_every: int = 1000,
        nonces: StoredNonces | None = None,
    ) -> None:
        if signer is not None and signer.principal.uri != source_id:
            raise FailedPrecondition(
                f"the audit log of {source_id} cannot be signed by {signer.principal.uri}"
            )
        if checkpoint_interval <= 0 or checkpoint_every <= 0:
            raise ValueError("checkpoint_interval and checkpoint_every must be positive")
        self._engine = engine
        self._writer = writer(engine)
        # The group commit's transactions, tagged (a commit listener can tell them).
        self._batches = self._writer.execution_options(dmp_commit="audit-commit")
        # The group commit's connection, kept between batches that follow closely (a
        # check-out and the pool's reset cost a batch of one about what its statements do).
        self._kept = KeptConnection(self._batches)
        self._events = events_table
        # Built once: a statement's construction and cache key cost more than running it.
        # Driver statements (an INSERT per count of rows): made once, run on every read.
        self._max_seq_sql = f"SELECT max(seq) FROM {events_table.name}"
        self._sql: dict[int, str] = {}
        self._checkpoints = checkpoints_table
        self.source_id = source_id
        self.region = region
        self._signer = signer
        self._interval, self._every = checkpoint_interval, checkpoint_every
        self._due = threading.Event()  # checkpoint_every events since the last checkpoint
        self.on_checkpoint: list[Callable[[Checkpoint], None]] = []
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"dmp-audit:{events_table.name}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        # Tree state, advanced from the table by checkpoint() (appends never touch it: a
        # rolled-back append leaves nothing behind, and other processes' appends count).
        self._tree_lock = threading.Lock()
        self._tree = MerkleFrontier()
        self._last_checkpoint = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The seen nonces (same database): a read's nonce commits with its event.
        self._nonces = nonces
        # Group commit of record() (dmp/group_commit.py).
        self._commits: GroupCommit[_Item, int] = GroupCommit(
            "audit-commit", self._commit_batch, self._failure
        )

    @property
    def events_table(self) -> Table:
        return self._events

    @property
    def checkpoints_table(self) -> Table:
        return self._checkpoints

    # -- appending

    def _own(self, event: AuditEvent) -> AuditEvent:
        source = event.audit_source_id or self.source_id
        region = event.audit_source_region or self.region
        if source != self.source_id:
            raise ValueError(
                f"an event of {event.audit_source_id} does not belong in the log of"
                f" {self.source_id}"
            )
        if (source, region) == (event.audit_source_id, event.audit_source_region):
            return event
        values = event.to_dict()
        values["audit_source_id"] = source
        values["audit_source_region"] = region
        return AuditEvent.from_dict(values)

    def append(
        self,
        session_or_connection: Session | Connection,
        event: AuditEvent,
        nonce: Nonce | None = None,
    ) -> int:
        """Append ``event`` in the caller's transaction and return its seq. Nothing is kept
        if that transaction rolls back. Raises Unavailable if the database refuses, and
        Unauthenticated if ``nonce`` (inserted in the same transaction) was already used."""
        return self.append_many(session_or_connection, [event], nonce)[0]

    def append_many(
        self,
        session_or_connection: Session | Connection,
        events: Iterable[AuditEvent],
        nonce: Nonce | None = None,
    ) -> list[int]:
        """Append several events in the caller's transaction (one INSERT); their seqs."""
        if nonce is not None:
            conn = (
                session_or_connection.connection()
                if isinstance(session_or_connection, Session)
                else session_or_connection
            )
            self._insert_nonces(conn, [nonce], replay_raises=True)
        seqs = self._insert(session_or_connection, [self._own(event) for event in events])
        self._count(session_or_connection, seqs)
        return seqs

    def _count(self, target: Session | Connection | None, seqs: list[int]) -> None:
        """Wake the checkpoint thread once ``checkpoint_every`` events are committed."""
        if not seqs or seqs[-1] - self._last_checkpoint < self._every:
            return
        if isinstance(target, Session):  # after the caller's commit, which a checkpoint reads
            listen(target, "after_commit", lambda _: self._due.set(), once=True)
        else:
            self._due.set()

    def _insert(self, target: Session | Connection, owned: list[AuditEvent]) -> list[int]:
        if not owned:
            return []
        try:
            conn = target.connection() if isinstance(target, Session) else target
            first = self._next_seq(conn)
            rows: list[tuple[object, ...]] = []
            for offset, event in enumerate(owned):
                seq = first + offset
                data = event.canonical_bytes()
                rows.append(
                    (
                        seq,
                        data.decode("utf-8"),
                        event_leaf_hash(seq, data),
                        event.event_date_time,
                        event.participant_object_patient_ins,
                        event.request_id,
                    )
                )
            self._insert_rows(conn, rows)
        except SQLAlchemyError as exc:
            raise audit_failure(exc, f"audit append to {self.source_id}") from exc
        return list(range(first, first + len(owned)))

    def _insert_rows(self, conn: Connection, rows: list[tuple[object, ...]]) -> None:
        """The events' rows, one driver statement per `_ROWS_PER_INSERT`."""
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            params = tuple(value for row in chunk for value in row)
            conn.exec_driver_sql(self._insert_sql(conn, len(chunk)), params)

    def _insert_sql(self, conn: Connection, count: int) -> str:
        """`INSERT ... VALUES` of `count` events in the driver's own parameter style, made
        once a count: it runs on every read, and SQLAlchemy's compilation of an INSERT (and
        its executemany) costs about what the insert does."""
        sql = self._sql.get(count)
        if sql is None:
            sql = self._sql[count] = rows_insert_sql(conn, self._events.name, _EVENT_COLUMNS, count)
        return sql

    def _next_seq(self, conn: Connection) -> int:
        if conn.dialect.name == "postgresql":
            # Held until the caller's transaction ends: the next appender reads our seq.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
        last = conn.exec_driver_sql(self._max_seq_sql).scalar()
        return int(last or 0) + 1

    def record(self, event: AuditEvent, nonce: Nonce | None = None) -> int:
        """Append ``event`` in a transaction of its own, committed before this returns.
        Raises ``Unavailable("audit trail unavailable: ...")`` when it cannot be written
        (``ResourceExhausted`` on a full disk): the caller must then not serve the data.
        With ``nonce`` (a call's assertion nonce only reserved so far) the nonce is inserted
        in the same transaction, and a nonce already stored fails the call (Unauthenticated)
        without its event: a read pays one durable commit for both.

        Concurrent callers share commits (group commit): one thread writes every event
        waiting at that moment in one transaction, so a busy service pays one durable
        commit for many reads instead of one each."""
        return self._commits.submit((self._own(event), nonce))

    def start_record(self, event: AuditEvent, nonce: Nonce | None = None) -> Pending[int]:
        """record() without waiting: the commit starts now, ``result()`` waits for it (so
        that a caller's own work overlaps the flush; it answers only after result())."""
        return self._commits.start((self._own(event), nonce))

    def record_many(self, events: Sequence[AuditEvent], nonce: Nonce | None = None) -> list[int]:
        """Append several events in one transaction of their own, committed on return."""
        try:
            with self._writer.begin() as conn:
                if nonce is not None:
                    self._insert_nonces(conn, [nonce], replay_raises=True)
                seqs = self._insert(conn, [self._own(event) for event in events])
        except SQLAlchemyError as exc:
            raise audit_failure(exc, f"audit record in {self.source_id}") from exc
        self._count(None, seqs)
        return seqs

    def store_nonce(self, nonce: Nonce) -> None:
        """Insert a reserved nonce on its own (a call that ended without its audit commit:
        a refusal, a failure), so that it stays refused after a restart. Errors are logged."""
        if self._nonces is None:
            return
        try:
            self._nonces.first_time(nonce[0], nonce[1], 0)
        except DmpError as exc:
            log.error("an assertion nonce could not be stored: %s", exc.message)

    def _insert_nonces(
        self, conn: Connection, nonces: Sequence[Nonce], *, replay_raises: bool = False
    ) -> set[bytes]:
        if self._nonces is None:
            raise FailedPrecondition(f"the audit log of {self.source_id} keeps no nonces")
        fresh = self._nonces.insert_in(conn, nonces)
        if replay_raises and len(fresh) < len({n for n, _ in nonces}):
            raise replayed()
        return fresh

    def _commit_batch(self, items: Sequence[_Item]) -> list[int | BaseException]:
        """Write one batch of waiting events in one transaction (group commit), with the
        nonces they carry; an event whose nonce was already stored is not written, and its
        caller is refused."""
        outcomes: list[int | BaseException | None] = [None] * len(items)
        conn = self._kept.take()
        try:
            with conn.begin():
                nonces = [nonce for _, nonce in items if nonce is not None]
                fresh = self._insert_nonces(conn, nonces) if nonces else set()
                kept: list[AuditEvent] = []
                for index, (event, nonce) in enumerate(items):
                    if nonce is not None:
                        if nonce[0] not in fresh:
                            outcomes[index] = replayed()
                            continue
                        fresh.discard(nonce[0])  # a second item of the same nonce is a replay
                    kept.append(event)
                seqs = self._insert(conn, kept)
        except SQLAlchemyError as exc:
            self._kept.discard(conn)
            return [audit_failure(exc, f"audit record in {self.source_id}")] * len(items)
        except DmpError as exc:
            self._kept.discard(conn)
            return [exc] * len(items)
        except BaseException:
            self._kept.discard(conn)
            raise
        self._kept.keep(conn)
        self._count(None, seqs)
        it = iter(seqs)
        return [next(it) if outcome is None else outcome for outcome in outcomes]

    def _failure(self, exc: Exception) -> BaseException:
        return audit_failure(exc, f"audit record in {self.source_id}")

    # -- reading

    def events_for_patient(
        self,
        ins: str,
        *,
        since_us: int | None = None,
        limit: int = 100,
        before_seq: int | None = None,
    ) -> list[LoggedEvent]:
        """The events about patient ``ins`` (as stored: pass the normalized INS), newest
        first; page on with ``before_seq`` = the seq of the last one returned."""
        if not 1 <= limit <= 10_000:
            raise ValueError("limit must be between 1 and 10000")
        t = self._events
        query = select(t.c.seq, t.c.event_json, t.c.leaf_hash).where(
            t.c.participant_object_patient_ins == ins
        )
        if since_us is not None:
            query = query.where(t.c.event_date_time >= since_us)
        if before_seq is not None:
            query = query.where(t.c.seq < before_seq)
        query = query.order_by(t.c.seq.desc()).limit(limit)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        found: list[LoggedEvent] = []
        for seq, event_json, leaf in rows:
            hash_ok = event_leaf_hash(seq, event_json.encode("utf-8")) == bytes(leaf)
            try:
                event = AuditEvent.from_json(event_json)
            except (ValueError, TypeError):
                # Only a tampered row reads so: say so, and keep serving the others.
                log.error(
                    "audit event %d of %s is not a valid event: run `dmp audit verify`",
                    seq,
                    self.source_id,
                )
                continue
            found.append(LoggedEvent(seq=seq, event=event, hash_ok=hash_ok))
        return found

    def size(self) -> int:
        """How many events the log holds (its largest seq)."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.max(self._events.c.seq))).scalar() or 0)

    # -- checkpoints

    def checkpoint(self) -> Checkpoint | None:
        """Sign and store the current tree head; None if no event was added since the
        last checkpoint (or another process just signed the same size). Raises DataLoss if
        the log has a gap (a deleted event): it is then not signed again until verified."""
        signer = self._signer
        if signer is None:
            raise FailedPrecondition(f"the audit log of {self.source_id} has no signing key")
        with self._tree_lock:
            self._catch_up()
            size = self._tree.size
            if size == 0 or size <= self._last_checkpoint:
                return None
            checkpoint = sign_checkpoint(signer, size, self._tree.root(), source_id=self.source_id)
            try:
                with self._writer.begin() as conn:
                    conn.execute(
                        insert(self._checkpoints).values(
                            tree_size=checkpoint.tree_size,
                            root_hash=checkpoint.root_hash,
                            signed_at_us=checkpoint.signed_at_us,
                            signature=checkpoint.signature,
                            signer_cert_pem=checkpoint.signer_cert_pem.decode("ascii"),
                        )
                    )
            except IntegrityError:
                log.info("audit checkpoint at %d already signed by another process", size)
                self._last_checkpoint = size
                return None
            self._last_checkpoint = size
        log.info(
            "audit checkpoint of %s: %d events, root %s",
            self.source_id,
            size,
            checkpoint.root_hash.hex(),
        )
        for listener in self.on_checkpoint:
            listener(checkpoint)
        return checkpoint

    def _catch_up(self) -> None:
        """Add to the tree the events committed since it was last advanced (all of them the
        first time: one pass over the leaf hashes), checking the root against the latest
        checkpoint stored when the tree reaches its size."""
        t, c = self._events, self._checkpoints
        tree = self._tree
        with self._engine.connect() as conn:
            latest = conn.execute(
                select(c.c.tree_size, c.c.root_hash).order_by(c.c.tree_size.desc()).limit(1)
            ).first()
            latest_size = int(latest[0]) if latest is not None else 0
            latest_root = bytes(latest[1]) if latest is not None else b""
            self._last_checkpoint = max(self._last_checkpoint, latest_size)
            rows = conn.execution_options(yield_per=10_000).execute(
                select(t.c.seq, t.c.leaf_hash).where(t.c.seq > tree.size).order_by(t.c.seq)
            )
            for seq, leaf in rows:
                if seq != tree.size + 1:
                    raise DataLoss(
                        f"the audit log of {self.source_id} has no event {tree.size + 1}"
                        f" (next is {seq}): it was tampered with; run `dmp audit verify`"
                    )
                tree.append(bytes(leaf))
                if tree.size == latest_size and tree.root() != latest_root:
                    log.error(
                        "audit log of %s: events 1..%d no longer match their signed"
                        " checkpoint; run `dmp audit verify`",
                        self.source_id,
                        latest_size,
                    )

    def start(self) -> None:
        """Take a checkpoint every ``checkpoint_interval`` seconds in a daemon thread."""
        if self._signer is None:
            raise FailedPrecondition(f"the audit log of {self.source_id} has no signing key")
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"audit-checkpoint {self.source_id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._due.wait(self._interval)
            self._due.clear()
            if self._stop.is_set():
                return
            try:
                self.checkpoint()
            except Exception:
                log.exception("audit checkpoint of %s failed", self.source_id)

    def close(self) -> Checkpoint | None:
        """Stop the checkpoint thread, sign a last checkpoint (errors are logged) and return
        the group commit's kept connection to the pool."""
        self._stop.set()
        self._due.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        try:
            if self._signer is None:
                return None
            try:
                return self.checkpoint()
            except Exception:
                log.exception("final audit checkpoint of %s failed", self.source_id)
                return None
        finally:
            self._kept.close()  # the group commit's connection, before the pool closes

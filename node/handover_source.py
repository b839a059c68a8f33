"""The predecessor's side of a hand-over: the HandoverService the successor pulls from.

Only the successor whose certificate the operator pinned (`dmp node handover start --to`)
may call it: the peer certificate of the mutual-TLS channel must be that one, byte for
byte. Everything is sealed to that certificate (node/handover_rows.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from cryptography import x509
from sqlalchemy import Engine, Table, delete, func, select

from dmp.certificates import certificate_sha256
from dmp.credentials import Credentials
from dmp.db import writer
from dmp.errors import DmpError, FailedPrecondition, InvalidArgument, PermissionDenied
from dmp.failures import public_failure
from dmp.server import CallContext
from dmp.signing import Signer, signed_by
from dmp.v1 import handover_pb2 as pb
from dmp.v1 import handover_pb2_grpc
from node.backup import snapshot_connection
from node.handover_rows import (
    BatchWriter,
    Unwrapper,
    changed_rows,
    rows_digest,
    snapshot_batches,
)
from node.handover_state import (
    FREEZING,
    FROZEN,
    HANDED_OVER,
    PREDECESSOR,
    STREAMING,
    Handover,
    move,
    read,
    statement,
)
from node.keys import Sealer
from node.models import HandoverChangeRow

log = logging.getLogger("dmp.node.handover")

_CHANGES: Table = HandoverChangeRow.__table__  # type: ignore[assignment]
#: How long a pull waits for a change when there is none (the successor pulls again).
_WAIT = 0.25
_DEFAULT_ROWS = 2000
_ACK_SLICE = 1000
_R = TypeVar("_R")
_T = TypeVar("_T")


def _unaudited(method: Callable[..., _R]) -> Callable[..., _R]:
    """A failure that is not a domain error, answered as dmp/failures.py says (logged
    there under a reference) but not audited by the server: after the freeze an event
    past the final sequence would keep the successor from ever matching this node."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> _R:
        try:
            return method(*args, **kwargs)
        except (DmpError, grpc.RpcError):
            raise
        except Exception as exc:
            raise public_failure(exc, f"HandoverService/{method.__name__}") from None

    return call


def _unaudited_stream(method: Callable[..., Iterator[_T]]) -> Callable[..., Iterator[_T]]:
    """`_unaudited` for a method that answers a stream."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Iterator[_T]:
        try:
            yield from method(*args, **kwargs)
        except (DmpError, grpc.RpcError):
            raise
        except Exception as exc:
            raise public_failure(exc, f"HandoverService/{method.__name__}") from None

    return call


class HandoverSource(handover_pb2_grpc.HandoverServiceServicer):
    def __init__(self, engine: Engine, credentials: Credentials, sealer: Sealer | None) -> None:
        self._engine = engine
        self._credentials = credentials
        self._region = credentials.principal.key
        self._signer = Signer(credentials)
        self._keys = Unwrapper(sealer.unwrap_key if sealer is not None else None)
        self._confirm = threading.Lock()
        self._digest_lock = threading.Lock()
        self._digest: tuple[tuple[int, int, int], str] | None = None

    def _handover(self, context: CallContext) -> tuple[Handover, x509.Certificate]:
        """The running hand-over, once the caller is its successor."""
        handover = read(self._engine)
        if handover is None or handover.role != PREDECESSOR:
            raise FailedPrecondition(
                f"node {self._region} is not handing its region over: its operator starts"
                " with `dmp node handover start --to SUCCESSOR.pem`",
                reason="NO_HANDOVER",
            )
        pems = context.auth_context().get("x509_pem_cert") or [b""]
        if certificate_sha256(pems[0]) != certificate_sha256(handover.peer_cert_pem):
            raise PermissionDenied(
                f"{context.principal.uri} is not the successor this node's operator named:"
                " only the certificate given to `dmp node handover start --to` may take over",
                reason="NOT_THE_SUCCESSOR",
            )
        if context.principal.uri != f"urn:dmp:node:{self._region}":
            # A pin of another region's node (`start --region` naming the wrong region on
            # a host that runs several) must not open this region's data to it.
            raise PermissionDenied(
                f"{context.principal.uri} is not a node of region {self._region}: a region"
                " is handed over only to a node of the same region",
                reason="NOT_THE_SUCCESSOR",
            )
        return handover, x509.load_pem_x509_certificate(handover.peer_cert_pem.encode())

    def _batch(self, successor: x509.Certificate) -> BatchWriter:
        return BatchWriter(successor, f"node-{self._region} successor", self._keys)

    def _note_address(self, handover: Handover, address: str) -> None:
        if address and address != handover.peer_address:
            move(self._engine, {STREAMING, FREEZING, FROZEN}, peer_address=address[:300])

    @_unaudited_stream
    def StreamSnapshot(
        self, request: pb.StreamSnapshotRequest, context: CallContext
    ) -> Iterator[pb.StreamSnapshotResponse]:
        handover, successor = self._handover(context)
        if handover.state == HANDED_OVER:
            raise FailedPrecondition("this region is already handed over", reason="REGION_MOVED")
        self._note_address(handover, request.successor_address)
        log.info("hand-over: streaming a snapshot to %s", context.principal.uri)
        sent = 0
        with snapshot_connection(self._engine) as conn, conn.begin():
            for batch in snapshot_batches(conn, lambda: self._batch(successor)):
                sent += batch.rows
                yield pb.StreamSnapshotResponse(
                    batch=pb.HandoverBatch(sealed=batch.seal(), rows=batch.rows)
                )
        move(self._engine, {STREAMING, FREEZING, FROZEN}, snapshot_done=True)
        log.info("hand-over: snapshot of %d rows sent", sent)

    @_unaudited
    def PullChanges(
        self, request: pb.PullChangesRequest, context: CallContext
    ) -> pb.PullChangesResponse:
        handover, successor = self._handover(context)
        self._note_address(handover, request.successor_address)
        if request.applied:
            applied = list(request.applied)
            with writer(self._engine).begin() as conn:
                # In slices: a statement binds a bounded number of values (SQLite,
                # PostgreSQL), and a call failing after the freeze is audited, past the
                # final sequence the successor must match.
                for start in range(0, len(applied), _ACK_SLICE):
                    slice_ = applied[start : start + _ACK_SLICE]
                    conn.execute(delete(_CHANGES).where(_CHANGES.c.seq.in_(slice_)))
        limit = min(max(request.max_rows or _DEFAULT_ROWS, 1), 10_000)
        waited = False
        while True:
            with self._engine.connect() as conn:
                changes = [
                    (int(seq), str(tbl), str(pk))
                    for seq, tbl, pk in conn.execute(
                        select(_CHANGES.c.seq, _CHANGES.c.tbl, _CHANGES.c.pk)
                        .order_by(_CHANGES.c.seq)
                        .limit(limit)
                    )
                ]
                pending = int(conn.execute(select(func.count()).select_from(_CHANGES)).scalar_one())
                if changes:
                    batch = self._batch(successor)
                    carried = changed_rows(conn, changes, batch)
                    return pb.PullChangesResponse(
                        batch=pb.HandoverBatch(sealed=batch.seal(), rows=batch.rows),
                        changes=carried,
                        pending=pending - len(carried),
                    )
            handover = read(self._engine) or handover
            if handover.state in (FROZEN, HANDED_OVER):
                if handover.state == FROZEN and not self._digest_lock.locked():
                    # Hashed while the successor hashes its own copy (ConfirmHandover).
                    threading.Thread(target=self._hash_ahead, args=(handover,), daemon=True).start()
                return pb.PullChangesResponse(
                    complete=True,
                    final_record_seq=handover.final_record_seq or 0,
                    final_audit_seq=handover.final_audit_seq or 0,
                    final_root_hash=handover.final_root_hash or b"",
                    predecessor_certificate=self._credentials.cert_pem,
                )
            if waited or not context.is_active():
                return pb.PullChangesResponse()
            time.sleep(_WAIT)
            waited = True

    def _hash_ahead(self, handover: Handover) -> None:
        try:
            self._rows_digest(handover)
        except Exception:  # ConfirmHandover hashes again, and says why it cannot
            log.exception("hand-over: hashing the rows handed over failed")

    def _rows_digest(self, handover: Handover) -> str:
        """The digest of every row handed over, once per freeze (nothing changes them
        then; a successor that retries its confirmation does not wait for it again)."""
        key = (handover.started_us, handover.final_record_seq or 0, handover.final_audit_seq or 0)
        with self._digest_lock:
            if self._digest is None or self._digest[0] != key:
                with snapshot_connection(self._engine) as conn, conn.begin():
                    self._digest = (key, rows_digest(conn))
            return self._digest[1]

    @_unaudited
    def ConfirmHandover(
        self, request: pb.ConfirmHandoverRequest, context: CallContext
    ) -> pb.ConfirmHandoverResponse:
        handover, successor = self._handover(context)
        answer = pb.ConfirmHandoverResponse(predecessor_certificate=self._credentials.cert_pem)
        with self._confirm:
            handover = read(self._engine) or handover
            if handover.state == HANDED_OVER:
                # Only the successor database that won may hear the countersignature
                # again (it died before taking charge): another database of the same
                # certificate, holding the same statement, must not take charge too.
                if (
                    handover.statement is not None
                    and handover.statement.encode() == request.statement
                    and handover.successor_signature == request.successor_signature
                ):
                    answer.predecessor_signature = handover.predecessor_signature or b""
                    return answer
                raise FailedPrecondition(
                    "this region was handed over with another statement", reason="REGION_MOVED"
                )
            if handover.state != FROZEN or handover.final_record_seq is None:
                raise FailedPrecondition(
                    "this node still accepts writes: its operator ends the hand-over with"
                    " `dmp node handover complete`; pull the changes until they are complete",
                    reason="HANDOVER_NOT_FROZEN",
                )
            rows = self._rows_digest(handover)
            expected = statement(
                self._region,
                self._credentials.cert_pem,
                handover.peer_cert_pem,
                handover.final_record_seq,
                handover.final_audit_seq or 0,
                handover.final_root_hash or b"",
                rows,
            )
            if request.statement != expected:
                raise InvalidArgument(
                    "the statement does not match this node's final state: the successor does"
                    " not hold exactly this node's rows, last record and audit sequence"
                    f" (expected {expected.decode()})",
                    reason="HANDOVER_MISMATCH",
                )
            if not signed_by(successor, expected, request.successor_signature):
                raise InvalidArgument(
                    "the successor's signature of the statement does not verify",
                    reason="HANDOVER_BAD_SIGNATURE",
                )
            signature = self._signer.sign(expected)
            done = move(
                self._engine,
                {FROZEN},
                state=HANDED_OVER,
                statement=expected.decode(),
                predecessor_signature=signature,
                successor_signature=request.successor_signature,
            )
            if not done:
                raise FailedPrecondition(
                    "the hand-over was aborted by this node's operator", reason="HANDOVER_ABORTED"
                )
        log.warning(
            "region %s handed over to %s at record %d, audit %d: this node serves it no more",
            self._region,
            handover.peer_address or context.principal.uri,
            handover.final_record_seq,
            handover.final_audit_seq or 0,
        )
        answer.predecessor_signature = signature
        return answer

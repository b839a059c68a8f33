"""The successor's side of a hand-over: take the region over from its predecessor.

`receive` pulls the predecessor's snapshot, then its changes as they come, applying each
batch in one transaction of the successor's own database (its data keys wrapped with the
successor's KEK), until the predecessor says it stopped accepting writes and nothing is
left. It then checks that it holds exactly the predecessor's last record and audit
sequence, with the same audit root, signs the hand-over statement, has the predecessor
countersign it (which the predecessor records as the end of its service), and in one
transaction keeps the proof, appends the hand-over event to the audit log it continues,
and takes charge. Killed at any step, run again: it resumes from what its database holds
(a batch applied twice changes nothing). Until it is in charge the successor serves
nothing: never two nodes accepting writes for one region.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from cryptography import x509
from sqlalchemy import Engine, Table, func, insert, select
from sqlalchemy.engine import Connection

from dmp.audit.events import AuditEvent, EventType
from dmp.audit.log import AuditLog
from dmp.audit.merkle import MerkleFrontier
from dmp.certificates import certificate_sha256, issued_by
from dmp.credentials import Credentials
from dmp.db import writer
from dmp.envelope import KeyEncryptionKey
from dmp.errors import FailedPrecondition
from dmp.pki import certificate_from_pem, load_private_key, node_tls_name, principal_from_pem
from dmp.server import error_reason
from dmp.signing import Signer, signed_by
from dmp.tls import secure_channel
from dmp.v1 import handover_pb2 as pb
from dmp.v1 import handover_pb2_grpc
from node.handover_rows import Applier, handed_tables, rows_digest
from node.handover_state import (
    IN_CHARGE,
    RECEIVING,
    SUCCESSOR,
    begin,
    move,
    move_in,
    read,
    statement,
)
from node.models import HandoverProofRow, RecordRow, audit_checkpoints, audit_events
from node.restore import reset_sequences

log = logging.getLogger("dmp.node.handover")

Progress = Callable[[str, int], None]
#: Failures after which the successor tries again (the predecessor restarting, busy).
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_RETRY_SECONDS = 0.5
_PROOFS: Table = HandoverProofRow.__table__  # type: ignore[assignment]


@dataclass
class Received:
    region: str
    predecessor: str
    rows: int
    final_record_seq: int
    final_audit_seq: int
    seconds: float
    already: bool = False


class HandoverRefused(FailedPrecondition):
    """The predecessor refused or the hand-over cannot complete; the message says why."""


def _empty(engine: Engine) -> bool:
    with engine.connect() as conn:
        for table in (RecordRow.__table__, audit_events):
            if conn.execute(select(func.count()).select_from(table)).scalar():
                return False
    return True


def _reset_sequences(conn: Connection) -> None:
    """PostgreSQL: the key sequences past the keys received (the successor writes next)."""
    if conn.dialect.name == "postgresql":
        reset_sequences(conn, {t.name: t for t in handed_tables()})


def _audit_root(engine: Engine, size: int) -> tuple[int, bytes]:
    tree = MerkleFrontier()
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=10_000).execute(
            select(audit_events.c.seq, audit_events.c.leaf_hash)
            .where(audit_events.c.seq <= size)
            .order_by(audit_events.c.seq)
        )
        for seq, leaf in rows:
            if seq != tree.size + 1:
                break
            tree.append(bytes(leaf))
        last = int(conn.execute(select(func.max(audit_events.c.seq))).scalar() or 0)
    return last, tree.root() if tree.size == size and size else b""


def _check_predecessor(pem: bytes, ca: x509.Certificate, region: str) -> None:
    if not issued_by(certificate_from_pem(pem), ca):
        raise HandoverRefused("the predecessor's certificate is not issued by this federation's CA")
    who = principal_from_pem(pem)
    if who.uri != f"urn:dmp:node:{region}":
        raise HandoverRefused(f"the predecessor is {who.uri}, not the node of region {region}")


def receive(
    engine: Engine,
    credentials: Credentials,
    predecessor: str,
    *,
    kek: KeyEncryptionKey | None,
    advertise: str = "",
    progress: Progress | None = None,
    max_content: int = 64 << 20,
) -> Received:
    """Take region `credentials`' region over from the node at `predecessor`."""
    started = time.monotonic()
    region = credentials.principal.key
    handover = read(engine)
    if handover is None:
        if not _empty(engine):
            raise HandoverRefused(
                "this database already holds records or audit events: a successor receives"
                " into an empty database (a new --data-dir or --db-url)",
                reason="HANDOVER_NOT_EMPTY",
            )
        begin(engine, SUCCESSOR, RECEIVING, "", predecessor)
        handover = read(engine)
    assert handover is not None
    if handover.role != SUCCESSOR:
        raise HandoverRefused(
            f"this node is handing region {region} over itself: it cannot also receive it",
            reason="HANDOVER_EXISTS",
        )
    if handover.state == IN_CHARGE:
        with writer(engine).begin() as conn:
            _reset_sequences(conn)
        return Received(region, handover.peer_address, 0, 0, 0, 0.0, already=True)
    predecessor = predecessor or handover.peer_address
    ca = certificate_from_pem(credentials.ca_pem)
    channel = secure_channel(
        predecessor, credentials, max_content, server_name=node_tls_name(region)
    )
    stub = handover_pb2_grpc.HandoverServiceStub(channel)
    applier = Applier(load_private_key(credentials.key_pem), kek)
    rows = 0
    try:
        while True:
            try:
                more, answer = _pull(engine, stub, applier, advertise, progress, rows)
                rows += more
                proof = _confirm(engine, stub, credentials, ca, answer)
                break
            except grpc.RpcError as exc:
                if exc.code() not in _TRANSIENT:
                    raise HandoverRefused(
                        f"the predecessor at {predecessor} answered {exc.code().name}:"
                        f" {exc.details()}",
                        reason=error_reason(exc) or "HANDOVER_REFUSED",
                    ) from None
                log.warning(
                    "hand-over: the predecessor at %s is not reachable (%s): retrying",
                    predecessor,
                    exc.code().name,
                )
                time.sleep(_RETRY_SECONDS)
    finally:
        channel.close()
    _take_charge(engine, credentials, answer, proof)
    log.warning(
        "hand-over: region %s taken over from %s at record %d, audit %d",
        region,
        predecessor,
        answer.final_record_seq,
        answer.final_audit_seq,
    )
    return Received(
        region,
        predecessor,
        rows,
        answer.final_record_seq,
        answer.final_audit_seq,
        time.monotonic() - started,
    )


def _pull(
    engine: Engine,
    stub: handover_pb2_grpc.HandoverServiceStub,
    applier: Applier,
    advertise: str,
    progress: Progress | None,
    before: int,
) -> tuple[int, pb.PullChangesResponse]:
    """The snapshot (unless taken), then the changes until the predecessor froze and
    none is left; the rows applied and the final answer. A rerun resumes."""
    rows = 0
    handover = read(engine)
    assert handover is not None
    if not handover.snapshot_done:
        for part in stub.StreamSnapshot(pb.StreamSnapshotRequest(successor_address=advertise)):
            with writer(engine).begin() as conn:
                rows += applier.apply(conn, part.batch.sealed)
            if progress:
                progress("snapshot", before + rows)
        move(engine, {RECEIVING}, snapshot_done=True)
    applied: list[int] = []
    while True:
        answer = stub.PullChanges(
            pb.PullChangesRequest(applied=applied, successor_address=advertise), timeout=60
        )
        applied = []
        if answer.batch.sealed:
            with writer(engine).begin() as conn:
                rows += applier.apply(conn, answer.batch.sealed)
            applied = list(answer.changes)
            if progress:
                progress("changes", before + rows)
        elif answer.complete:
            return rows, answer


def _confirm(
    engine: Engine,
    stub: handover_pb2_grpc.HandoverServiceStub,
    credentials: Credentials,
    ca: x509.Certificate,
    final: pb.PullChangesResponse,
) -> dict[str, object]:
    """Check the final state, sign the statement, have the predecessor countersign."""
    region = credentials.principal.key
    _check_predecessor(final.predecessor_certificate, ca, region)
    with engine.connect() as conn:
        record_seq = int(conn.execute(select(func.max(RecordRow.seq))).scalar() or 0)
    audit_seq, root = _audit_root(engine, final.final_audit_seq)
    if (record_seq, audit_seq, root) != (
        final.final_record_seq,
        final.final_audit_seq,
        final.final_root_hash,
    ):
        raise HandoverRefused(
            f"after the last change this node holds record {record_seq} and audit event"
            f" {audit_seq}, the predecessor {final.final_record_seq} and"
            f" {final.final_audit_seq} (or the audit roots differ): not taking charge",
            reason="HANDOVER_MISMATCH",
        )
    with engine.connect() as conn:
        rows = rows_digest(conn)
    text = statement(
        region,
        final.predecessor_certificate,
        credentials.cert_pem,
        record_seq,
        audit_seq,
        root,
        rows,
    )
    kept = read(engine)
    if kept is not None and kept.statement == text.decode() and kept.successor_signature:
        signature = kept.successor_signature  # the one the predecessor may have recorded
    else:
        signature = Signer(credentials).sign(text)
        move(engine, {RECEIVING}, statement=text.decode(), successor_signature=signature)
    answer = stub.ConfirmHandover(
        pb.ConfirmHandoverRequest(statement=text, successor_signature=signature), timeout=30
    )
    if not signed_by(
        certificate_from_pem(final.predecessor_certificate), text, answer.predecessor_signature
    ):
        raise HandoverRefused(
            "the predecessor's countersignature does not verify", reason="HANDOVER_BAD_SIGNATURE"
        )
    return {
        "statement_sha256": hashlib.sha256(text).hexdigest(),
        "statement": text.decode(),
        "predecessor_cert_pem": final.predecessor_certificate.decode("ascii"),
        "predecessor_signature": answer.predecessor_signature,
        "successor_cert_pem": credentials.cert_pem.decode("ascii"),
        "successor_signature": signature,
    }


def _take_charge(
    engine: Engine,
    credentials: Credentials,
    final: pb.PullChangesResponse,
    proof: dict[str, object],
) -> None:
    """Keep the proof, append the hand-over event, take charge: one transaction."""
    region = credentials.principal.key
    audit = AuditLog(
        engine,
        audit_events,
        audit_checkpoints,
        source_id=credentials.principal.uri,
        region=region,
    )
    event = AuditEvent(
        event_type=EventType.HANDOVER,
        active_participant_user_id=credentials.principal.uri,
        active_participant_role="node",
        detail=(
            f"statement {proof['statement_sha256']}: records 1..{final.final_record_seq}"
            f" and audit events 1..{final.final_audit_seq} from certificate"
            f" {certificate_sha256(final.predecessor_certificate)[:16]} to"
            f" {certificate_sha256(credentials.cert_pem)[:16]}, signed by both"
        ),
    )
    with writer(engine).begin() as conn:
        conn.execute(insert(_PROOFS).values(**proof))
        audit.append(conn, event)
        move_in(
            conn,
            {RECEIVING},
            state=IN_CHARGE,
            peer_cert_pem=str(proof["predecessor_cert_pem"]),
            final_record_seq=final.final_record_seq,
            final_audit_seq=final.final_audit_seq,
            final_root_hash=final.final_root_hash,
            predecessor_signature=proof["predecessor_signature"],
        )
        _reset_sequences(conn)

"""The audit tables each service defines on its own metadata."""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

_SeqType = BigInteger().with_variant(Integer(), "sqlite")
EVENTS_TABLE: Final = "audit_events"
CHECKPOINTS_TABLE: Final = "audit_checkpoints"


def audit_tables(metadata: MetaData) -> tuple[Table, Table]:
    """Define (once) ``audit_events`` and ``audit_checkpoints`` on ``metadata``.

    Each service calls it on its own metadata, so the tables live in its database and its
    migrations. ``seq`` is given by :meth:`AuditLog.append` (1, 2, 3... in commit order),
    not by the database. ``event_json`` and ``leaf_hash`` are the log; the other event
    columns are copies for queries, checked against the JSON by :func:`verify_log`.
    """
    if EVENTS_TABLE in metadata.tables and CHECKPOINTS_TABLE in metadata.tables:
        return metadata.tables[EVENTS_TABLE], metadata.tables[CHECKPOINTS_TABLE]
    events = Table(
        EVENTS_TABLE,
        metadata,
        Column("seq", _SeqType, primary_key=True, autoincrement=False),
        Column("event_json", Text, nullable=False),
        Column("leaf_hash", LargeBinary(32), nullable=False),
        Column("event_date_time", BigInteger, nullable=False),
        Column("participant_object_patient_ins", String(32), nullable=False),
        Column("request_id", String(64), nullable=False),
        Index("ix_audit_events_patient_seq", "participant_object_patient_ins", "seq"),
        Index("ix_audit_events_event_date_time", "event_date_time"),
        Index("ix_audit_events_request_id", "request_id"),
    )
    checkpoints = Table(
        CHECKPOINTS_TABLE,
        metadata,
        Column("tree_size", _SeqType, primary_key=True, autoincrement=False),
        Column("root_hash", LargeBinary(32), nullable=False),
        Column("signed_at_us", BigInteger, nullable=False),
        Column("signature", LargeBinary, nullable=False),
        Column("signer_cert_pem", Text, nullable=False),
    )
    return events, checkpoints

"""The node's tables: records (metadata), their contents, the locator outbox, and the
prescriptions it holds with their dispensings."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dmp.audit.tables import audit_tables
from dmp.audit.witness import witnessed_heads_table
from dmp.db import new_metadata
from dmp.nonces import nonce_table
from dmp.patients import TraitColumns

# SQLite gives an INTEGER PRIMARY KEY its rowid; BIGINT would not autoincrement there.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class NodeBase(DeclarativeBase):
    metadata = new_metadata()


class RecordRow(NodeBase):
    """One record's metadata. Never updated but for `status` when a new version supersedes it
    and `revealed_us` when its author reveals it, each time with its `row_hash`."""

    __tablename__ = "records"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    patient_ins: Mapped[str] = mapped_column(String(15))
    kind: Mapped[str] = mapped_column(String(20))
    type_system: Mapped[str] = mapped_column(String(200))
    type_code: Mapped[str] = mapped_column(String(64))
    type_display: Mapped[str] = mapped_column(String(200))
    title: Mapped[str] = mapped_column(String(500))
    author_identity: Mapped[str] = mapped_column(String(100))
    author_name: Mapped[str] = mapped_column(String(200))
    author_profession: Mapped[str] = mapped_column(String(40))
    organization: Mapped[str] = mapped_column(String(200))
    created_us: Mapped[int] = mapped_column(BigInteger)
    effective_us: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    supersedes: Mapped[str | None] = mapped_column(String(64))
    #: Id of the first version: a patient's mask of one version covers all of them.
    root_id: Mapped[str] = mapped_column(String(64), index=True)
    confidentiality: Mapped[str] = mapped_column(String(20))
    hidden_from_patient: Mapped[bool] = mapped_column(Boolean)
    #: When the author revealed a record hidden from the patient.
    revealed_us: Mapped[int | None] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # SHA-256 of what the writer sent (metadata and content): the idempotency check.
    fingerprint: Mapped[str] = mapped_column(String(64))
    #: SHA-256 of every column above but seq, checked on every read (node/integrity.py).
    row_hash: Mapped[str] = mapped_column(String(64))
    #: For a record written from e-prescription: the prescription it is, or dispenses
    #: (hashed when set, node/integrity.py OPTIONAL_COLUMNS).
    prescription_id: Mapped[str | None] = mapped_column(String(32))
    #: With encryption at rest: the free-text metadata (title, type display, organization,
    #: author name) sealed with the patient's data key, those columns then empty, and the
    #: content sealed too (node/sealing.py). Hashed when set.
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (Index(None, "patient_ins", "effective_us", "id"),)


class RecordContentRow(NodeBase):
    """A record's content, apart so that lists never load it."""

    __tablename__ = "record_contents"

    record_id: Mapped[str] = mapped_column(String(64), ForeignKey("records.id"), primary_key=True)
    content: Mapped[bytes] = mapped_column(LargeBinary)


class DataKeyRow(NodeBase):
    """A patient's data key, wrapped by the node's KEK named by `kek_id` (never in clear).
    Shredding empties `wrapped` and sets `shredded_us`: their records open no more."""

    __tablename__ = "data_keys"

    patient_ins: Mapped[str] = mapped_column(String(15), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(100))
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_us: Mapped[int] = mapped_column(BigInteger)
    shredded_us: Mapped[int | None] = mapped_column(BigInteger)


class OutboxRow(NodeBase):
    """A locator notification for the directory, written with the record it announces."""

    __tablename__ = "locator_outbox"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    patient_ins: Mapped[str] = mapped_column(String(15))
    created_us: Mapped[int] = mapped_column(BigInteger)


class PatientRow(TraitColumns, NodeBase):
    """Identity traits the writers gave for a patient, reported to the directory."""

    __tablename__ = "patients"

    ins: Mapped[str] = mapped_column(String(15), primary_key=True)
    #: With encryption at rest: the free-text traits (names, birthplace) sealed with the
    #: patient's data key and bound to their INS, those columns then empty (node/keys.py).
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary)


class PrescriptionRow(NodeBase):
    """A prescription this node holds (its id names this node's region): the signed act
    as its prescriber sent it, and its progress, which only a unit of work that locked
    the row changes, raising `version` each time (node/prescription_store.py)."""

    __tablename__ = "prescriptions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    patient_ins: Mapped[str] = mapped_column(String(15))
    prescriber_rpps: Mapped[str] = mapped_column(String(11))
    authored_us: Mapped[int] = mapped_column(BigInteger)
    #: The serialized SignedPrescription, exactly as received.
    signed: Mapped[bytes] = mapped_column(LargeBinary)
    #: SHA-256 of the signed Prescription bytes: a retry of the same act is recognized.
    payload_sha256: Mapped[str] = mapped_column(String(64))
    created_us: Mapped[int] = mapped_column(BigInteger)
    #: Raised by every change of the progress below (the conditional update's guard).
    version: Mapped[int] = mapped_column(Integer)
    dispensed: Mapped[int] = mapped_column(Integer)
    last_dispensed_us: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_us: Mapped[int | None] = mapped_column(BigInteger)
    cancel_reason: Mapped[str | None] = mapped_column(String(500))
    #: Who holds it (a pharmacist's federation identity), for which pharmacy, until when.
    holder: Mapped[str | None] = mapped_column(String(100))
    holder_pharmacy: Mapped[str | None] = mapped_column(String(200))
    held_until_us: Mapped[int | None] = mapped_column(BigInteger)
    #: With encryption at rest: the free text above (cancel reason, holder's pharmacy)
    #: sealed with the patient's data key and bound to id and version, those columns then
    #: empty (node/prescription_store.py).
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (Index(None, "patient_ins", "authored_us"),)


class DispensationRow(NodeBase):
    """One dispensing of a prescription. At most one per dispensing number and per
    idempotency key of a prescription: the database itself refuses a second."""

    __tablename__ = "dispensations"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    prescription_id: Mapped[str] = mapped_column(String(32), ForeignKey("prescriptions.id"))
    #: 0 for the first dispensing, n for renewal n.
    dispensing: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(64))
    pharmacist_identity: Mapped[str] = mapped_column(String(100))
    created_us: Mapped[int] = mapped_column(BigInteger)
    #: The serialized Dispensation, as recorded and answered.
    message: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (
        UniqueConstraint("prescription_id", "dispensing"),
        UniqueConstraint("prescription_id", "idempotency_key"),
    )


class HandoverRow(NodeBase):
    """This node's hand-over of its region (node/handover_state.py): one row, id 1, as the
    predecessor that streams to a successor or as the successor that receives."""

    __tablename__ = "handover"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: "predecessor" or "successor".
    role: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    #: The other node's certificate: pinned by the predecessor, learnt by the successor.
    peer_cert_pem: Mapped[str] = mapped_column(Text)
    #: Where the other node answers (the successor's advertised address, or the
    #: predecessor's to pull from).
    peer_address: Mapped[str] = mapped_column(String(300))
    snapshot_done: Mapped[bool] = mapped_column(Boolean)
    final_record_seq: Mapped[int | None] = mapped_column(BigInteger)
    final_audit_seq: Mapped[int | None] = mapped_column(BigInteger)
    final_root_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    #: The canonical JSON both nodes sign once the successor holds everything.
    statement: Mapped[str | None] = mapped_column(Text)
    predecessor_signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    successor_signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    started_us: Mapped[int] = mapped_column(BigInteger)
    updated_us: Mapped[int] = mapped_column(BigInteger)


class HandoverChangeRow(NodeBase):
    """The key of a row changed while a hand-over streams (written by triggers that exist
    only then), deleted once the successor has applied it."""

    __tablename__ = "handover_changes"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    tbl: Mapped[str] = mapped_column(String(64))
    #: JSON array of the row's primary key values (bytes as hex).
    pk: Mapped[str] = mapped_column(Text)


class HandoverProofRow(NodeBase):
    """A hand-over this region's data went through, signed by both nodes; its audit event
    holds `statement_sha256` (dmp audit verify checks both signatures)."""

    __tablename__ = "handover_proofs"

    statement_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    statement: Mapped[str] = mapped_column(Text)
    predecessor_cert_pem: Mapped[str] = mapped_column(Text)
    predecessor_signature: Mapped[bytes] = mapped_column(LargeBinary)
    successor_cert_pem: Mapped[str] = mapped_column(Text)
    successor_signature: Mapped[bytes] = mapped_column(LargeBinary)


#: The node's tamper-evident audit trail (dmp/audit/).
audit_events, audit_checkpoints = audit_tables(NodeBase.metadata)

#: Nonces of the access assertions already used, until they expire (dmp/nonces.py).
seen_nonces = nonce_table(NodeBase.metadata)
#: The directory's audit tree heads this node witnessed (dmp/audit/witness.py).
witnessed_heads = witnessed_heads_table(NodeBase.metadata)

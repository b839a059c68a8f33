"""The directory's tables: identities, fragment locations, conflicts kept for review, nodes.

No clinical content: the directory knows who a patient is and where their records are.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dmp.audit.tables import audit_tables
from dmp.audit.witness import witnessed_heads_table
from dmp.db import new_metadata
from dmp.nonces import nonce_table
from dmp.patients import TraitColumns

SeqType = BigInteger().with_variant(Integer(), "sqlite")


class DirectoryBase(DeclarativeBase):
    metadata = new_metadata()


class PatientRow(TraitColumns, DirectoryBase):
    """A patient's identity traits, keyed by INS (stored in comparable form)."""

    __tablename__ = "patients"

    ins: Mapped[str] = mapped_column(String(15), primary_key=True)
    created_us: Mapped[int] = mapped_column(BigInteger)


class FragmentRow(DirectoryBase):
    """Which region holds records of a patient, how many, and since when last updated."""

    __tablename__ = "fragments"

    ins: Mapped[str] = mapped_column(String(15), primary_key=True)
    region: Mapped[str] = mapped_column(String(2), primary_key=True)
    record_count: Mapped[int] = mapped_column(BigInteger)
    last_update_us: Mapped[int] = mapped_column(BigInteger)


class IdentityConflictRow(DirectoryBase):
    """A registration or node report refused because its traits contradict the index."""

    __tablename__ = "identity_conflicts"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    ins: Mapped[str] = mapped_column(String(15), index=True)
    proposed: Mapped[str] = mapped_column(Text)  # JSON of the proposed traits
    reported_by: Mapped[str] = mapped_column(String(100))
    created_us: Mapped[int] = mapped_column(BigInteger)


class NodeRow(DirectoryBase):
    """A node's announced address (embedded discovery)."""

    __tablename__ = "nodes"

    region: Mapped[str] = mapped_column(String(2), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    last_seen_us: Mapped[int] = mapped_column(BigInteger)


class DirectivesRow(DirectoryBase):
    """A patient's current directives, exactly as the patient signed them."""

    __tablename__ = "directives"

    ins: Mapped[str] = mapped_column(String(15), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger)
    signed: Mapped[bytes] = mapped_column(LargeBinary)
    updated_us: Mapped[int] = mapped_column(BigInteger)


#: The directory's tamper-evident audit trail (dmp/audit/).
audit_events, audit_checkpoints = audit_tables(DirectoryBase.metadata)

#: Nonces of the access assertions already used, until they expire (dmp/nonces.py).
seen_nonces = nonce_table(DirectoryBase.metadata)
#: The nodes' audit tree heads the directory witnessed (dmp/audit/witness.py).
witnessed_heads = witnessed_heads_table(DirectoryBase.metadata)

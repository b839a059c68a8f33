"""Witnessed audit heads: each service keeps the signed tree heads of another's audit log.

A checkpoint stored in a service's own database can be deleted or rewritten by whoever
hosts that database. So every node sends each new signed tree head (:class:`Checkpoint`)
to the directory, and the directory sends its own to the nodes; the witness checks the
signature against the federation CA, that the caller is the signer (its mTLS certificate),
and an RFC 6962 consistency proof from the previous head it keeps for that signer, then
stores the head with its own cosignature in ``witnessed_heads``. It refuses, with
FAILED_PRECONDITION, a head smaller than or inconsistent with one it holds: a log whose
tail was cut, or which was rewritten, can no longer be presented as the same log.

``dmp audit verify --witness`` (or ``--witnessed FILE``, from ``dmp audit witnessed
export``) then checks a log against those heads (dmp/audit/witness_check.py), and a node checks
itself against the latest one at start-up (dmp/audit/witness_client.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection

from dmp.audit.checkpoints import Checkpoint, verify_checkpoint
from dmp.audit.merkle_proofs import verify_consistency
from dmp.clock import from_us, now_us, to_us
from dmp.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from dmp.pki import Credentials, load_private_key, principal_from_certificate
from dmp.v1 import witness_pb2 as wpb

__all__ = [
    "WITNESSED_TABLE",
    "WitnessStore",
    "Witnessed",
    "cosign",
    "head_from_proto",
    "head_to_proto",
    "list_witnessed",
    "verify_cosignature",
    "witnessed_from_proto",
    "witnessed_heads_table",
    "witnessed_to_proto",
]

WITNESSED_TABLE: Final = "witnessed_heads"
COSIGNATURE_CONTEXT: Final = "dmp-audit-witness"
MAX_PROOF: Final = 64  # hashes: a proof has at most 2 log2(size) of them
_SizeType = BigInteger().with_variant(Integer(), "sqlite")


def witnessed_heads_table(metadata: MetaData) -> Table:
    """Define (once) ``witnessed_heads`` on a service's metadata: the heads of other
    services' audit logs it witnessed, one row per (signer, tree size)."""
    if WITNESSED_TABLE in metadata.tables:
        return metadata.tables[WITNESSED_TABLE]
    return Table(
        WITNESSED_TABLE,
        metadata,
        Column("signer", String(200), primary_key=True),
        Column("tree_size", _SizeType, primary_key=True, autoincrement=False),
        Column("root_hash", LargeBinary(32), nullable=False),
        Column("signed_at_us", BigInteger, nullable=False),
        Column("signature", LargeBinary, nullable=False),
        Column("signer_cert_pem", Text, nullable=False),
        Column("witnessed_at_us", BigInteger, nullable=False),
        Column("witness", String(200), nullable=False),
        Column("witness_signature", LargeBinary, nullable=False),
        Column("witness_cert_pem", Text, nullable=False),
    )


@dataclass(frozen=True)
class Witnessed:
    """A signed tree head as a witness keeps it, with the witness's cosignature."""

    head: Checkpoint
    witness: str
    witnessed_at_us: int
    witness_signature: bytes
    witness_cert_pem: bytes

    def message(self) -> bytes:
        return cosignature_message(self.witness, self.head, self.witnessed_at_us)


def cosignature_message(witness: str, head: Checkpoint, witnessed_at_us: int) -> bytes:
    """The bytes a witness signs: its identity, the head's own message, and when."""
    return f"{COSIGNATURE_CONTEXT}\n{witness}\n".encode() + (
        head.message() + f"\n{witnessed_at_us}".encode()
    )


def cosign(witness: Credentials, head: Checkpoint, at_us: int | None = None) -> Witnessed:
    at = at_us if at_us is not None else now_us()
    me = witness.principal.uri
    key = load_private_key(witness.key_pem)
    signature = key.sign(cosignature_message(me, head, at), ec.ECDSA(hashes.SHA256()))
    return Witnessed(head, me, at, signature, witness.cert_pem)


def verify_cosignature(witnessed: Witnessed, ca_cert: x509.Certificate) -> str:
    """Why ``witnessed`` is not a valid cosignature by a federation service other than the
    head's signer, or "" if it is."""
    try:
        cert = x509.load_pem_x509_certificate(witnessed.witness_cert_pem)
        cert.verify_directly_issued_by(ca_cert)
        principal = principal_from_certificate(cert)
    except (ValueError, TypeError, InvalidSignature):
        return "the witness certificate was not issued by the federation CA"
    except Unauthenticated as exc:
        return f"the witness certificate names no federation identity ({exc.message})"
    if principal.uri != witnessed.witness:
        return f"cosigned by {principal.uri}, not by the witness it names ({witnessed.witness})"
    if principal.uri == witnessed.head.source_id:
        return "witnessed by its own signer"
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return "the witness certificate holds no ECDSA key"
    try:
        key.verify(witnessed.witness_signature, witnessed.message(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return "the witness's signature does not verify"
    return ""


# --------------------------------------------------------------------------- protobuf


def head_to_proto(head: Checkpoint) -> wpb.SignedTreeHead:
    return wpb.SignedTreeHead(
        signer=head.source_id,
        tree_size=head.tree_size,
        root_hash=head.root_hash,
        signed_at=from_us(head.signed_at_us),
        signature=head.signature,
        signer_certificate=head.signer_cert_pem,
    )


def head_from_proto(head: wpb.SignedTreeHead) -> Checkpoint:
    if head.tree_size <= 0:
        raise InvalidArgument("head.tree_size must be positive")
    if len(head.root_hash) != 32:
        raise InvalidArgument("head.root_hash must be 32 bytes (SHA-256)")
    return Checkpoint(
        head.signer,
        head.tree_size,
        bytes(head.root_hash),
        to_us(head.signed_at),
        bytes(head.signature),
        bytes(head.signer_certificate),
    )


def witnessed_to_proto(witnessed: Witnessed) -> wpb.WitnessedTreeHead:
    return wpb.WitnessedTreeHead(
        head=head_to_proto(witnessed.head),
        witnessed_at=from_us(witnessed.witnessed_at_us),
        witness=witnessed.witness,
        witness_signature=witnessed.witness_signature,
        witness_certificate=witnessed.witness_cert_pem,
    )


def witnessed_from_proto(witnessed: wpb.WitnessedTreeHead) -> Witnessed:
    return Witnessed(
        head_from_proto(witnessed.head),
        witnessed.witness,
        to_us(witnessed.witnessed_at),
        bytes(witnessed.witness_signature),
        bytes(witnessed.witness_certificate),
    )


# --------------------------------------------------------------------------- the store


def iso_us(us: int) -> str:
    """An instant in µs as ISO 8601 UTC, to the second (for messages)."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(head: Checkpoint) -> str:
    return f"the head of {head.tree_size} events signed at {iso_us(head.signed_at_us)}"


class WitnessStore:
    """The heads a service witnessed, in its own database."""

    def __init__(
        self, engine: Engine, table: Table, credentials: Credentials, ca_cert: x509.Certificate
    ) -> None:
        self._engine = engine
        self._table = table
        self._credentials = credentials
        self._ca = ca_cert

    def check(self, head: Checkpoint, proof: Sequence[bytes]) -> None:
        """A head and proof well formed, the head signed by its signer's certificate."""
        if len(proof) > MAX_PROOF or any(len(h) != 32 for h in proof):
            raise InvalidArgument("consistency_proof holds at most 64 hashes of 32 bytes")
        why = verify_checkpoint(head, self._ca)
        if why:
            raise InvalidArgument(f"the tree head does not verify: {why}")

    def accept(
        self, conn: Connection, head: Checkpoint, proof_from: int, proof: Sequence[bytes]
    ) -> tuple[Witnessed, bool]:
        """Keep ``head`` (checked) in the caller's transaction if it extends the latest head
        held for its signer, as ``proof`` shows; return the latest head and whether it was
        already held."""
        if conn.dialect.name == "postgresql":  # one head of a signer at a time
            key = int.from_bytes(
                hashlib.sha256(f"dmp-witness:{head.source_id}".encode()).digest()[:8],
                "big",
                signed=True,
            )
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        latest = self._latest(conn, head.source_id)
        same = self._at(conn, head.source_id, head.tree_size)
        if same is not None:
            if same.head.root_hash != head.root_hash:
                raise FailedPrecondition(
                    f"{_describe(head)} is not the one witnessed at that size for"
                    f" {head.source_id} ({_describe(same.head)}, another root): the log"
                    " was rewritten",
                    reason="INCONSISTENT_TREE_HEAD",
                )
            assert latest is not None
            return latest, True
        if latest is not None:
            self._check_extends(latest.head, head, proof_from, proof)
        witnessed = cosign(self._credentials, head)
        conn.execute(insert(self._table).values(**_row(witnessed)))
        return witnessed, False

    def _check_extends(
        self, latest: Checkpoint, head: Checkpoint, proof_from: int, proof: Sequence[bytes]
    ) -> None:
        signer = head.source_id
        if head.tree_size < latest.tree_size:
            raise FailedPrecondition(
                f"{_describe(head)} is smaller than {_describe(latest)}, already witnessed"
                f" for {signer}: an audit log never shrinks",
                reason="SMALLER_TREE_HEAD",
            )
        if proof_from != latest.tree_size:
            raise FailedPrecondition(
                f"the consistency proof starts from {proof_from} events, but the latest head"
                f" witnessed for {signer} has {latest.tree_size}: send a proof from"
                f" {latest.tree_size}",
                reason="STALE_PROOF",
            )
        if not verify_consistency(
            latest.tree_size, head.tree_size, latest.root_hash, head.root_hash, proof
        ):
            raise FailedPrecondition(
                f"{_describe(head)} is not consistent with {_describe(latest)}, witnessed for"
                f" {signer}: the first {latest.tree_size} events were changed, removed or"
                " reordered",
                reason="INCONSISTENT_TREE_HEAD",
            )

    def latest(self, signer: str) -> Witnessed | None:
        with self._engine.connect() as conn:
            return self._latest(conn, signer)

    def list(self, signer: str, after: int = 0, limit: int = 1000) -> list[Witnessed]:
        return list_witnessed(self._engine, self._table, signer, after, limit)

    def _latest(self, conn: Connection, signer: str) -> Witnessed | None:
        t = self._table
        row = conn.execute(
            select(t).where(t.c.signer == signer).order_by(t.c.tree_size.desc()).limit(1)
        ).first()
        return _witnessed(row) if row is not None else None

    def _at(self, conn: Connection, signer: str, size: int) -> Witnessed | None:
        t = self._table
        row = conn.execute(select(t).where(t.c.signer == signer, t.c.tree_size == size)).first()
        return _witnessed(row) if row is not None else None


def list_witnessed(
    engine: Engine, table: Table, signer: str, after: int = 0, limit: int = 1000
) -> list[Witnessed]:
    """The heads witnessed for ``signer`` of more than ``after`` events, smallest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(table)
            .where(table.c.signer == signer, table.c.tree_size > after)
            .order_by(table.c.tree_size)
            .limit(limit)
        ).all()
    return [_witnessed(row) for row in rows]


def _row(witnessed: Witnessed) -> dict[str, object]:
    head = witnessed.head
    return {
        "signer": head.source_id,
        "tree_size": head.tree_size,
        "root_hash": head.root_hash,
        "signed_at_us": head.signed_at_us,
        "signature": head.signature,
        "signer_cert_pem": head.signer_cert_pem.decode("ascii"),
        "witnessed_at_us": witnessed.witnessed_at_us,
        "witness": witnessed.witness,
        "witness_signature": witnessed.witness_signature,
        "witness_cert_pem": witnessed.witness_cert_pem.decode("ascii"),
    }


def _witnessed(row: object) -> Witnessed:
    r = row._mapping  # type: ignore[attr-defined]
    head = Checkpoint(
        str(r["signer"]),
        int(r["tree_size"]),
        bytes(r["root_hash"]),
        int(r["signed_at_us"]),
        bytes(r["signature"]),
        str(r["signer_cert_pem"]).encode("ascii"),
    )
    return Witnessed(
        head,
        str(r["witness"]),
        int(r["witnessed_at_us"]),
        bytes(r["witness_signature"]),
        str(r["witness_cert_pem"]).encode("ascii"),
    )

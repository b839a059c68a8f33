"""The hand-overs a node's audit log went through, checked (`dmp audit verify`).

A successor keeps, with the data it received, the statement both nodes signed (region,
both certificates' SHA-256, the last record and audit sequence handed over, the audit
root there) and appends a ``handover`` event naming that statement's SHA-256 right after
the predecessor's last event. For each hand-over this checks: the statement's hash, both
certificates (issued by the CA, naming the log's owner, the ones the statement names),
both signatures, the event at the right place, the predecessor's checkpoint at the
hand-over's size with the statement's root, and that the checkpoints up to there are
signed by the predecessor and those after by the successor (until a next hand-over).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from cryptography import x509
from sqlalchemy import Engine, MetaData, Table, select
from sqlalchemy.engine import Connection

from dmp.certificates import certificate_sha256, issued_by, principal_from_certificate
from dmp.errors import DmpError
from dmp.signing import signed_by

PROOFS_TABLE = "handover_proofs"
_HANDOVER_EVENT = '"event_type":"handover"'
#: How the successor's event of taking the log over begins (node/handover_receive.py);
#: the operator's start and abort of a hand-over are handover events too.
_TAKEOVER_DETAIL = '"detail":"statement '


@dataclass
class HandoverReport:
    handovers: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _cert(pem: str, ca: x509.Certificate, owner: str, what: str, problems: list[str]) -> str:
    """The SHA-256 of a certificate of the log's owner issued by the CA; "" if not."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        who = principal_from_certificate(cert).uri if issued_by(cert, ca) else ""
    except (ValueError, DmpError):
        who = ""
    if not who:
        problems.append(f"{what}: the certificate is not one the federation CA issued")
        return ""
    if owner and who != owner:
        problems.append(f"{what}: the certificate names {who}, not the log's owner {owner}")
        return ""
    return certificate_sha256(cert)


def verify_handovers(
    engine: Engine, events: Table, checkpoints: Table, ca_pem: bytes, owner: str
) -> HandoverReport:
    report = HandoverReport()
    metadata = MetaData()
    with engine.connect() as conn:
        metadata.reflect(bind=conn, only=lambda name, _: name == PROOFS_TABLE)
        proofs = metadata.tables.get(PROOFS_TABLE)
        rows = (
            [] if proofs is None else [dict(row) for row in conn.execute(select(proofs)).mappings()]
        )
        signers = {
            int(size): str(pem)
            for size, pem in conn.execute(
                select(checkpoints.c.tree_size, checkpoints.c.signer_cert_pem)
            )
        }
        roots = {
            int(size): bytes(root)
            for size, root in conn.execute(select(checkpoints.c.tree_size, checkpoints.c.root_hash))
        }
        ca = x509.load_pem_x509_certificate(ca_pem)
        parsed = []
        for row in rows:
            problems = report.problems
            text = str(row["statement"]).encode()
            digest = hashlib.sha256(text).hexdigest()
            name = f"hand-over {digest[:16]}"
            if digest != row["statement_sha256"]:
                problems.append(f"{name}: the statement does not hash to its recorded SHA-256")
                continue
            statement = json.loads(text)
            old = _cert(row["predecessor_cert_pem"], ca, owner, f"{name} predecessor", problems)
            new = _cert(row["successor_cert_pem"], ca, owner, f"{name} successor", problems)
            if not old or not new:
                continue
            if (old, new) != (
                statement["predecessor_certificate_sha256"],
                statement["successor_certificate_sha256"],
            ):
                problems.append(f"{name}: the certificates kept are not those it names")
                continue
            for role, pem_key, sig_key in (
                ("predecessor", "predecessor_cert_pem", "predecessor_signature"),
                ("successor", "successor_cert_pem", "successor_signature"),
            ):
                cert = x509.load_pem_x509_certificate(str(row[pem_key]).encode("ascii"))
                if not signed_by(cert, text, bytes(row[sig_key])):
                    problems.append(f"{name}: the {role}'s signature does not verify")
            final = int(statement["final_audit_seq"])
            event = conn.execute(
                select(events.c.event_json).where(events.c.seq == final + 1)
            ).scalar()
            if event is None or _HANDOVER_EVENT not in str(event) or digest not in str(event):
                problems.append(f"{name}: audit event {final + 1} is not its hand-over event")
            if final and roots.get(final, b"").hex() != statement["final_audit_root"]:
                problems.append(
                    f"{name}: no checkpoint of the predecessor at {final} events with the"
                    " root both nodes signed"
                )
            parsed.append((final, old, new))
            report.handovers += 1
        _unproven_events(conn, events, {final + 1 for final, _, _ in parsed}, report.problems)
    parsed.sort()
    for size, pem in signers.items():
        expected = _expected_signer(parsed, size)
        if expected is None:
            continue
        try:
            actual = certificate_sha256(pem)
        except ValueError:
            continue  # verify_log reports a bad checkpoint certificate
        if actual != expected:
            report.problems.append(
                f"the checkpoint of {size} events is not signed by the node in charge of the"
                " log then (hand-overs say who was)"
            )
    return report


def _unproven_events(
    conn: Connection, events: Table, proven: set[int], problems: list[str]
) -> None:
    """A successor's hand-over event whose signed proof is not kept (deleted, or never
    valid): without it nothing says who held the log on each side; the log fails."""
    for (seq,) in conn.execute(
        select(events.c.seq)
        .where(
            events.c.event_json.contains(_HANDOVER_EVENT, autoescape=True),
            events.c.event_json.contains(_TAKEOVER_DETAIL, autoescape=True),
        )
        .order_by(events.c.seq)
    ):
        if int(seq) not in proven:
            problems.append(
                f"audit event {seq} is a hand-over event without a verified hand-over proof"
                f" ({PROOFS_TABLE}): the statement both nodes signed is missing"
            )


def _expected_signer(handovers: list[tuple[int, str, str]], size: int) -> str | None:
    """Who had to sign a checkpoint of `size` events: the predecessor of the first
    hand-over at or after it, else the last successor."""
    if not handovers:
        return None
    for final, old, _new in handovers:
        if size <= final:
            return old
    return handovers[-1][2]

"""Checking an audit log against the heads a witness kept for it (``dmp audit verify
--witness`` / ``--witnessed FILE``), and the file format of ``dmp audit witnessed export``.

:func:`dmp.audit.verify_log` shows a log agrees with the checkpoints in its own database;
whoever hosts that database may have rewritten both. Here each witnessed head (checked:
signed by the log's owner, cosigned by a witness of the federation) must still hold: the
log is not shorter than it, its first ``tree_size`` stored leaf hashes make its root
(verify_log checks the leaf hashes against the events), and the checkpoint is still in the
database.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from cryptography import x509
from sqlalchemy import Engine, Table, func, select

from dmp.audit.checkpoints import Checkpoint, verify_checkpoint
from dmp.audit.merkle_proofs import LeafSubtrees
from dmp.audit.witness import Witnessed, iso_us, verify_cosignature
from dmp.errors import DataLoss

__all__ = ["WitnessProblem", "WitnessReport", "check_witnessed", "read_witnessed", "to_json"]

WitnessProblemKind = Literal["truncated", "inconsistent", "checkpoint-missing", "bad-witnessed"]
FORMAT: Final = "dmp-witnessed-head/1"


@dataclass(frozen=True)
class WitnessProblem:
    kind: WitnessProblemKind
    seq: int
    message: str

    def __str__(self) -> str:
        return f"{self.kind} at seq {self.seq}: {self.message}"


@dataclass(frozen=True)
class WitnessReport:
    heads: int
    largest: int
    problems: tuple[WitnessProblem, ...]
    problems_omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_witnessed(
    engine: Engine,
    events: Table,
    checkpoints: Table,
    heads: Iterable[Witnessed],
    ca_pem: bytes,
    source_id: str,
    *,
    max_problems: int = 1000,
) -> WitnessReport:
    """Problems of the log of ``source_id`` against the witnessed ``heads``."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    with engine.connect() as conn:
        held = int(conn.execute(select(func.max(events.c.seq))).scalar() or 0)
        stored = {
            int(size): bytes(root)
            for size, root in conn.execute(select(checkpoints.c.tree_size, checkpoints.c.root_hash))
        }
    subtrees = LeafSubtrees(engine, events)
    problems: list[WitnessProblem] = []
    ordered = sorted(heads, key=lambda w: w.head.tree_size)
    beyond: Witnessed | None = None
    inconsistent = False
    for w in ordered:
        head = w.head
        size = head.tree_size
        seen = f"the head of {size} events signed at {iso_us(head.signed_at_us)}"
        why = _bad(w, ca, source_id)
        if why:
            problems.append(WitnessProblem("bad-witnessed", size, f"{seen}: {why}"))
            continue
        seen += f" and witnessed by {w.witness}"
        if size > held:
            beyond = w
        elif not inconsistent:
            why = _root_differs(subtrees, head)
            if why:
                inconsistent = True  # every later head differs as well: say it once
                problems.append(
                    WitnessProblem(
                        "inconsistent", size, f"events 1..{size} do not make {seen}: {why}"
                    )
                )
        if stored.get(size) != head.root_hash:
            what = "is missing from" if size not in stored else "has another root in"
            problems.append(
                WitnessProblem("checkpoint-missing", size, f"{seen} {what} the database")
            )
    if beyond is not None:
        size = beyond.head.tree_size
        problems.append(
            WitnessProblem(
                "truncated",
                held + 1,
                f"the log ends at seq {held} but {beyond.witness} witnessed a head of {size}"
                f" events signed at {iso_us(beyond.head.signed_at_us)}: events"
                f" {held + 1}..{size} were removed",
            )
        )
    problems.sort(key=lambda p: p.seq)
    return WitnessReport(
        heads=len(ordered),
        largest=ordered[-1].head.tree_size if ordered else 0,
        problems=tuple(problems[:max_problems]),
        problems_omitted=max(0, len(problems) - max_problems),
    )


def _bad(w: Witnessed, ca: x509.Certificate, source_id: str) -> str:
    if w.head.source_id != source_id:
        return f"it is a head of {w.head.source_id}, not of {source_id}"
    why = verify_cosignature(w, ca)
    if why:
        return why
    why = verify_checkpoint(w.head, ca)
    return f"its signature: {why}" if why else ""


def _root_differs(subtrees: LeafSubtrees, head: Checkpoint) -> str:
    try:
        root = subtrees.root(head.tree_size)
    except DataLoss as exc:
        return exc.message
    if root != head.root_hash:
        return "they were changed, removed, renumbered or reordered since (the log was rewritten)"
    return ""


# --------------------------------------------------------------------------- the file


def to_json(w: Witnessed) -> str:
    """One line of an exported file of witnessed heads."""
    b64 = base64.b64encode
    head = w.head
    return json.dumps(
        {
            "format": FORMAT,
            "signer": head.source_id,
            "tree_size": head.tree_size,
            "root_hash": head.root_hash.hex(),
            "signed_at_us": head.signed_at_us,
            "signature": b64(head.signature).decode(),
            "signer_certificate": head.signer_cert_pem.decode("ascii"),
            "witness": w.witness,
            "witnessed_at_us": w.witnessed_at_us,
            "witness_signature": b64(w.witness_signature).decode(),
            "witness_certificate": w.witness_cert_pem.decode("ascii"),
        },
        sort_keys=True,
    )


def read_witnessed(lines: Iterable[str]) -> list[Witnessed]:
    """The heads of an exported file; ValueError naming the line when one is malformed."""
    heads = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if d.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} line")
            head = Checkpoint(
                str(d["signer"]),
                int(d["tree_size"]),
                bytes.fromhex(d["root_hash"]),
                int(d["signed_at_us"]),
                base64.b64decode(d["signature"], validate=True),
                str(d["signer_certificate"]).encode("ascii"),
            )
            heads.append(
                Witnessed(
                    head,
                    str(d["witness"]),
                    int(d["witnessed_at_us"]),
                    base64.b64decode(d["witness_signature"], validate=True),
                    str(d["witness_certificate"]).encode("ascii"),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"line {number}: not a witnessed head ({exc})") from None
    return heads

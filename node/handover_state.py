"""A node's hand-over state: the one row of ``handover``, and its transitions.

As predecessor: ``streaming`` (started: changes captured, the successor pulls), then
``freezing`` (`complete` asked the serving node to stop accepting calls), ``frozen`` (it
did: the final sequences are set), ``handed_over`` (the successor confirmed it holds them:
this node never serves the region again). `abort` returns to no hand-over from any state
but ``handed_over``; the successor's confirmation and an abort are one conditional update
each, so exactly one of them wins.

As successor: ``receiving`` (snapshot then changes), ``in_charge`` (both signed: it serves).

Every transition is a conditional UPDATE in its own transaction: a process killed at any
point leaves a state a restart resumes from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Engine, Table, delete, insert, select, update
from sqlalchemy.engine import Connection

from dmp.certificates import certificate_sha256
from dmp.clock import now_us
from dmp.db import writer
from dmp.errors import FailedPrecondition
from node.models import HandoverRow

PREDECESSOR: Final = "predecessor"
SUCCESSOR: Final = "successor"

STREAMING: Final = "streaming"
FREEZING: Final = "freezing"
FROZEN: Final = "frozen"
HANDED_OVER: Final = "handed_over"
RECEIVING: Final = "receiving"
IN_CHARGE: Final = "in_charge"

#: Predecessor states in which the node accepts no call of its service.
CLOSED: Final = frozenset({FROZEN, HANDED_OVER})
_T: Table = HandoverRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Handover:
    role: str
    state: str
    peer_cert_pem: str
    peer_address: str
    snapshot_done: bool
    final_record_seq: int | None
    final_audit_seq: int | None
    final_root_hash: bytes | None
    statement: str | None
    predecessor_signature: bytes | None
    successor_signature: bytes | None
    started_us: int


def read(engine: Engine) -> Handover | None:
    with engine.connect() as conn:
        row = conn.execute(select(_T).where(_T.c.id == 1)).mappings().first()
    if row is None:
        return None
    values = {name: row[name] for name in Handover.__dataclass_fields__}
    for name in ("final_root_hash", "predecessor_signature", "successor_signature"):
        if values[name] is not None:
            values[name] = bytes(values[name])
    return Handover(**values)


def handed_over(engine: Engine) -> bool:
    """Whether this node handed its region over (it never serves it again)."""
    handover = read(engine)
    return handover is not None and handover.role == PREDECESSOR and handover.state == HANDED_OVER


def begin(engine: Engine, role: str, state: str, peer_cert_pem: str, peer_address: str) -> None:
    """Start a hand-over; refused if one is already recorded."""
    now = now_us()
    with writer(engine).begin() as conn:
        if conn.execute(select(_T.c.state).where(_T.c.id == 1)).first() is not None:
            raise FailedPrecondition(
                "a hand-over is already recorded on this node: see `dmp node handover status`"
                " (abort it first to start another)",
                reason="HANDOVER_EXISTS",
            )
        conn.execute(
            insert(_T).values(
                id=1,
                role=role,
                state=state,
                peer_cert_pem=peer_cert_pem,
                peer_address=peer_address,
                snapshot_done=False,
                started_us=now,
                updated_us=now,
            )
        )


def move(engine: Engine, from_states: frozenset[str] | set[str], **values: object) -> bool:
    """Set `values` if the state is one of `from_states`; whether it was."""
    with writer(engine).begin() as conn:
        return move_in(conn, from_states, **values)


def move_in(conn: Connection, from_states: frozenset[str] | set[str], **values: object) -> bool:
    """`move` in the caller's transaction."""
    done = conn.execute(
        update(_T)
        .where(_T.c.id == 1, _T.c.state.in_(sorted(from_states)))
        .values(updated_us=now_us(), **values)
    ).rowcount
    return bool(done)


def forget(engine: Engine, from_states: frozenset[str] | set[str]) -> bool:
    """Remove the hand-over if in one of `from_states` (an abort); whether it was."""
    with writer(engine).begin() as conn:
        done = conn.execute(
            delete(_T).where(_T.c.id == 1, _T.c.state.in_(sorted(from_states)))
        ).rowcount
    return bool(done)


def statement(
    region: str,
    predecessor_pem: str | bytes,
    successor_pem: str | bytes,
    final_record_seq: int,
    final_audit_seq: int,
    final_root_hash: bytes,
    rows_sha256: str,
) -> bytes:
    """The canonical statement both nodes sign: this region's records up to
    `final_record_seq` and audit log up to `final_audit_seq` (root `final_root_hash`),
    every row handed over hashing to `rows_sha256` (node/handover_rows.py), passed from the
    first certificate's node to the second's."""
    return json.dumps(
        {
            "format": "dmp-handover-2",
            "rows_sha256": rows_sha256,
            "region": region,
            "predecessor_certificate_sha256": certificate_sha256(predecessor_pem),
            "successor_certificate_sha256": certificate_sha256(successor_pem),
            "final_record_seq": final_record_seq,
            "final_audit_seq": final_audit_seq,
            "final_audit_root": final_root_hash.hex(),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def refuse_if_not_in_charge(engine: Engine, task: str) -> None:
    """Refuse an operator's task that writes into a node's database once it stopped
    accepting writes for a hand-over, or before a successor took charge: what it wrote
    would not reach the node in charge."""
    handover = read(engine)
    if handover is None:
        return
    if handover.role == PREDECESSOR and handover.state in (FREEZING, FROZEN, HANDED_OVER):
        raise FailedPrecondition(
            f"{task}: this node is handing its region over ({handover.state}); run it on the"
            " successor once it is in charge, or `dmp node handover abort` first",
            reason="REGION_MOVING" if handover.state != HANDED_OVER else "REGION_MOVED",
        )
    if handover.role == SUCCESSOR and handover.state != IN_CHARGE:
        raise FailedPrecondition(
            f"{task}: this node is still receiving its region; finish the hand-over first",
            reason="HANDOVER_RECEIVING",
        )

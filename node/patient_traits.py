"""A patient's identity traits as a node keeps them: what writers give is merged into
what is kept, a contradiction refused, the free-text ones sealed under encryption at rest."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from dmp.errors import FailedPrecondition
from dmp.patients import IDENTITY_CONFLICT, TRAIT_NAMES, Traits, conflict_message
from node.keys import Sealer, open_traits, seal_traits
from node.models import PatientRow

#: Built once (its construction and cache key cost more than its execution).
_LOCK_PATIENTS = (
    select(PatientRow)
    .where(PatientRow.ins.in_(bindparam("patients", expanding=True)))
    .order_by(PatientRow.ins)
    .with_for_update()
    .execution_options(populate_existing=True)
)


def merge_traits(
    session: Session, traits: Traits, sealer: Sealer | None, keys: dict[str, bytes], now: int
) -> None:
    """Keep the traits writers give; refuse those that contradict the ones kept. With a
    sealer (encryption at rest) the free-text ones are stored sealed with the patient's
    data key (node/keys.py), which `keys` keeps for the rest of the write."""
    # Locked, then the data key: `dmp node encrypt` seals this row under the same lock,
    # taken in the same order (SQLite's unit of work holds the write lock already).
    row = session.get(PatientRow, traits.ins, with_for_update=True)
    _merge(session, row, traits, sealer, keys, now)


def merge_all(
    session: Session,
    given: Iterable[Traits],
    sealer: Sealer | None,
    keys: dict[str, bytes],
    now: int,
) -> None:
    """`merge_traits` of several patients' traits (a batch), their rows read and locked
    in one statement, in the order of their INS (as every writer locks them)."""
    given = list(dict.fromkeys(given))
    if not given:
        return
    wanted = sorted({traits.ins for traits in given})
    rows: dict[str, PatientRow | None] = {
        row.ins: row for row in session.scalars(_LOCK_PATIENTS, {"patients": wanted})
    }
    for traits in given:
        rows[traits.ins] = _merge(session, rows.get(traits.ins), traits, sealer, keys, now)


def _merge(
    session: Session,
    row: PatientRow | None,
    traits: Traits,
    sealer: Sealer | None,
    keys: dict[str, bytes],
    now: int,
) -> PatientRow:
    """Merge `traits` into the patient's locked row (None: not kept yet); the row kept."""
    key = None
    if sealer is not None:
        if traits.ins not in keys:
            keys[traits.ins] = sealer.key_for_write(session, traits.ins, now)
        key = keys[traits.ins]
    if row is None:
        values = PatientRow.values(traits) if key is None else seal_traits(key, traits)
        row = PatientRow(ins=traits.ins, **values)
        session.add(row)
        return row
    if row.sealed is not None and key is None:
        raise FailedPrecondition(
            f"patient {traits.ins}'s identity traits are encrypted on this node, which was"
            " started without its KEK: restart it with --kek-file"
        )
    kept = open_traits(key, row)
    conflicts = kept.contradicts(traits)
    if conflicts:
        raise FailedPrecondition(conflict_message(traits.ins, conflicts), reason=IDENTITY_CONFLICT)
    merged = Traits(
        traits.ins, *(getattr(kept, name) or getattr(traits, name) for name in TRAIT_NAMES)
    )
    if key is None:
        row.fill(merged)
        return row
    if merged != kept or row.sealed is None:
        for name, value in seal_traits(key, merged).items():
            setattr(row, name, value)
    return row

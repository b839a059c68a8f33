"""A patient's identity traits as a node keeps them: what writers give is merged into
what is kept, a contradiction refused, the free-text ones sealed under encryption at rest.

Read, inserted and updated with SQLAlchemy Core, no ORM object: every write merges its
patient's traits (usually into a row they leave as it is), and loading the row as an ORM
object, then flushing it, cost several times the statement."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from dmp.errors import FailedPrecondition
from dmp.patients import IDENTITY_CONFLICT, TRAIT_NAMES, Traits, conflict_message
from node.keys import Sealer, open_traits, seal_traits
from node.models import PatientRow

PATIENTS: Table = PatientRow.__table__  # type: ignore[assignment]


class KeptTraits(NamedTuple):
    """A patient's row as kept: its trait columns and its sealed ones."""

    ins: str
    birth_family_name: str
    given_names: str
    birth_date: str
    sex: str
    birthplace_code: str
    sealed: bytes | None

    def traits(self) -> Traits:
        return Traits(self.ins, *(getattr(self, name) for name in TRAIT_NAMES))


#: Built once (its construction and cache key cost more than its execution).
_LOCK_PATIENTS = (
    select(*(PATIENTS.c[name] for name in KeptTraits._fields))
    .where(PATIENTS.c.ins.in_(bindparam("patients", expanding=True)))
    .order_by(PATIENTS.c.ins)
    .with_for_update()
)


def merge_traits(
    session: Session, traits: Traits, sealer: Sealer | None, keys: dict[str, bytes], now: int
) -> None:
    """Keep the traits writers give; refuse those that contradict the ones kept. With a
    sealer (encryption at rest) the free-text ones are stored sealed with the patient's
    data key (node/keys.py), which `keys` keeps for the rest of the write."""
    merge_all(session, [traits], sealer, keys, now)


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
    connection = session.connection()
    # Locked, then the data keys: `dmp node encrypt` seals these rows under the same lock,
    # taken in the same order (SQLite's write transaction holds the write lock already).
    stored = {
        row.ins: KeptTraits(*row)
        for row in connection.execute(_LOCK_PATIENTS, {"patients": wanted})
    }
    kept = dict(stored)
    written: dict[str, dict[str, Any]] = {}  # the columns to store, by INS, in given order
    for traits in given:
        values = _merge(session, kept.get(traits.ins), traits, sealer, keys, now)
        if values is not None:
            kept[traits.ins] = KeptTraits(traits.ins, **values)
            written[traits.ins] = values
    new = [{"ins": ins, **values} for ins, values in written.items() if ins not in stored]
    if new:
        connection.execute(insert(PATIENTS), new)
    for ins, values in written.items():
        before = stored.get(ins)
        if before is None:
            continue
        changed = {name: value for name, value in values.items() if getattr(before, name) != value}
        if changed:
            connection.execute(update(PATIENTS).where(PATIENTS.c.ins == ins).values(**changed))


def _merge(
    session: Session,
    row: KeptTraits | None,
    traits: Traits,
    sealer: Sealer | None,
    keys: dict[str, bytes],
    now: int,
) -> dict[str, Any] | None:
    """The columns of the patient's locked row (None: not kept yet) once `traits` are
    merged in; None if the row stays as it is."""
    key = None
    if sealer is not None:
        if traits.ins not in keys:
            keys[traits.ins] = sealer.key_for_write(session, traits.ins, now)
        key = keys[traits.ins]
    if row is None:
        if key is None:
            return {**PatientRow.values(traits), "sealed": None}
        return seal_traits(key, traits)
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
        # Only the traits the row does not have yet are added (it never changes one).
        if merged == kept:
            return None
        return {**PatientRow.values(merged), "sealed": None}
    if merged != kept or row.sealed is None:
        return seal_traits(key, merged)
    return None

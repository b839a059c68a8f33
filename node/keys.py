"""Encryption at rest at the node: each patient's data key, wrapped by the node's KEK
(dmp/envelope.py), and the sealing of that patient's records with it.

What is sealed (AES-256-GCM, bound to record id, version and column): the content, and
the free-text metadata (title, type display, organization, author name) as one value in
`records.sealed`, whose clear columns are then empty. What stays in clear is what queries
need: INS, kind, type system and code, dates, status, version, ids, confidentiality, the
hidden state, content type, size, and the SHA-256 of the plaintext content. A patient's
free-text identity traits (names, birthplace) are sealed too, bound to their INS; their
INS, birth date and sex stay in clear.

The row hash (node/integrity.py) stays the hash of what is stored, ciphertext included;
AES-GCM authenticates the sealed metadata and the plaintext's SHA-256 the content.

A repository: it takes the caller's session or connection, and knows nothing of access or
audit. Unwrapped keys are kept in a bounded cache in memory (never logged), keyed by the
wrapped key read on every call: a rotated or shredded key is never served from it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from dmp.envelope import KeyCache, KeyEncryptionKey, new_data_key, open_value, seal
from dmp.errors import FailedPrecondition
from dmp.patients import Traits
from node.integrity import hash_values
from node.models import DataKeyRow, PatientRow

DATA_KEYS: Table = DataKeyRow.__table__  # type: ignore[assignment]
#: The free-text metadata columns, sealed together as one JSON value.
SEALED_COLUMNS = ("title", "type_display", "organization", "author_name")
#: A patient's free-text identity traits, sealed together in `patients.sealed`.
SEALED_TRAITS = ("birth_family_name", "given_names", "birthplace_code")
RECORD_SHREDDED = "RECORD_SHREDDED"


def shredded_error(record_id: str, shredded_us: int) -> FailedPrecondition:
    from dmp.clock import from_us

    when = from_us(shredded_us).ToJsonString()
    return FailedPrecondition(
        f"record {record_id} was crypto-shredded on {when}: its patient's data key was"
        " destroyed after the legal retention, and its content can no longer be read by"
        " anyone; its metadata is kept",
        reason=RECORD_SHREDDED,
    )


@dataclass(frozen=True, slots=True)
class PatientKey:
    """A patient's data key as a read finds it: the key, or when it was shredded."""

    key: bytes | None
    shredded_us: int | None = None


class Sealer:
    """Seals and opens the records of a node whose KEK it holds."""

    def __init__(
        self,
        kek: KeyEncryptionKey,
        cache_size: int = 10_000,
        previous: Sequence[KeyEncryptionKey] = (),
    ) -> None:
        """`kek` wraps new data keys; `previous` KEKs only open those not yet rewrapped
        (a node serving while `dmp node rotate-kek` runs)."""
        self.kek = kek
        self._caches = {k.key_id: KeyCache(k, cache_size) for k in (*previous, kek)}

    @property
    def kek_ids(self) -> frozenset[str]:
        return frozenset(self._caches)

    def unwrap_key(self, kek_id: str, wrapped: bytes) -> bytes:
        """A data key in clear, for a hand-over to pass it on sealed to the successor."""
        return self._unwrap(kek_id, wrapped)

    def _unwrap(self, kek_id: str, wrapped: bytes) -> bytes:
        cache = self._caches.get(kek_id)
        if cache is None:
            raise FailedPrecondition(
                f"a data key on this node is wrapped by KEK {kek_id}, which this node was not"
                " given: restart it with that --kek-file (or --previous-kek-file during a"
                " rotation)",
                reason="WRONG_KEK",
            )
        return cache.unwrap(wrapped)

    # -- data keys ------------------------------------------------------------------------

    def key_for_write(self, session: Session, patient_ins: str, now: int) -> bytes:
        """The patient's data key, made and stored wrapped if they have none (a race of
        two first writes keeps one: the other's insert does nothing)."""
        row = session.get(DataKeyRow, patient_ins)
        if row is None:
            values = dict(
                patient_ins=patient_ins,
                kek_id=self.kek.key_id,
                wrapped=self.kek.wrap(new_data_key()),
                created_us=now,
                shredded_us=None,
            )
            dialect = session.get_bind().dialect.name
            maker = postgresql.insert if dialect == "postgresql" else sqlite.insert
            session.execute(maker(DATA_KEYS).values(values).on_conflict_do_nothing())
            row = session.get(DataKeyRow, patient_ins, populate_existing=True)
            assert row is not None
        if row.wrapped is None:
            raise FailedPrecondition(
                f"the records of patient {patient_ins} on this node were crypto-shredded:"
                " no new record is written for them",
                reason=RECORD_SHREDDED,
            )
        return self._unwrap(row.kek_id, row.wrapped)

    def keys_for_read(
        self, connection: Connection, patients: Iterable[str]
    ) -> dict[str, PatientKey]:
        """The data keys of `patients` that have one."""
        wanted = sorted(set(patients))
        if not wanted:
            return {}
        rows = connection.execute(
            select(
                DATA_KEYS.c.patient_ins,
                DATA_KEYS.c.kek_id,
                DATA_KEYS.c.wrapped,
                DATA_KEYS.c.shredded_us,
            ).where(DATA_KEYS.c.patient_ins.in_(wanted))
        )
        keys = {}
        for ins, kek_id, wrapped, shredded_us in rows:
            key = None if wrapped is None else self._unwrap(kek_id, wrapped)
            keys[ins] = PatientKey(key, shredded_us)
        return keys

    # -- records --------------------------------------------------------------------------

    @staticmethod
    def seal_row(
        key: bytes, values: Mapping[str, Any], content: bytes
    ) -> tuple[dict[str, Any], bytes]:
        """The stored form of a record's values and content: free text sealed, its clear
        columns empty, the row hash of what is stored."""
        record_id, version = values["id"], values["version"]
        free = {name: values[name] for name in SEALED_COLUMNS}
        stored = dict(values)
        stored.update(dict.fromkeys(SEALED_COLUMNS, ""))
        stored["sealed"] = seal(key, json.dumps(free).encode(), record_id, version, "metadata")
        stored["row_hash"] = hash_values(stored)
        return stored, seal(key, content, record_id, version, "content")

    @staticmethod
    def open_metadata(key: bytes, row: Any) -> dict[str, str]:
        """The free-text metadata of a sealed row."""
        plain = open_value(key, row.sealed, row.id, row.version, "metadata")
        opened: dict[str, str] = json.loads(plain)
        return opened

    @staticmethod
    def open_content(key: bytes, row: Any, blob: bytes) -> bytes:
        return open_value(key, blob, row.id, row.version, "content")


# -- patients' identity traits ----------------------------------------------------------


def seal_traits(key: bytes, traits: Traits) -> dict[str, Any]:
    """The stored form of a patient's traits: the free-text ones sealed (bound to the INS),
    their columns empty; birth date and sex, which are not free text, in clear."""
    values: dict[str, Any] = PatientRow.values(traits)
    free = {name: values[name] for name in SEALED_TRAITS}
    values.update(dict.fromkeys(SEALED_TRAITS, ""))
    values["sealed"] = seal(key, json.dumps(free).encode(), traits.ins, 0, "traits")
    return values


class TraitsRow(Protocol):
    """A patient's row: an ORM one, or its columns as read (node/patient_traits.py)."""

    @property
    def ins(self) -> str: ...
    @property
    def sealed(self) -> bytes | None: ...
    def traits(self) -> Traits: ...


def open_traits(key: bytes | None, row: TraitsRow) -> Traits:
    """A patient row's traits, opened if sealed; without the key (shredded) only those
    kept in clear."""
    if row.sealed is None:
        return row.traits()
    clear = row.traits()
    if key is None:
        return replace(clear, **dict.fromkeys(SEALED_TRAITS, ""))
    opened: dict[str, str] = json.loads(open_value(key, row.sealed, row.ins, 0, "traits"))
    return replace(clear, **{name: opened[name] for name in SEALED_TRAITS})


def has_sealed_data(connection: Connection) -> bool:
    """Whether a database holds data keys (so sealed records): a node without its KEK
    must not serve it."""
    return connection.execute(select(DATA_KEYS.c.patient_ins).limit(1)).first() is not None


def foreign_keys(connection: Connection, kek_ids: str | Collection[str]) -> int:
    """How many unshredded data keys other KEKs than `kek_ids` wrap."""
    known = [kek_ids] if isinstance(kek_ids, str) else sorted(kek_ids)
    count = connection.execute(
        select(func.count()).where(
            DATA_KEYS.c.kek_id.not_in(known), DATA_KEYS.c.wrapped.is_not(None)
        )
    ).scalar_one()
    return int(count)

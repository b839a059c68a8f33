"""Records on their way into a node: a validated draft, what a write stored (or found
stored, for a retry), and the one refusal of a supersede that may not happen."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, NamedTuple

from dmp.errors import FailedPrecondition
from dmp.identity import Principal
from dmp.patients import Traits
from dmp.records import DraftFields
from dmp.v1 import record_pb2
from node.models import RecordRow
from node.records import to_proto


class Written(NamedTuple):
    """A record a write stored (or found already stored, for a retry); a named tuple, as
    `Draft`, one per record of a stream."""

    id: str
    patient_ins: str
    #: The stored row, or for a new record the values inserted.
    row: RecordRow | dict[str, Any]
    #: The answer, for a stored row whose metadata is sealed.
    message: record_pb2.Record | None = None

    @property
    def supersedes(self) -> str:
        """The id of the version this write retired, if any."""
        value = self.row.supersedes if isinstance(self.row, RecordRow) else self.row["supersedes"]
        return value or ""

    def record(self, region: str) -> record_pb2.Record:
        if self.message is not None:
            return self.message
        if isinstance(self.row, RecordRow):
            return to_proto(self.row, region)
        # The values inserted, read as a row's attributes: building an ORM object for them
        # (its instance state, an instrumented set per column) cost more than the message.
        return to_proto(SimpleNamespace(**self.row), region)


class Draft(NamedTuple):
    """A validated record ready to insert (a named tuple: immutable, and built several
    times faster than a frozen dataclass, once a record of a stream)."""

    record: record_pb2.Record
    content: bytes
    traits: Traits | None
    digest: str
    fingerprint: str
    record_id: str
    author: Principal
    #: The record's fields, read from the message once (validation, fingerprint and row).
    fields: DraftFields
    #: Set by the node for the records it writes from e-prescription, never by a writer.
    prescription_id: str | None = None


def cannot_supersede(record: record_pb2.Record) -> FailedPrecondition:
    """One answer whether the record is missing, another patient's, or not the writer's to
    replace: a refusal tells nothing of records one may not read."""
    return FailedPrecondition(
        f"record.supersedes {record.supersedes!r}: no such record of this patient that"
        " you may supersede on this node; only the author of a record writes its"
        " new version, on the node that holds it"
    )

"""The node's access check: the one place that decides who may do what with a record.

A call has a transport principal (the certificate that opened the connection) and a
subject, the end user the call is for. They are the same, except when the directory
relays a professional's or a patient's request: then the subject is the person the
directory vouches for. The access-policy work replaces that relay with the person's own
signed assertion; every decision still goes through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, false

from dmp.errors import InvalidArgument, PermissionDenied
from dmp.identity import Principal, Role, parse_uri
from dmp.relay import ON_BEHALF_NAME, ON_BEHALF_OF, ON_BEHALF_PROFESSION
from node.models import RecordRow

S = TypeVar("S", bound=Select[Any])


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a call is for (`subject`) and who carried it (`transport`)."""

    subject: Principal
    transport: Principal

    @property
    def relayed(self) -> bool:
        return self.subject != self.transport


def caller_of(transport: Principal, metadata: Sequence[tuple[str, str | bytes]]) -> Caller:
    """The caller of a call, from its transport principal and its metadata."""
    values = dict(metadata)
    on_behalf = values.get(ON_BEHALF_OF)
    if not isinstance(on_behalf, str):
        return Caller(subject=transport, transport=transport)
    if transport.role is not Role.DIRECTORY:
        raise PermissionDenied("only the directory may relay a call on behalf of someone else")
    try:
        role, key = parse_uri(on_behalf)
    except InvalidArgument as exc:
        raise PermissionDenied(f"relayed identity refused: {exc.message}") from None
    if role not in (Role.PRACTITIONER, Role.PATIENT):
        raise PermissionDenied("the directory may relay only professionals and patients")
    subject = Principal(
        role=role,
        key=key,
        name=_text(values.get(ON_BEHALF_NAME, b"")),
        profession=_text(values.get(ON_BEHALF_PROFESSION, "")) if role is Role.PRACTITIONER else "",
    )
    return Caller(subject=subject, transport=transport)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def check_write(caller: Caller) -> None:
    """Only professionals write clinical records, and only with their own certificate."""
    if caller.subject.role is not Role.PRACTITIONER:
        raise PermissionDenied(
            f"{caller.subject.uri} may not write records: only professionals write"
        )
    if caller.relayed:
        raise PermissionDenied("records are written directly to a node, not through a relay")


def check_may_read(caller: Caller) -> None:
    """Only people read records: professionals, and patients their own."""
    if caller.subject.role not in (Role.PRACTITIONER, Role.PATIENT):
        raise PermissionDenied(f"{caller.subject.uri} may not read records")


def check_read(caller: Caller, patient_ins: str) -> None:
    """May the caller read this patient's records at all? Decided before any lookup."""
    subject = caller.subject
    if subject.role is Role.PRACTITIONER:
        return
    if subject.role is Role.PATIENT and subject.key == patient_ins:
        return
    raise PermissionDenied(f"{subject.uri} may not read the records of this patient")


def readable(stmt: S, caller: Caller) -> S:
    """Scope a query on records to what the caller may see: no code path can forget it."""
    subject = caller.subject
    if subject.role is Role.PRACTITIONER:
        return stmt
    if subject.role is Role.PATIENT:
        return stmt.where(
            RecordRow.patient_ins == subject.key, RecordRow.hidden_from_patient.is_(False)
        )
    return stmt.where(false())

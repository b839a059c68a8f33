"""The purpose of an access, one vocabulary for the whole federation.

A purpose has a name (what audit events and people read: CARE, EMERGENCY, SELF), a value
on the wire (``dmp.v1.Purpose`` in access assertions) and a code of HL7 v3 ActReason (the
``purposeOfEvent`` of a FHIR AuditEvent). Every module that speaks of a purpose takes it
from here.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from dmp.v1 import access_pb2

__all__ = ["ACT_REASON_SYSTEM", "Purpose"]

ACT_REASON_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


class Purpose(enum.StrEnum):
    CARE = "CARE"
    EMERGENCY = "EMERGENCY"
    SELF = "SELF"

    @property
    def wire(self) -> access_pb2.Purpose.ValueType:
        """Its value in an access assertion."""
        return _WIRE[self]

    @property
    def act_reason(self) -> tuple[str, str]:
        """Its HL7 v3 ActReason code and display."""
        return _ACT_REASON[self]

    @classmethod
    def named(cls, name: str) -> Purpose | None:
        """The purpose of that name; None for "" (no purpose) or an unknown name."""
        return _BY_NAME.get(name)

    @classmethod
    def of_wire(cls, value: int) -> Purpose | None:
        """The purpose an assertion's value stands for; None for an unknown or unset one."""
        return _BY_WIRE.get(value)


_WIRE: Final[Mapping[Purpose, access_pb2.Purpose.ValueType]] = {
    Purpose.CARE: access_pb2.PURPOSE_CARE,
    Purpose.EMERGENCY: access_pb2.PURPOSE_EMERGENCY,
    Purpose.SELF: access_pb2.PURPOSE_SELF,
}
_BY_WIRE: Final[Mapping[int, Purpose]] = {wire: purpose for purpose, wire in _WIRE.items()}
_BY_NAME: Final[Mapping[str, Purpose]] = {purpose.value: purpose for purpose in Purpose}
_ACT_REASON: Final[Mapping[Purpose, tuple[str, str]]] = {
    Purpose.CARE: ("TREAT", "treatment"),
    Purpose.EMERGENCY: ("ETREAT", "Emergency Treatment"),
    Purpose.SELF: ("PATRQT", "patient requested"),
}

"""Federation identities: who a peer is, from the URI in its certificate.

URIs: urn:dmp:node:<region>, urn:dmp:directory, urn:dmp:practitioner:<RPPS>,
urn:dmp:patient:<INS>. The file name of an identity in a PKI directory is node-<region>,
directory, practitioner-<RPPS> or patient-<INS>.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from dmp.errors import InvalidArgument
from dmp.ins import normalize_ins
from dmp.regions import check_region

URN_PREFIX = "urn:dmp:"

PROFESSIONS = ("doctor", "pharmacist", "nurse", "midwife", "dentist", "physiotherapist")

_RPPS = re.compile(r"^\d{11}$")


class Role(enum.StrEnum):
    NODE = "node"
    DIRECTORY = "directory"
    PRACTITIONER = "practitioner"
    PATIENT = "patient"


def check_rpps(rpps: str) -> str:
    if not _RPPS.match(rpps):
        raise InvalidArgument(f"RPPS {rpps!r} must be exactly 11 digits")
    return rpps


def check_profession(profession: str) -> str:
    if profession not in PROFESSIONS:
        raise InvalidArgument(
            f"unknown profession {profession!r}: expected one of {', '.join(PROFESSIONS)}"
        )
    return profession


def _check_key(role: Role, key: str) -> str:
    if role is Role.NODE:
        return check_region(key)
    if role is Role.PRACTITIONER:
        return check_rpps(key)
    if role is Role.PATIENT:
        return normalize_ins(key)
    if key:
        raise InvalidArgument("the directory identity takes no key")
    return key


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified federation identity: role, key (region, RPPS or INS), name, profession."""

    role: Role
    key: str = ""
    name: str = ""
    profession: str = ""

    @property
    def uri(self) -> str:
        return f"{URN_PREFIX}{self.role.value}" + (f":{self.key}" if self.key else "")

    @property
    def identity(self) -> str:
        """The file-name form: node-11, directory, practitioner-<RPPS>, patient-<INS>."""
        return self.role.value + (f"-{self.key}" if self.key else "")

    def __str__(self) -> str:
        return self.uri


def parse_uri(uri: str) -> tuple[Role, str]:
    """Role and key of a federation URI; InvalidArgument if it is not one."""
    if not uri.startswith(URN_PREFIX):
        raise InvalidArgument(f"{uri!r} is not a federation identity (urn:dmp:...)")
    role_name, _, key = uri[len(URN_PREFIX) :].partition(":")
    try:
        role = Role(role_name)
    except ValueError:
        raise InvalidArgument(f"{uri!r} names no known role") from None
    return role, _check_key(role, key)


def parse_identity(identity: str) -> tuple[Role, str]:
    """Role and key of an identity's file-name form (node-11, practitioner-<RPPS>, ...)."""
    role_name, _, key = identity.partition("-")
    try:
        role = Role(role_name)
    except ValueError:
        raise InvalidArgument(
            f"{identity!r} is not an identity: expected node-<region>, directory,"
            " practitioner-<RPPS> or patient-<INS>"
        ) from None
    return role, _check_key(role, key)

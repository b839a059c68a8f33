"""The directory's access check: who may ask what, decided before any lookup."""

from __future__ import annotations

from dmp.errors import PermissionDenied
from dmp.identity import Principal, Role


def check_view(caller: Principal, patient_ins: str) -> None:
    """Professionals view any patient; a patient only themself. Before existence."""
    if caller.role is Role.PRACTITIONER:
        return
    if caller.role is Role.PATIENT and caller.key == patient_ins:
        return
    raise PermissionDenied(f"{caller.uri} may not view the record of this patient")


def check_content(caller: Principal) -> None:
    if caller.role not in (Role.PRACTITIONER, Role.PATIENT):
        raise PermissionDenied(f"{caller.uri} may not read record content")


def check_register(caller: Principal) -> None:
    if caller.role is not Role.PRACTITIONER:
        raise PermissionDenied("only professionals register patient identities")


def check_node(caller: Principal) -> str:
    """Node-only calls; returns the region of the calling node's certificate."""
    if caller.role is not Role.NODE:
        raise PermissionDenied("only a regional node may make this call")
    return caller.key


def check_operator(caller: Principal) -> None:
    if caller.role is not Role.DIRECTORY:
        raise PermissionDenied(
            "identity conflicts are for the national operator (directory identity)"
        )

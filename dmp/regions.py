"""Regions of the federation, by INSEE region code."""

from __future__ import annotations

from dmp.errors import InvalidArgument
from dmp.v1 import directory_service_pb2 as pb

REGIONS: dict[str, str] = {
    "01": "Guadeloupe",
    "02": "Martinique",
    "03": "Guyane",
    "04": "La Réunion",
    "06": "Mayotte",
    "11": "Île-de-France",
    "24": "Centre-Val de Loire",
    "27": "Bourgogne-Franche-Comté",
    "28": "Normandie",
    "32": "Hauts-de-France",
    "44": "Grand Est",
    "52": "Pays de la Loire",
    "53": "Bretagne",
    "75": "Nouvelle-Aquitaine",
    "76": "Occitanie",
    "84": "Auvergne-Rhône-Alpes",
    "93": "Provence-Alpes-Côte d'Azur",
    "94": "Corse",
}

METROPOLITAN = ("11", "24", "27", "28", "32", "44", "52", "53", "75", "76", "84", "93", "94")


def check_region(code: str) -> str:
    """Return the region code, or raise InvalidArgument listing the known codes."""
    if code not in REGIONS:
        known = ", ".join(sorted(REGIONS))
        raise InvalidArgument(f"unknown region code {code!r}: expected one of {known}")
    return code


def region_name(code: str) -> str:
    return REGIONS.get(code, code)


#: What each region's state in a consolidated view is called, in the directory's audit
#: detail (spaces as dashes) and wherever a person reads it.
REGION_STATE_NAMES: dict[pb.RegionState.ValueType, str] = {
    pb.REGION_STATE_ANSWERED: "answered",
    pb.REGION_STATE_UNAVAILABLE: "unavailable",
    pb.REGION_STATE_DEADLINE_EXCEEDED: "deadline exceeded",
    pb.REGION_STATE_REFUSED: "refused",
    pb.REGION_STATE_FAILED: "failed",
}

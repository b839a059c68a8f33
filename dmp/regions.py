"""Regions of the federation, by INSEE region code."""

from __future__ import annotations

from dmp.errors import InvalidArgument

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

"""The INS, the national health identifier: a 13-character NIR and its 2-digit key.

The key is 97 - (NIR mod 97), where the Corsican departments 2A and 2B count as 19 and 18.
"""

from __future__ import annotations

import re

from dmp.errors import InvalidArgument

_NIR = re.compile(r"^[123478]\d{4}(\d{2}|2A|2B)\d{6}$")


def _numeric(nir: str) -> int:
    return int(nir[:5] + nir[5:7].replace("2A", "19").replace("2B", "18") + nir[7:])


def ins_key(nir: str) -> str:
    """The 2-digit key of a 13-character NIR."""
    return f"{97 - _numeric(nir) % 97:02d}"


def normalize_ins(value: str, field: str = "ins") -> str:
    """Return the INS without spaces, or raise InvalidArgument saying what is wrong."""
    ins = value.replace(" ", "").upper()
    if not ins:
        raise InvalidArgument(f"{field} is required: the 15-character INS (NIR and key)")
    if len(ins) != 15:
        raise InvalidArgument(
            f"{field} {value!r} must have 15 characters (13-character NIR and 2-digit key),"
            f" not {len(ins)}"
        )
    nir, key = ins[:13], ins[13:]
    if not _NIR.match(nir) or not key.isdigit():
        raise InvalidArgument(f"{field} {value!r} is not a NIR followed by a 2-digit key")
    expected = ins_key(nir)
    if key != expected:
        raise InvalidArgument(
            f"{field} {value!r} has a wrong key {key}: the NIR's key is {expected}"
        )
    return ins


#: INS found valid as stored, remembered (a bounded number): a stream of records names
#: the same patients again and again, and the key check is the costly part.
_STORED_OK: set[str] = set()
_STORED_OK_MAX = 1 << 16


def stored_ins(value: str, field: str) -> str:
    """The INS of something a node stores: valid and written as stored (no spaces, upper
    case), since a patient's data is found, read and audited under that one spelling."""
    if value in _STORED_OK:
        return value
    ins = normalize_ins(value, field)
    if ins != value:
        raise InvalidArgument(
            f"{field} {value!r} must be written as {ins} (no spaces, upper case): the"
            " patient's data is found, read and audited under that INS"
        )
    if len(_STORED_OK) >= _STORED_OK_MAX:
        _STORED_OK.clear()
    _STORED_OK.add(ins)
    return ins


def make_ins(nir: str) -> str:
    """The INS of a NIR: the NIR followed by its key."""
    if not _NIR.match(nir):
        raise InvalidArgument(f"{nir!r} is not a 13-character NIR")
    return nir + ins_key(nir)

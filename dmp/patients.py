"""Patient identity traits: validation and the comparison that refuses to merge two people."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from dmp.errors import InvalidArgument
from dmp.ins import normalize_ins
from dmp.v1 import patient_pb2

SEX_CODES = {
    patient_pb2.SEX_FEMALE: "F",
    patient_pb2.SEX_MALE: "M",
    patient_pb2.SEX_UNDETERMINED: "I",
}
SEX_VALUES = {code: value for value, code in SEX_CODES.items()}
_BIRTHPLACE = re.compile(r"^(\d{5}|2[AB]\d{3})$")

IDENTITY_CONFLICT = "IDENTITY_CONFLICT"
TRAIT_NAMES = ("birth_family_name", "given_names", "birth_date", "sex", "birthplace_code")


@dataclass(frozen=True, slots=True)
class Traits:
    """Identity traits in a comparable form (upper case, no accents, single spaces)."""

    ins: str
    birth_family_name: str = ""
    given_names: str = ""
    birth_date: str = ""
    sex: str = ""
    birthplace_code: str = ""

    @property
    def complete(self) -> bool:
        return all(
            (
                self.birth_family_name,
                self.given_names,
                self.birth_date,
                self.sex,
                self.birthplace_code,
            )
        )

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.birth_family_name,
                self.given_names,
                self.birth_date,
                self.sex,
                self.birthplace_code,
            )
        )

    def contradicts(self, other: Traits) -> list[str]:
        """The traits both give with different values (a missing trait contradicts nothing)."""
        names = ("birth_family_name", "given_names", "birth_date", "sex", "birthplace_code")
        return [
            name
            for name in names
            if getattr(self, name)
            and getattr(other, name)
            and getattr(self, name) != getattr(other, name)
        ]

    def to_proto(self) -> patient_pb2.PatientIdentity:
        return patient_pb2.PatientIdentity(
            ins=self.ins,
            birth_family_name=self.birth_family_name,
            given_names=self.given_names.split(" ") if self.given_names else [],
            birth_date=self.birth_date,
            sex=SEX_VALUES.get(self.sex, patient_pb2.SEX_UNSPECIFIED),
            birthplace_code=self.birthplace_code,
        )


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(plain.upper().replace("-", " ").split())


def traits_of(
    identity: patient_pb2.PatientIdentity, field: str = "patient", *, require_all: bool = False
) -> Traits:
    """Validated, comparable traits of an identity; InvalidArgument names the bad field."""
    ins = normalize_ins(identity.ins, f"{field}.ins")
    birth_date = identity.birth_date.strip()
    if birth_date:
        try:
            date.fromisoformat(birth_date)
        except ValueError:
            raise InvalidArgument(
                f"{field}.birth_date {birth_date!r} is not a date YYYY-MM-DD"
            ) from None
    sex = ""
    if identity.sex != patient_pb2.SEX_UNSPECIFIED:
        if identity.sex not in SEX_CODES:
            raise InvalidArgument(f"{field}.sex {identity.sex} is not a known value")
        sex = SEX_CODES[identity.sex]
    birthplace = identity.birthplace_code.strip().upper()
    if birthplace and not _BIRTHPLACE.match(birthplace):
        raise InvalidArgument(
            f"{field}.birthplace_code {birthplace!r} must be a 5-character INSEE code"
        )
    traits = Traits(
        ins=ins,
        birth_family_name=_fold(identity.birth_family_name),
        given_names=_fold(" ".join(identity.given_names)),
        birth_date=birth_date,
        sex=sex,
        birthplace_code=birthplace,
    )
    if require_all and not traits.complete:
        missing = [
            name
            for name in ("birth_family_name", "given_names", "birth_date", "sex", "birthplace_code")
            if not getattr(traits, name)
        ]
        raise InvalidArgument(f"{field}: missing identity traits: {', '.join(missing)}")
    return traits


def conflict_message(ins: str, fields: list[str]) -> str:
    return (
        f"identity conflict for INS {ins}: {', '.join(fields)} differ from the identity already"
        " known; kept for review, check the patient's identity document"
    )


class TraitColumns:
    """The identity trait columns of a patient table (the node's and the directory's)."""

    birth_family_name: Mapped[str] = mapped_column(String(100))
    given_names: Mapped[str] = mapped_column(String(200))
    birth_date: Mapped[str] = mapped_column(String(10))
    sex: Mapped[str] = mapped_column(String(1))
    birthplace_code: Mapped[str] = mapped_column(String(5))

    @staticmethod
    def values(traits: Traits) -> dict[str, str]:
        return {name: getattr(traits, name) for name in TRAIT_NAMES}

    def traits(self) -> Traits:
        return Traits(getattr(self, "ins"), *(getattr(self, name) for name in TRAIT_NAMES))  # noqa: B009

    def fill(self, traits: Traits) -> None:
        """Add the traits this row does not have yet (never change one it has)."""
        for name in TRAIT_NAMES:
            if not getattr(self, name) and getattr(traits, name):
                setattr(self, name, getattr(traits, name))

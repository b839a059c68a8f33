"""The synthetic data generator: valid and unique INS, determinism, coherent records."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import pytest

from dmp import synth
from dmp.errors import InvalidArgument
from dmp.identity import PROFESSIONS
from dmp.ins import normalize_ins
from dmp.regions import METROPOLITAN
from dmp.v1 import patient_pb2, record_pb2

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

EXPECTED_KINDS = {
    "11488-4": record_pb2.RECORD_KIND_DOCUMENT,
    "18842-5": record_pb2.RECORD_KIND_DOCUMENT,
    "34117-2": record_pb2.RECORD_KIND_DOCUMENT,
    "11502-2": record_pb2.RECORD_KIND_DOCUMENT,
    "18748-4": record_pb2.RECORD_KIND_DOCUMENT,
    "57833-6": record_pb2.RECORD_KIND_PRESCRIPTION,
    "60593-1": record_pb2.RECORD_KIND_DISPENSATION,
    "48765-2": record_pb2.RECORD_KIND_ALLERGY,
    "11369-6": record_pb2.RECORD_KIND_IMMUNIZATION,
    "11450-4": record_pb2.RECORD_KIND_CONDITION,
    "8716-3": record_pb2.RECORD_KIND_OBSERVATION,
    "34133-9": record_pb2.RECORD_KIND_DOCUMENT,
    "11506-3": record_pb2.RECORD_KIND_DOCUMENT,
}


def _check_traits(ins: str, birth_date: str, sex: str, birthplace: str) -> None:
    """The identity traits agree with the NIR they travel with."""
    assert normalize_ins(ins) == ins
    born = date.fromisoformat(birth_date)
    assert 1930 <= born.year <= 2020
    assert ins[0] == ("1" if sex == "M" else "2")
    assert sex in {"F", "M"}
    assert ins[1:3] == f"{born.year % 100:02d}"
    assert ins[3:5] == f"{born.month:02d}"
    assert len(birthplace) == 5
    assert ins[5:10] == birthplace
    assert ins[10:13] != "000"


def test_patients_are_valid_and_unique() -> None:
    patients = synth.patients(20_000, seed=0)
    assert len(patients) == 20_000
    assert len({p.ins for p in patients}) == 20_000
    for patient in patients:
        _check_traits(patient.ins, patient.birth_date, patient.sex, patient.birthplace_code)
        assert patient.birth_family_name in synth.FAMILY_NAMES
        assert 1 <= len(patient.given_names) <= 3
        assert len(set(patient.given_names)) == len(patient.given_names)
        names = synth.FEMALE_GIVEN_NAMES if patient.sex == "F" else synth.MALE_GIVEN_NAMES
        assert set(patient.given_names) <= set(names)
        assert patient.home_region in METROPOLITAN
    # Corsican birth places (2A/2B in the NIR) and births abroad (99) are covered.
    places = Counter(p.birthplace_code[:2] for p in patients)
    assert places["2A"] and places["2B"] and places["99"]
    assert Counter(p.sex for p in patients)["F"] > 8_000
    # Most patients live in their region of birth when it is one of the regions.
    regions = dict((code, region) for code, _, region in synth.PLACES)
    at_home = sum(regions[p.birthplace_code] == p.home_region for p in patients)
    assert at_home > 20_000 // 2


def test_patients_respect_the_regions() -> None:
    patients = synth.patients(500, seed=4, regions=("53", "04"))
    assert {p.home_region for p in patients} == {"53", "04"}
    with pytest.raises(InvalidArgument):
        synth.patients(1, regions=("99",))
    with pytest.raises(ValueError):
        synth.patients(1, regions=())


def test_ins_for_index_is_a_bijection_onto_valid_ins() -> None:
    values = [synth.ins_for_index(i) for i in range(200_001)]
    assert len(set(values)) == len(values)
    for value in values:
        normalize_ins(value)
    last = synth.ins_for_index(synth.CAPACITY - 1)
    assert normalize_ins(last) == last
    assert synth.CAPACITY > 70_000_000
    for bad in (-1, synth.CAPACITY):
        with pytest.raises(ValueError):
            synth.ins_for_index(bad)


def test_patient_rows_agree_with_patients_and_ins_for_index() -> None:
    rows = list(synth.patient_rows(0, 3_000, seed=5))
    assert len(rows) == 3_000
    assert list(synth.patient_rows(1_000, 17, seed=5)) == rows[1_000:1_017]
    patients = synth.patients(3_000, seed=5)
    for index, (row, patient) in enumerate(zip(rows, patients, strict=True)):
        ins, family, given, birth_date, sex, birthplace = row
        assert ins == synth.ins_for_index(index, seed=5) == patient.ins
        assert (family, tuple(given.split(" ")), birth_date, sex, birthplace) == (
            patient.birth_family_name,
            patient.given_names,
            patient.birth_date,
            patient.sex,
            patient.birthplace_code,
        )
        _check_traits(ins, birth_date, sex, birthplace)
    assert synth.patient_at(2_999, seed=5) == patients[2_999]
    # Far indexes too, as a benchmark loading millions of patients in chunks reads them.
    far = list(synth.patient_rows(10_000_000, 1_000))
    assert len(far) == 1_000
    assert len({row[0] for row in far}) == 1_000
    assert far[0][0] == synth.ins_for_index(10_000_000)
    assert list(synth.patient_rows(5, 0)) == []


def test_generation_is_deterministic_for_a_seed() -> None:
    assert synth.patients(200, seed=7) == synth.patients(200, seed=7)
    assert synth.patients(200, seed=7) != synth.patients(200, seed=8)
    assert synth.patients(50, seed=7) == synth.patients(200, seed=7)[:50]
    patient = synth.patients(1, seed=7)[0]
    first = synth.records_for(patient, regions=("53", "11"), per_region=20, seed=3, now=NOW)
    again = synth.records_for(patient, regions=("53", "11"), per_region=20, seed=3, now=NOW)
    other = synth.records_for(patient, regions=("53", "11"), per_region=20, seed=4, now=NOW)
    assert first == again
    assert first != other
    assert synth.practitioners(30, seed=2) == synth.practitioners(30, seed=2)


def test_to_proto_carries_the_identity() -> None:
    patient = synth.patients(3, seed=1)[2]
    identity = patient.to_proto()
    assert isinstance(identity, patient_pb2.PatientIdentity)
    assert identity.ins == patient.ins
    assert identity.birth_family_name == patient.birth_family_name
    assert tuple(identity.given_names) == patient.given_names
    assert identity.birth_date == patient.birth_date
    assert identity.birthplace_code == patient.birthplace_code
    expected = patient_pb2.SEX_FEMALE if patient.sex == "F" else patient_pb2.SEX_MALE
    assert identity.sex == expected


def test_loinc_types_table() -> None:
    assert {code: t.kind for code, t in synth.LOINC_TYPES.items()} == EXPECTED_KINDS
    for code, document_type in synth.LOINC_TYPES.items():
        assert document_type.code == code
        assert document_type.display and document_type.title


def _check_pdf(content: bytes) -> None:
    assert content.startswith(b"%PDF-1.")
    assert content.rstrip().endswith(b"%%EOF")
    start = int(content.rsplit(b"startxref", 1)[1].split()[0])
    assert content[start:].startswith(b"xref")
    offsets = re.findall(rb"(\d{10}) 00000 n ", content[start:])
    for number, offset in enumerate(offsets, start=1):
        assert content[int(offset) :].startswith(b"%d 0 obj" % number)


@pytest.mark.parametrize("per_region", [0, 1, 2, 7, 40])
def test_records_for_counts_regions_and_kinds(per_region: int) -> None:
    regions = ("53", "11", "93", "04")
    for patient in synth.patients(5, seed=11):
        records = synth.records_for(patient, regions=regions, per_region=per_region, now=NOW)
        assert len(records) == per_region * len(regions)
        assert Counter(r.region for r in records) == (
            dict.fromkeys(regions, per_region) if per_region else {}
        )
        assert len({r.effective_time for r in records}) == len(records)
        born = datetime.fromisoformat(patient.birth_date).replace(tzinfo=UTC)
        for record in records:
            assert record.patient_ins == patient.ins
            assert record.type_system == "http://loinc.org"
            assert record.kind == EXPECTED_KINDS[record.type_code]
            assert record.type_display == synth.LOINC_TYPES[record.type_code].display
            assert record.title and record.organization
            assert record.effective_time.tzinfo is not None
            assert record.effective_time.utcoffset() == timedelta(0)
            assert NOW - timedelta(days=3660) <= record.effective_time <= NOW
            assert record.effective_time >= born
            assert record.content
            assert record.confidentiality in {
                record_pb2.CONFIDENTIALITY_NORMAL,
                record_pb2.CONFIDENTIALITY_RESTRICTED,
                record_pb2.CONFIDENTIALITY_VERY_RESTRICTED,
            }
            if record.content_type == "application/fhir+json":
                resource = json.loads(record.content)
                assert resource["resourceType"]
            elif record.content_type == "application/pdf":
                _check_pdf(record.content)
            else:
                assert record.content_type == "text/plain; charset=utf-8"
                record.content.decode("utf-8")


def test_records_mix_is_realistic() -> None:
    patient = synth.patients(1, seed=2)[0]
    records = synth.records_for(patient, regions=METROPOLITAN, per_region=60, now=NOW)
    kinds = Counter(r.kind for r in records)
    assert len(kinds) >= 7
    assert kinds[record_pb2.RECORD_KIND_DOCUMENT] > len(records) // 3
    assert kinds[record_pb2.RECORD_KIND_DISPENSATION] > 0
    assert kinds[record_pb2.RECORD_KIND_PRESCRIPTION] >= kinds[record_pb2.RECORD_KIND_DISPENSATION]
    confidentiality = Counter(r.confidentiality for r in records)
    assert confidentiality[record_pb2.CONFIDENTIALITY_NORMAL] > 0.9 * len(records)
    # Every dispensation follows a prescription of the same medication in its region.
    for region in METROPOLITAN:
        in_region = [r for r in records if r.region == region]
        for index, record in enumerate(in_region):
            if record.kind != record_pb2.RECORD_KIND_DISPENSATION:
                continue
            dispensed = json.loads(record.content)["medicationCodeableConcept"]
            prescribed = [
                json.loads(r.content)["medicationCodeableConcept"]
                for r in in_region[:index]
                if r.kind == record_pb2.RECORD_KIND_PRESCRIPTION
            ]
            assert dispensed in prescribed
            assert record.organization.startswith(("Pharmacie", "Grande Pharmacie"))
    titles = {r.title for r in records}
    assert {"Compte rendu de consultation", "Ordonnance", "Délivrance"} <= titles


def test_records_for_rejects_bad_arguments() -> None:
    patient = synth.patients(1)[0]
    with pytest.raises(ValueError):
        synth.records_for(patient, regions=("53",), per_region=-1, now=NOW)
    with pytest.raises(ValueError):
        synth.records_for(patient, regions=("53",), per_region=1, now=datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        synth.records_for(patient, regions=("53", "53"), per_region=1, now=NOW)
    with pytest.raises(InvalidArgument):
        synth.records_for(patient, regions=("00",), per_region=1, now=NOW)
    records = synth.records_for(patient, regions=("53",), per_region=3)
    assert all(r.effective_time <= datetime.now(UTC) for r in records)


def test_practitioners() -> None:
    practitioners = synth.practitioners(2_000, seed=1)
    assert len({rpps for rpps, _, _ in practitioners}) == 2_000
    professions = Counter(profession for _, profession, _ in practitioners)
    assert set(professions) == set(PROFESSIONS)
    assert professions.most_common(1)[0][0] == "doctor"
    for rpps, profession, name in practitioners:
        assert re.fullmatch(r"\d{11}", rpps)
        title, first, last = name.split(" ", 2)
        assert title in {"Dr", "Mme", "M."}
        if profession == "doctor":
            assert title == "Dr"
        assert first in synth.FEMALE_GIVEN_NAMES + synth.MALE_GIVEN_NAMES
        assert last == last.upper()

"""Synthetic data: patients, records and practitioners for the demo, the tests and the benchmarks.

Everything is deterministic from a seed and made up: no real person's data.

Patients. Patient number i of a seed (0 <= i < CAPACITY) is a pure function of (i, seed):
`patients(n)[i]`, `patient_at(i)` and row i of `patient_rows` describe the same person, whose
INS is `ins_for_index(i)`. The index goes through a bijection of [0, CAPACITY) (an affine
permutation picked by the seed) and the result is split into the NIR's fields: sex, birth
year and month, birth place and a 3-digit order number. Two indexes therefore never share an
INS, for any number of patients up to CAPACITY (over 200 million), and the identity traits
(sex, birth date, birth place) always agree with the NIR. Names and the day of birth come
from a hash of the index.

Records. `records_for` gives a patient a plausible history in each region: consultations,
prescriptions and their dispensations, laboratory reports, imaging, hospital letters,
allergies, immunizations, conditions and vital signs, typed with LOINC codes.
"""

from __future__ import annotations

import calendar
import functools
import json
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from dmp.identity import PROFESSIONS
from dmp.ins import make_ins
from dmp.regions import METROPOLITAN, check_region
from dmp.v1 import patient_pb2, record_pb2

__all__ = [
    "CAPACITY",
    "LOINC_SYSTEM",
    "LOINC_TYPES",
    "DocumentType",
    "SyntheticPatient",
    "SyntheticRecord",
    "ins_for_index",
    "patient_at",
    "patient_rows",
    "patients",
    "practitioners",
    "records_for",
]

# -- identity traits ------------------------------------------------------------------------

FAMILY_NAMES = (
    "MARTIN", "BERNARD", "THOMAS", "PETIT", "ROBERT", "RICHARD", "DURAND", "DUBOIS",
    "MOREAU", "LAURENT", "SIMON", "MICHEL", "LEFEBVRE", "LEROY", "ROUX", "DAVID",
    "BERTRAND", "MOREL", "FOURNIER", "GIRARD", "BONNET", "DUPONT", "LAMBERT", "FONTAINE",
    "ROUSSEAU", "VINCENT", "MULLER", "LEFEVRE", "FAURE", "ANDRE", "MERCIER", "BLANC",
    "GUERIN", "BOYER", "GARNIER", "CHEVALIER", "FRANCOIS", "LEGRAND", "GAUTHIER", "GARCIA",
    "PERRIN", "ROBIN", "CLEMENT", "MORIN", "NICOLAS", "HENRY", "ROUSSEL", "MATHIEU",
    "MASSON", "MARCHAND", "DUVAL", "DENIS", "DUMONT", "LEMAIRE", "NOEL", "MEYER",
    "DUFOUR", "MEUNIER", "BRUN", "BLANCHARD", "GIRAUD", "JOLY", "RIVIERE", "LUCAS",
    "BRUNET", "GAILLARD", "BARBIER", "ARNAUD", "LE GALL", "LE ROUX", "COLIN", "VIDAL",
)  # fmt: skip

FEMALE_GIVEN_NAMES = (
    "Marie", "Jeanne", "Françoise", "Monique", "Catherine", "Nathalie", "Isabelle", "Sylvie",
    "Martine", "Christine", "Sophie", "Valérie", "Sandrine", "Céline", "Aurélie", "Julie",
    "Camille", "Léa", "Manon", "Chloé", "Emma", "Inès", "Jade", "Louise", "Alice", "Lina",
    "Anne", "Hélène", "Claire", "Élise", "Juliette", "Margaux", "Pauline", "Lucie", "Sarah",
    "Mathilde", "Nicole", "Odette", "Simone", "Madeleine", "Anaïs", "Agathe",
)  # fmt: skip

MALE_GIVEN_NAMES = (
    "Jean", "Pierre", "Michel", "André", "Philippe", "Alain", "Bernard", "Jacques", "Daniel",
    "Patrick", "Nicolas", "Christophe", "Stéphane", "Sébastien", "Julien", "Thomas",
    "Alexandre", "Maxime", "Lucas", "Hugo", "Louis", "Gabriel", "Arthur", "Léo", "Jules",
    "Raphaël", "Paul", "Antoine", "François", "Olivier", "Éric", "Laurent", "Frédéric",
    "Guillaume", "Mathieu", "Vincent", "Yves", "René", "Marcel", "Henri", "Joseph", "Théo",
)  # fmt: skip

# Birth places: INSEE commune code (or 99xxx, a country abroad), name, region of the commune
# ("" abroad). For Paris, Marseille and Lyon the NIR carries the arrondissement.
PLACES: tuple[tuple[str, str, str], ...] = (
    ("75112", "Paris", "11"), ("75115", "Paris", "11"), ("75118", "Paris", "11"),
    ("75120", "Paris", "11"), ("75114", "Paris", "11"), ("92050", "Nanterre", "11"),
    ("92012", "Boulogne-Billancourt", "11"), ("93066", "Saint-Denis", "11"),
    ("94028", "Créteil", "11"), ("78646", "Versailles", "11"), ("95500", "Pontoise", "11"),
    ("77288", "Meaux", "11"), ("91228", "Évry-Courcouronnes", "11"),
    ("45234", "Orléans", "24"), ("37261", "Tours", "24"), ("18033", "Bourges", "24"),
    ("28085", "Chartres", "24"), ("41018", "Blois", "24"), ("36044", "Châteauroux", "24"),
    ("21231", "Dijon", "27"), ("25056", "Besançon", "27"), ("89024", "Auxerre", "27"),
    ("71270", "Mâcon", "27"), ("58194", "Nevers", "27"), ("90010", "Belfort", "27"),
    ("76540", "Rouen", "28"), ("14118", "Caen", "28"), ("76351", "Le Havre", "28"),
    ("50129", "Cherbourg-en-Cotentin", "28"), ("27229", "Évreux", "28"),
    ("61001", "Alençon", "28"),
    ("59350", "Lille", "32"), ("80021", "Amiens", "32"), ("62041", "Arras", "32"),
    ("59183", "Dunkerque", "32"), ("60057", "Beauvais", "32"), ("02691", "Saint-Quentin", "32"),
    ("67482", "Strasbourg", "44"), ("57463", "Metz", "44"), ("54395", "Nancy", "44"),
    ("51454", "Reims", "44"), ("68224", "Mulhouse", "44"), ("10387", "Troyes", "44"),
    ("88160", "Épinal", "44"), ("08105", "Charleville-Mézières", "44"),
    ("44109", "Nantes", "52"), ("49007", "Angers", "52"), ("72181", "Le Mans", "52"),
    ("85191", "La Roche-sur-Yon", "52"), ("53130", "Laval", "52"),
    ("44184", "Saint-Nazaire", "52"),
    ("35238", "Rennes", "53"), ("29019", "Brest", "53"), ("29232", "Quimper", "53"),
    ("56260", "Vannes", "53"), ("22278", "Saint-Brieuc", "53"), ("56121", "Lorient", "53"),
    ("35288", "Saint-Malo", "53"),
    ("33063", "Bordeaux", "75"), ("87085", "Limoges", "75"), ("86194", "Poitiers", "75"),
    ("64445", "Pau", "75"), ("17300", "La Rochelle", "75"), ("79191", "Niort", "75"),
    ("16015", "Angoulême", "75"), ("24322", "Périgueux", "75"), ("64102", "Bayonne", "75"),
    ("31555", "Toulouse", "76"), ("34172", "Montpellier", "76"), ("30189", "Nîmes", "76"),
    ("66136", "Perpignan", "76"), ("11069", "Carcassonne", "76"), ("81004", "Albi", "76"),
    ("12202", "Rodez", "76"), ("65440", "Tarbes", "76"), ("82121", "Montauban", "76"),
    ("69383", "Lyon", "84"), ("69387", "Lyon", "84"), ("42218", "Saint-Étienne", "84"),
    ("38185", "Grenoble", "84"), ("63113", "Clermont-Ferrand", "84"),
    ("74010", "Annecy", "84"), ("73065", "Chambéry", "84"), ("26362", "Valence", "84"),
    ("01053", "Bourg-en-Bresse", "84"), ("15014", "Aurillac", "84"),
    ("13201", "Marseille", "93"), ("13205", "Marseille", "93"), ("13208", "Marseille", "93"),
    ("06088", "Nice", "93"), ("83137", "Toulon", "93"), ("84007", "Avignon", "93"),
    ("13001", "Aix-en-Provence", "93"), ("05061", "Gap", "93"),
    ("2A004", "Ajaccio", "94"), ("2B033", "Bastia", "94"), ("2A247", "Porto-Vecchio", "94"),
    ("97120", "Pointe-à-Pitre", "01"), ("97105", "Basse-Terre", "01"),
    ("97209", "Fort-de-France", "02"), ("97213", "Le Lamentin", "02"),
    ("97302", "Cayenne", "03"), ("97311", "Saint-Laurent-du-Maroni", "03"),
    ("97411", "Saint-Denis", "04"), ("97416", "Saint-Pierre", "04"),
    ("97611", "Mamoudzou", "06"),
    ("99350", "Maroc", ""), ("99352", "Algérie", ""), ("99351", "Tunisie", ""),
    ("99139", "Portugal", ""), ("99127", "Italie", ""), ("99134", "Espagne", ""),
)  # fmt: skip

FIRST_BIRTH_YEAR = 1930
LAST_BIRTH_YEAR = 2020
_YEARS = LAST_BIRTH_YEAR - FIRST_BIRTH_YEAR + 1  # two-digit years 30..99 and 00..20: no overlap
_ORDERS = 999  # order numbers 001..999
_HEADS = 2 * _YEARS * 12  # sex, birth year, birth month

CAPACITY = _HEADS * len(PLACES) * _ORDERS
"""How many distinct synthetic patients (INS) one seed can produce."""

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True, slots=True)
class _Head:
    """Sex, birth year and month: the NIR's first five characters and what goes with them."""

    nir: str
    nir_mod97: int  # (these five digits * 10**8) mod 97
    sex: str
    date_prefix: str  # "YYYY-MM-"
    days: int


def _heads() -> tuple[_Head, ...]:
    heads = []
    for sex_digit, sex in ((1, "M"), (2, "F")):
        for year in range(FIRST_BIRTH_YEAR, LAST_BIRTH_YEAR + 1):
            for month in range(1, 13):
                nir = f"{sex_digit}{year % 100:02d}{month:02d}"
                heads.append(
                    _Head(
                        nir=nir,
                        nir_mod97=int(nir) * 10**8 % 97,
                        sex=sex,
                        date_prefix=f"{year:04d}-{month:02d}-",
                        days=calendar.monthrange(year, month)[1],
                    )
                )
    return tuple(heads)


_HEAD_TABLE = _heads()
_PLACE_CODES = tuple(code for code, _, _ in PLACES)
_PLACE_MOD97 = tuple(
    int(code.replace("2A", "19").replace("2B", "18")) * 1000 % 97 for code in _PLACE_CODES
)
_PLACE_REGIONS = tuple(region for _, _, region in PLACES)
_ORDER_TEXT = tuple(f"{order:03d}" for order in range(_ORDERS + 1))
_KEY_TEXT = tuple(f"{key:02d}" for key in range(98))
_DAY_TEXT = tuple(f"{day:02d}" for day in range(32))


@functools.lru_cache(maxsize=128)
def _permutation(seed: int) -> tuple[int, int, int]:
    """Multiplier and offset of the seed's affine bijection of [0, CAPACITY), and a salt."""
    rng = random.Random(f"dmp.synth.patients:{seed}")
    while True:
        multiplier = rng.randrange(CAPACITY // 4, 3 * CAPACITY // 4)
        if math.gcd(multiplier, CAPACITY) == 1:
            break
    return multiplier, rng.randrange(CAPACITY), rng.getrandbits(64)


def _check_index(index: int) -> None:
    if not 0 <= index < CAPACITY:
        raise ValueError(f"patient index {index} out of range: 0 <= index < {CAPACITY}")


def ins_for_index(i: int, *, seed: int = 0) -> str:
    """The INS of synthetic patient number i: a bijection of [0, CAPACITY) onto valid INS."""
    _check_index(i)
    multiplier, offset, _ = _permutation(seed)
    point = (i * multiplier + offset) % CAPACITY
    rest, order = divmod(point, _ORDERS)
    head_index, place = divmod(rest, len(PLACES))
    return make_ins(_HEAD_TABLE[head_index].nir + _PLACE_CODES[place] + _ORDER_TEXT[order + 1])


def patient_rows(
    start: int, count: int, *, seed: int = 0
) -> Iterator[tuple[str, str, str, str, str, str]]:
    """Patients start .. start+count-1 as tuples, fast (bulk loads of millions of patients).

    Each row is (ins, birth_family_name, given names joined by spaces, birth_date, sex,
    birthplace_code), the same person as `patient_at(index, seed=seed)`.
    """
    if count < 0:
        raise ValueError(f"count must not be negative, not {count}")
    if count:
        _check_index(start)
        _check_index(start + count - 1)
    multiplier, offset, salt = _permutation(seed)
    heads, place_codes, place_mods = _HEAD_TABLE, _PLACE_CODES, _PLACE_MOD97
    orders, keys, days = _ORDER_TEXT, _KEY_TEXT, _DAY_TEXT
    families, n_families = FAMILY_NAMES, len(FAMILY_NAMES)
    female, n_female = FEMALE_GIVEN_NAMES, len(FEMALE_GIVEN_NAMES)
    male, n_male = MALE_GIVEN_NAMES, len(MALE_GIVEN_NAMES)
    n_places, capacity, mask = len(PLACES), CAPACITY, _MASK64
    point = (start * multiplier + offset) % capacity
    for _ in range(count):
        rest, order = divmod(point, _ORDERS)
        head_index, place = divmod(rest, n_places)
        head = heads[head_index]
        order += 1
        key = 97 - (head.nir_mod97 + place_mods[place] + order) % 97
        place_code = place_codes[place]
        h = ((point ^ salt) * _GOLDEN) & mask
        h ^= h >> 29
        if head.sex == "F":
            given, n_given = female, n_female
        else:
            given, n_given = male, n_male
        first = (h >> 8) % n_given
        how_many = (h >> 20) % 20
        if how_many < 10:
            given_names = given[first]
        else:
            second = (first + 1 + (h >> 28) % (n_given - 1)) % n_given
            given_names = given[first] + " " + given[second]
            if how_many >= 17:
                third = (first + 1 + (h >> 38) % (n_given - 1)) % n_given
                if third != second:
                    given_names += " " + given[third]
        yield (
            head.nir + place_code + orders[order] + keys[key],
            families[h % n_families],
            given_names,
            head.date_prefix + days[1 + (h >> 48) % head.days],
            head.sex,
            place_code,
        )
        point += multiplier
        if point >= capacity:
            point -= capacity


@dataclass(frozen=True)
class SyntheticPatient:
    """A made-up patient: INS and the identity traits that travel with it."""

    ins: str
    birth_family_name: str
    given_names: tuple[str, ...]
    birth_date: str  # ISO 8601 "YYYY-MM-DD"
    sex: str  # "F" or "M"
    birthplace_code: str  # INSEE commune code, or 99xxx for a country abroad
    home_region: str  # INSEE code of the region the patient lives in

    def to_proto(self) -> patient_pb2.PatientIdentity:
        return patient_pb2.PatientIdentity(
            ins=self.ins,
            birth_family_name=self.birth_family_name,
            given_names=list(self.given_names),
            birth_date=self.birth_date,
            sex=patient_pb2.SEX_FEMALE if self.sex == "F" else patient_pb2.SEX_MALE,
            birthplace_code=self.birthplace_code,
        )

    @property
    def display_name(self) -> str:
        return f"{self.given_names[0]} {self.birth_family_name}"


def _home_region(row: tuple[str, ...], index: int, seed: int, regions: Sequence[str]) -> str:
    """Mostly the region of birth when it is among `regions`, else one of `regions`."""
    birth_region = _PLACE_REGIONS[_PLACE_CODES.index(row[5])]
    h = (((index + 1) * _GOLDEN) ^ _permutation(seed)[2]) & _MASK64
    h ^= h >> 31
    if birth_region in regions and h % 4 != 0:
        return birth_region
    return regions[(h >> 8) % len(regions)]


def _check_regions(regions: Sequence[str]) -> tuple[str, ...]:
    checked = tuple(check_region(region) for region in regions)
    if not checked:
        raise ValueError("at least one region is needed")
    if len(set(checked)) != len(checked):
        raise ValueError(f"regions must be distinct: {', '.join(checked)}")
    return checked


def _patient(row: tuple[str, str, str, str, str, str], home_region: str) -> SyntheticPatient:
    ins, family, given, birth_date, sex, place = row
    return SyntheticPatient(
        ins, family, tuple(given.split(" ")), birth_date, sex, place, home_region
    )


def patient_at(i: int, *, seed: int = 0, regions: Sequence[str] = METROPOLITAN) -> SyntheticPatient:
    """Synthetic patient number i of the seed (the same as patients(n, seed=seed)[i])."""
    checked = _check_regions(regions)
    row = next(patient_rows(i, 1, seed=seed))
    return _patient(row, _home_region(row, i, seed, checked))


def patients(
    n: int, *, seed: int = 0, regions: Sequence[str] = METROPOLITAN
) -> list[SyntheticPatient]:
    """n distinct synthetic patients (distinct INS), living in the given regions."""
    if not 0 <= n <= CAPACITY:
        raise ValueError(f"n must be between 0 and {CAPACITY}, not {n}")
    checked = _check_regions(regions)
    return [
        _patient(row, _home_region(row, index, seed, checked))
        for index, row in enumerate(patient_rows(0, n, seed=seed))
    ]


# -- practitioners --------------------------------------------------------------------------

_PROFESSION_WEIGHTS = {
    "doctor": 45,
    "pharmacist": 18,
    "nurse": 22,
    "midwife": 5,
    "dentist": 6,
    "physiotherapist": 4,
}
_DOCTOR_TITLE = {"doctor", "dentist", "pharmacist"}


def _luhn_digit(digits: str) -> str:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return str((10 - total % 10) % 10)


def practitioners(n: int, *, seed: int = 0) -> list[tuple[str, str, str]]:
    """n practitioners: (RPPS, profession, display name), RPPS distinct and Luhn-checked."""
    if not 0 <= n <= 10**8:
        raise ValueError(f"n must be between 0 and 100000000, not {n}")
    rng = random.Random(f"dmp.synth.practitioners:{seed}")
    professions = [p for p in PROFESSIONS if p in _PROFESSION_WEIGHTS]
    weights = [_PROFESSION_WEIGHTS[p] for p in professions]
    result = []
    for number in rng.sample(range(10**8), n):
        body = f"10{number:08d}"
        profession = rng.choices(professions, weights)[0]
        female = rng.random() < 0.55
        first = rng.choice(FEMALE_GIVEN_NAMES if female else MALE_GIVEN_NAMES)
        last = rng.choice(FAMILY_NAMES)
        title = "Dr" if profession in _DOCTOR_TITLE else ("Mme" if female else "M.")
        result.append((body + _luhn_digit(body), profession, f"{title} {first} {last}"))
    return result


# -- records --------------------------------------------------------------------------------

LOINC_SYSTEM = "http://loinc.org"
INS_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
"""FHIR identifier system of the INS (NIR)."""


@dataclass(frozen=True)
class DocumentType:
    """A LOINC document type, the record kind it goes with and its usual French title."""

    code: str
    display: str
    kind: int
    title: str


LOINC_TYPES: Mapping[str, DocumentType] = {
    t.code: t
    for t in (
        DocumentType(
            "11488-4",
            "Consultation note",
            record_pb2.RECORD_KIND_DOCUMENT,
            "Compte rendu de consultation",
        ),
        DocumentType(
            "18842-5",
            "Discharge summary",
            record_pb2.RECORD_KIND_DOCUMENT,
            "Compte rendu d'hospitalisation",
        ),
        DocumentType(
            "34117-2",
            "History and physical note",
            record_pb2.RECORD_KIND_DOCUMENT,
            "Observation médicale d'entrée",
        ),
        DocumentType(
            "11502-2", "Laboratory report", record_pb2.RECORD_KIND_DOCUMENT, "Bilan biologique"
        ),
        DocumentType(
            "18748-4",
            "Diagnostic imaging study",
            record_pb2.RECORD_KIND_DOCUMENT,
            "Compte rendu d'imagerie",
        ),
        DocumentType(
            "57833-6",
            "Prescription for medication",
            record_pb2.RECORD_KIND_PRESCRIPTION,
            "Ordonnance",
        ),
        DocumentType(
            "60593-1", "Medication dispensed", record_pb2.RECORD_KIND_DISPENSATION, "Délivrance"
        ),
        DocumentType(
            "48765-2",
            "Allergies and adverse reactions",
            record_pb2.RECORD_KIND_ALLERGY,
            "Allergie",
        ),
        DocumentType(
            "11369-6",
            "History of immunization",
            record_pb2.RECORD_KIND_IMMUNIZATION,
            "Vaccination",
        ),
        DocumentType(
            "11450-4", "Problem list", record_pb2.RECORD_KIND_CONDITION, "Problème de santé"
        ),
        DocumentType(
            "8716-3", "Vital signs", record_pb2.RECORD_KIND_OBSERVATION, "Constantes vitales"
        ),
        DocumentType(
            "34133-9",
            "Summary of episode note",
            record_pb2.RECORD_KIND_DOCUMENT,
            "Compte rendu de passage aux urgences",
        ),
        DocumentType("11506-3", "Progress note", record_pb2.RECORD_KIND_DOCUMENT, "Note de suivi"),
    )
}
"""LOINC code -> document type."""


@dataclass(frozen=True)
class SyntheticRecord:
    """A made-up record of a patient in one region, with its content."""

    patient_ins: str
    region: str
    kind: int  # record_pb2.RecordKind value
    type_system: str
    type_code: str
    type_display: str
    title: str
    organization: str
    effective_time: datetime  # tz-aware, UTC
    content_type: str
    content: bytes
    confidentiality: int  # record_pb2.Confidentiality value

    def to_proto(self, record_id: str = "") -> record_pb2.Record:
        """The record's metadata as a writer sends it in PutRecord."""
        record = record_pb2.Record(
            id=record_id,
            patient_ins=self.patient_ins,
            kind=self.kind,  # type: ignore[arg-type]
            type_code=record_pb2.Coding(
                system=self.type_system, code=self.type_code, display=self.type_display
            ),
            title=self.title,
            organization=self.organization,
            content_type=self.content_type,
            confidentiality=self.confidentiality,  # type: ignore[arg-type]
        )
        record.effective_time.FromDatetime(self.effective_time)
        return record


_HOSPITALS = {
    "11": "AP-HP, Hôpital Bichat",
    "24": "CHU de Tours",
    "27": "CHU Dijon Bourgogne",
    "28": "CHU de Rouen",
    "32": "CHU de Lille",
    "44": "Hôpitaux universitaires de Strasbourg",
    "52": "CHU de Nantes",
    "53": "CHU de Rennes",
    "75": "CHU de Bordeaux",
    "76": "CHU de Toulouse",
    "84": "Hospices civils de Lyon",
    "93": "AP-HM, Hôpital de la Timone",
    "94": "Centre hospitalier d'Ajaccio",
    "01": "CHU de la Guadeloupe",
    "02": "CHU de Martinique",
    "03": "Centre hospitalier de Cayenne",
    "04": "CHU de La Réunion",
    "06": "Centre hospitalier de Mayotte",
}
_PRACTICES = ("du Parc", "des Lilas", "de la Gare", "du Centre", "Pasteur", "des Tilleuls",
              "Victor Hugo", "de l'Église", "Jean Jaurès", "du Port")  # fmt: skip
_PHARMACIES = ("Pharmacie du Marché", "Pharmacie de la Mairie", "Pharmacie centrale",
               "Grande Pharmacie", "Pharmacie des Halles", "Pharmacie de la Poste",
               "Pharmacie du Port", "Pharmacie Saint-Michel")  # fmt: skip

_MOTIVES = (
    ("toux persistante depuis dix jours", "auscultation pulmonaire normale",
     "bronchite aiguë probablement virale", "traitement symptomatique, revoir si fièvre"),
    ("douleurs lombaires", "raideur lombaire sans signe neurologique",
     "lombalgie commune", "antalgiques, kinésithérapie, reprise d'activité progressive"),
    ("renouvellement de traitement", "tension artérielle 132/84, examen sans particularité",
     "hypertension artérielle équilibrée", "poursuite du traitement, bilan dans six mois"),
    ("fièvre et mal de gorge", "amygdales érythémateuses, test rapide positif",
     "angine streptococcique", "antibiothérapie sept jours"),
    ("fatigue", "examen clinique normal", "asthénie sans signe de gravité",
     "bilan biologique prescrit"),
    ("suivi de diabète", "pieds sans lésion, poids stable", "diabète de type 2 équilibré",
     "HbA1c dans trois mois, consultation ophtalmologique annuelle"),
    ("entorse de cheville", "œdème latéral, appui possible", "entorse bénigne",
     "contention, glace, repos relatif"),
    ("certificat de sport", "examen cardio-vasculaire normal", "pas de contre-indication",
     "certificat remis"),
)  # fmt: skip

_HOSPITAL_STAYS = (
    ("pneumopathie communautaire", "antibiothérapie intraveineuse puis orale"),
    ("décompensation cardiaque", "diurétiques, adaptation du traitement"),
    ("appendicite aiguë", "appendicectomie cœlioscopique sans complication"),
    ("fracture du col du fémur", "prothèse intermédiaire, rééducation"),
    ("pyélonéphrite aiguë", "antibiothérapie adaptée à l'antibiogramme"),
    ("malaise vagal", "surveillance, bilan cardiologique normal"),
)  # fmt: skip

_EMERGENCIES = (
    ("plaie de la main", "suture, vaccination antitétanique vérifiée"),
    ("douleur thoracique", "ECG et troponine normaux, retour à domicile"),
    ("traumatisme du poignet", "radiographie sans fracture, attelle"),
    ("crise d'asthme", "aérosols, amélioration rapide"),
    ("colique néphrétique", "antalgiques, échographie de contrôle"),
)  # fmt: skip

_IMAGING = (
    ("Radiographie thoracique", "pas de foyer parenchymateux, cœur de taille normale"),
    ("Échographie abdominale", "foie, vésicule, reins et rate sans anomalie"),
    ("IRM du genou droit", "fissure méniscale interne, pas de lésion ligamentaire"),
    ("Scanner cérébral", "pas de lésion hémorragique ni ischémique récente"),
    ("Échographie cardiaque", "fonction ventriculaire gauche conservée"),
    ("Radiographie du rachis lombaire", "discarthrose L4-L5 modérée"),
)  # fmt: skip

# (name, [(LOINC, display, unit, low, high)])
_LAB_PANELS: tuple[tuple[str, tuple[tuple[str, str, str, float, float], ...]], ...] = (
    ("Hémogramme", (("718-7", "Hémoglobine", "g/dL", 12.0, 17.0),
                    ("6690-2", "Leucocytes", "10*9/L", 4.0, 10.0),
                    ("777-3", "Plaquettes", "10*9/L", 150.0, 400.0))),
    ("Ionogramme et créatinine", (("2951-2", "Sodium", "mmol/L", 135.0, 145.0),
                                  ("2823-3", "Potassium", "mmol/L", 3.5, 5.0),
                                  ("2160-0", "Créatinine", "µmol/L", 50.0, 110.0))),
    ("Bilan lipidique", (("2093-3", "Cholestérol total", "g/L", 1.5, 2.5),
                         ("2085-9", "Cholestérol HDL", "g/L", 0.4, 0.8),
                         ("2571-8", "Triglycérides", "g/L", 0.5, 1.7))),
    ("Glycémie et HbA1c", (("2345-7", "Glucose", "g/L", 0.7, 1.1),
                           ("4548-4", "Hémoglobine glyquée", "%", 4.5, 6.5))),
    ("TSH", (("3016-3", "TSH", "mUI/L", 0.4, 4.0),)),
    ("CRP", (("1988-5", "Protéine C réactive", "mg/L", 0.0, 5.0),)),
)  # fmt: skip

_MEDICATIONS = (
    ("amoxicilline 1 g", "1 comprimé matin et soir pendant 7 jours", 1),
    ("paracétamol 1 g", "1 comprimé jusqu'à 3 fois par jour si douleur", 1),
    ("ibuprofène 400 mg", "1 comprimé 3 fois par jour pendant 5 jours", 1),
    ("lévothyroxine 75 µg", "1 comprimé le matin à jeun", 3),
    ("metformine 850 mg", "1 comprimé matin et soir", 3),
    ("amlodipine 5 mg", "1 comprimé par jour", 3),
    ("atorvastatine 20 mg", "1 comprimé le soir", 3),
    ("ramipril 5 mg", "1 comprimé par jour", 3),
    ("oméprazole 20 mg", "1 gélule le matin", 2),
    ("salbutamol 100 µg/dose", "2 bouffées si gêne respiratoire", 1),
)  # fmt: skip

_ALLERGIES = ("pénicillines", "pollens de graminées", "arachide", "acariens", "latex",
              "acide acétylsalicylique", "produits de contraste iodés",
              "venin de guêpe")  # fmt: skip
_VACCINES = ("grippe saisonnière", "COVID-19", "diphtérie, tétanos, poliomyélite (rappel)",
             "rougeole, oreillons, rubéole", "hépatite B", "pneumocoque", "zona")  # fmt: skip
_CONDITIONS = ("hypertension artérielle", "diabète de type 2", "asthme", "hypothyroïdie",
               "dyslipidémie", "lombalgie chronique", "bronchopneumopathie chronique obstructive",
               "fibrillation atriale", "migraine")  # fmt: skip

_JSON = "application/fhir+json"
_TEXT = "text/plain; charset=utf-8"
_PDF = "application/pdf"


def _de(city: str) -> str:
    """French "de <city>" with elision and contraction."""
    if city.startswith("Le "):
        return "du " + city[3:]
    if city.startswith("Les "):
        return "des " + city[4:]
    if city[0] in "AEIOUYÉÈÊÎÔÂ":
        return "d'" + city
    return "de " + city


def _cities(region: str) -> list[str]:
    return list(dict.fromkeys(name for _, name, r in PLACES if r == region))


def _fhir(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode()


def _text(lines: Sequence[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _pdf(lines: Sequence[str]) -> bytes:
    """A minimal one-page PDF showing the lines (Helvetica, WinAnsi encoding)."""

    def escape(line: str) -> bytes:
        raw = line.encode("cp1252", errors="replace")
        return raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")

    text = b"BT /F1 11 Tf 56 780 Td 15 TL " + b" ".join(
        b"(" + escape(line) + b") Tj T*" for line in lines
    )
    stream = text + b" ET"
    objects = (
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842]"
        b" /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    )
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


class _History:
    """Builds the records of one patient in one region."""

    def __init__(
        self,
        patient: SyntheticPatient,
        region: str,
        rng: random.Random,
        window: tuple[int, int],
        used: set[int],
    ) -> None:
        self.patient = patient
        self.region = region
        self.rng = rng
        self.window = window
        self.used = used
        cities = _cities(region) or ["Paris"]
        self.city = rng.choice(cities)
        self.cities = cities
        self.practice = f"Cabinet médical {rng.choice(_PRACTICES)}, {self.city}"
        self.pharmacy = f"{rng.choice(_PHARMACIES)}, {self.city}"
        self.records: list[SyntheticRecord] = []

    # -- helpers -----------------------------------------------------------------------

    def time(self, earliest: int | None = None, latest: int | None = None) -> datetime:
        """A working-hours UTC time in the window, distinct from every one used so far."""
        low = self.window[0] if earliest is None else earliest
        high = self.window[1] if latest is None else latest
        day = self.rng.randrange(low // 86400, high // 86400 + 1)
        moment = day * 86400 + self.rng.randrange(6 * 3600, 19 * 3600)
        moment = min(max(moment, low), high)
        while moment in self.used:
            moment += 1
        self.used.add(moment)
        return datetime.fromtimestamp(moment, UTC)

    def other_city(self) -> str:
        return self.city if self.rng.random() < 0.7 else self.rng.choice(self.cities)

    def practice_name(self) -> str:
        if self.rng.random() < 0.85:
            return self.practice
        return f"Cabinet médical {self.rng.choice(_PRACTICES)}, {self.other_city()}"

    def hospital(self) -> str:
        if self.rng.random() < 0.5:
            return _HOSPITALS.get(self.region, "Centre hospitalier")
        return f"Centre hospitalier {_de(self.other_city())}"

    def subject(self) -> dict[str, Any]:
        return {"identifier": {"system": INS_SYSTEM, "value": self.patient.ins}}

    def add(
        self,
        code: str,
        title: str,
        organization: str,
        when: datetime,
        content_type: str,
        content: bytes,
    ) -> None:
        document_type = LOINC_TYPES[code]
        draw = self.rng.random()
        if draw < 0.01:
            confidentiality = record_pb2.CONFIDENTIALITY_VERY_RESTRICTED
        elif draw < 0.05:
            confidentiality = record_pb2.CONFIDENTIALITY_RESTRICTED
        else:
            confidentiality = record_pb2.CONFIDENTIALITY_NORMAL
        self.records.append(
            SyntheticRecord(
                patient_ins=self.patient.ins,
                region=self.region,
                kind=document_type.kind,
                type_system=LOINC_SYSTEM,
                type_code=code,
                type_display=document_type.display,
                title=title,
                organization=organization,
                effective_time=when,
                content_type=content_type,
                content=content,
                confidentiality=confidentiality,
            )
        )

    # -- kinds of entries --------------------------------------------------------------

    def consultation(self) -> None:
        when = self.time()
        motive, exam, conclusion, plan = self.rng.choice(_MOTIVES)
        title = LOINC_TYPES["11488-4"].title
        lines = [
            title,
            f"Date : {when:%d/%m/%Y}",
            f"Motif : {motive}",
            f"Examen clinique : {exam}",
            f"Conclusion : {conclusion}",
            f"Conduite à tenir : {plan}",
        ]
        self.add("11488-4", title, self.practice_name(), when, _TEXT, _text(lines))

    def progress_note(self) -> None:
        when = self.time()
        _, _, conclusion, plan = self.rng.choice(_MOTIVES)
        title = LOINC_TYPES["11506-3"].title
        lines = [
            title,
            f"Date : {when:%d/%m/%Y}",
            f"Évolution : {conclusion}, favorable",
            f"Suite : {plan}",
        ]
        self.add("11506-3", title, self.practice_name(), when, _TEXT, _text(lines))

    def hospital_stay(self) -> None:
        reason, care = self.rng.choice(_HOSPITAL_STAYS)
        hospital = self.hospital()
        admission = self.time()
        if self.rng.random() < 0.5:
            title = LOINC_TYPES["34117-2"].title
            lines = [
                title,
                f"Admission le {admission:%d/%m/%Y}",
                f"Motif : {reason}",
                "Antécédents : voir dossier",
                "Examen : constantes stables",
            ]
            self.add("34117-2", title, hospital, admission, _TEXT, _text(lines))
            return
        title = LOINC_TYPES["18842-5"].title
        lines = [
            hospital,
            title,
            f"Séjour du {admission:%d/%m/%Y}",
            f"Motif : {reason}",
            f"Prise en charge : {care}",
            "Sortie : retour à domicile, suivi par le médecin traitant",
        ]
        self.add("18842-5", title, hospital, admission, _PDF, _pdf(lines))

    def emergency(self) -> None:
        reason, care = self.rng.choice(_EMERGENCIES)
        hospital = self.hospital()
        when = self.time()
        title = LOINC_TYPES["34133-9"].title
        lines = [
            hospital,
            title,
            f"Passage du {when:%d/%m/%Y}",
            f"Motif : {reason}",
            f"Prise en charge : {care}",
        ]
        self.add("34133-9", title, hospital, when, _PDF, _pdf(lines))

    def imaging(self) -> None:
        exam, finding = self.rng.choice(_IMAGING)
        if self.rng.random() < 0.6:
            organization = f"Centre d'imagerie médicale, {self.other_city()}"
        else:
            organization = self.hospital()
        when = self.time()
        lines = [
            organization,
            f"{exam} du {when:%d/%m/%Y}",
            "Indication : bilan",
            f"Résultat : {finding}",
            "Conclusion : examen interprété, voir résultat",
        ]
        self.add("18748-4", exam, organization, when, _PDF, _pdf(lines))

    def laboratory(self) -> None:
        name, analytes = self.rng.choice(_LAB_PANELS)
        organization = f"Laboratoire de biologie médicale, {self.other_city()}"
        when = self.time()
        results = []
        for loinc, display, unit, low, high in analytes:
            spread = high - low
            value = round(self.rng.uniform(low - 0.15 * spread, high + 0.15 * spread), 2)
            results.append(
                {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {
                        "coding": [{"system": LOINC_SYSTEM, "code": loinc, "display": display}]
                    },
                    "valueQuantity": {"value": value, "unit": unit},
                    "referenceRange": [
                        {"low": {"value": low, "unit": unit}, "high": {"value": high, "unit": unit}}
                    ],
                }
            )
        report = {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {
                "coding": [
                    {"system": LOINC_SYSTEM, "code": "11502-2", "display": "Laboratory report"}
                ],
                "text": name,
            },
            "subject": self.subject(),
            "effectiveDateTime": when.isoformat(),
            "performer": [{"display": organization}],
            "contained": results,
        }
        self.add("11502-2", f"Bilan biologique : {name}", organization, when, _JSON, _fhir(report))

    def prescription(self, dispensed: bool) -> None:
        medication, dosage, boxes = self.rng.choice(_MEDICATIONS)
        latest = self.window[1] - 6 * 86400 if dispensed else self.window[1]
        written = self.time(latest=max(self.window[0], latest))
        request = {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": self.subject(),
            "medicationCodeableConcept": {"text": medication},
            "dosageInstruction": [{"text": dosage}],
            "authoredOn": written.isoformat(),
        }
        self.add("57833-6", "Ordonnance", self.practice_name(), written, _JSON, _fhir(request))
        if not dispensed:
            return
        start = int(written.timestamp()) + 600
        handed = self.time(earliest=start, latest=start + self.rng.randrange(3600, 5 * 86400))
        dispense = {
            "resourceType": "MedicationDispense",
            "status": "completed",
            "subject": self.subject(),
            "medicationCodeableConcept": {"text": medication},
            "quantity": {"value": boxes, "unit": "boîte"},
            "dosageInstruction": [{"text": dosage}],
            "whenHandedOver": handed.isoformat(),
        }
        pharmacy = (
            self.pharmacy
            if self.rng.random() < 0.85
            else f"{self.rng.choice(_PHARMACIES)}, {self.other_city()}"
        )
        self.add("60593-1", "Délivrance", pharmacy, handed, _JSON, _fhir(dispense))

    def allergy(self) -> None:
        substance = self.rng.choice(_ALLERGIES)
        when = self.time()
        resource = {
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "patient": self.subject(),
            "code": {"text": substance},
            "criticality": self.rng.choice(("low", "high")),
            "recordedDate": when.isoformat(),
        }
        self.add(
            "48765-2", f"Allergie : {substance}", self.practice_name(), when, _JSON, _fhir(resource)
        )

    def immunization(self) -> None:
        vaccine = self.rng.choice(_VACCINES)
        when = self.time()
        organization = self.pharmacy if self.rng.random() < 0.3 else self.practice_name()
        resource = {
            "resourceType": "Immunization",
            "status": "completed",
            "patient": self.subject(),
            "vaccineCode": {"text": vaccine},
            "occurrenceDateTime": when.isoformat(),
            "lotNumber": f"{self.rng.choice('ABCDEFGHKLMNPRTX')}{self.rng.randrange(10**5):05d}",
        }
        self.add("11369-6", f"Vaccination : {vaccine}", organization, when, _JSON, _fhir(resource))

    def condition(self) -> None:
        condition = self.rng.choice(_CONDITIONS)
        when = self.time()
        resource = {
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "subject": self.subject(),
            "code": {"text": condition},
            "recordedDate": when.isoformat(),
        }
        self.add(
            "11450-4",
            f"Problème de santé : {condition}",
            self.practice_name(),
            when,
            _JSON,
            _fhir(resource),
        )

    def vital_signs(self) -> None:
        when = self.time()
        rng = self.rng

        def component(code: str, display: str, value: float, unit: str) -> dict[str, Any]:
            return {
                "code": {"coding": [{"system": LOINC_SYSTEM, "code": code, "display": display}]},
                "valueQuantity": {"value": value, "unit": unit},
            }

        resource = {
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"code": "vital-signs"}]}],
            "code": {
                "coding": [{"system": LOINC_SYSTEM, "code": "8716-3", "display": "Vital signs"}]
            },
            "subject": self.subject(),
            "effectiveDateTime": when.isoformat(),
            "component": [
                component("8480-6", "Pression systolique", rng.randrange(105, 160), "mm[Hg]"),
                component("8462-4", "Pression diastolique", rng.randrange(60, 95), "mm[Hg]"),
                component("8867-4", "Fréquence cardiaque", rng.randrange(55, 100), "/min"),
                component("29463-7", "Poids", round(rng.uniform(45, 110), 1), "kg"),
            ],
        }
        self.add("8716-3", "Constantes vitales", self.practice_name(), when, _JSON, _fhir(resource))


# (weight, number of records produced, builder)
_MIX: tuple[tuple[int, int, Callable[[_History], None]], ...] = (
    (22, 1, _History.consultation),
    (18, 2, lambda h: h.prescription(dispensed=True)),
    (3, 1, lambda h: h.prescription(dispensed=False)),
    (12, 1, _History.laboratory),
    (8, 1, _History.vital_signs),
    (6, 1, _History.progress_note),
    (6, 1, _History.imaging),
    (6, 1, _History.immunization),
    (6, 1, _History.hospital_stay),
    (5, 1, _History.emergency),
    (4, 1, _History.condition),
    (3, 1, _History.allergy),
)


def _window(patient: SyntheticPatient, now: datetime) -> tuple[int, int]:
    """Seconds since the epoch: from ten years ago (or birth, if later) to a minute ago."""
    end = int(now.timestamp()) - 60
    start = int((now - timedelta(days=3652)).timestamp())
    born = datetime.combine(date.fromisoformat(patient.birth_date), datetime.min.time(), UTC)
    if int(born.timestamp()) > start and int(born.timestamp()) < end - 30 * 86400:
        start = int(born.timestamp())
    return start, end


def records_for(
    patient: SyntheticPatient,
    *,
    regions: Sequence[str],
    per_region: int,
    seed: int = 0,
    now: datetime | None = None,
) -> list[SyntheticRecord]:
    """per_region records of the patient in each region, over the last ten years.

    Deterministic for (patient, regions, per_region, seed, now); `now` defaults to the current
    time and must be timezone-aware. Effective times are distinct across all the records
    returned; within a region records come oldest first.
    """
    if per_region < 0:
        raise ValueError(f"per_region must not be negative, not {per_region}")
    checked = _check_regions(regions)
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    window = _window(patient, now.astimezone(UTC))
    used: set[int] = set()
    weights = [weight for weight, _, _ in _MIX]
    records: list[SyntheticRecord] = []
    for region in checked:
        rng = random.Random(f"dmp.synth.records:{seed}:{patient.ins}:{region}")
        history = _History(patient, region, rng, window, used)
        while len(history.records) < per_region:
            remaining = per_region - len(history.records)
            _, produced, build = rng.choices(_MIX, weights)[0]
            if produced <= remaining:
                build(history)
        records.extend(sorted(history.records, key=lambda record: record.effective_time))
    return records

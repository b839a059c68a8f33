"""The access rules as tables: who sees which records, under which directives.

One table, two tests: tests/integration/test_access_policy_*.py run each row over mutual TLS
against a directory and four nodes; tests/unit/test_policy.py runs each row against the
pure policy (dmp/policy.py), with no server.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from dmp.v1 import record_pb2
from tests.federation import DOCTOR, NURSE, OTHER_DOCTOR, PHARMACIST

K = record_pb2
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS

MIDWIFE = "10000000005"
DENTIST = "10000000006"
PHYSIO = "10000000007"
TREATING = "10000000008"

#: Stands for the patient of the test, in tables written before the patient exists.
THE_PATIENT = "the-patient"


#: name: (kind, type code, region). The patient-note is written by the patient.
TABLE: dict[str, tuple[record_pb2.RecordKind.ValueType, str, str]] = {
    "consultation": (K.RECORD_KIND_DOCUMENT, "11488-4", "11"),
    "prescription": (K.RECORD_KIND_PRESCRIPTION, "57833-6", "53"),
    "dispensation": (K.RECORD_KIND_DISPENSATION, "60593-1", "11"),
    "allergy": (K.RECORD_KIND_ALLERGY, "48765-2", "53"),
    "condition": (K.RECORD_KIND_CONDITION, "11450-4", "11"),
    "immunization": (K.RECORD_KIND_IMMUNIZATION, "11369-6", "53"),
    "observation": (K.RECORD_KIND_OBSERVATION, "29463-7", "11"),
    "patient-note": (K.RECORD_KIND_PATIENT_NOTE, "51855-5", "53"),
    "progress-note": (K.RECORD_KIND_DOCUMENT, "11506-3", "11"),
    "lab-report": (K.RECORD_KIND_DOCUMENT, "11502-2", "53"),
    "imaging": (K.RECORD_KIND_DOCUMENT, "18748-4", "11"),
}
_CARE_KINDS = {"prescription", "dispensation", "allergy", "immunization", "observation"}
#: The default matrix as the README documents it: who (profession, RPPS) sees what.
PROFESSION_SEES: dict[tuple[str, str], set[str]] = {
    ("doctor", DOCTOR): set(TABLE),
    ("pharmacist", PHARMACIST): {"prescription", "dispensation", "allergy", "immunization"},
    ("nurse", NURSE): _CARE_KINDS | {"condition", "progress-note"},
    ("midwife", MIDWIFE): _CARE_KINDS | {"condition", "progress-note", "lab-report"},
    ("dentist", DENTIST): {"prescription", "dispensation", "allergy", "condition", "imaging"},
    ("physiotherapist", PHYSIO): {"prescription", "allergy", "observation", "condition"}
    | {"imaging", "progress-note"},
    ("patient", THE_PATIENT): set(TABLE),
}


@dataclass(frozen=True)
class Rule:
    name: str
    #: `dmp patient` commands, in order: (change, target); a target may name a record.
    changes: tuple[tuple[str, str], ...]
    #: An RPPS, or THE_PATIENT.
    caller: str
    emergency: bool
    #: Records the caller sees, or None when refused everywhere.
    sees: frozenset[str] | None
    #: The caller's write at a node (an existing id, other content): ALREADY_EXISTS when
    #: the access check lets it through to the store.
    write: grpc.StatusCode = ALREADY_EXISTS


#: doc: consultation at 11, rx: prescription at 53, lab: lab report at 84; all by DOCTOR.
LAYOUT = {"doc": ("11", K.RECORD_KIND_DOCUMENT, "11488-4"),
          "rx": ("53", K.RECORD_KIND_PRESCRIPTION, "57833-6"),
          "lab": ("84", K.RECORD_KIND_DOCUMENT, "11502-2")}  # fmt: skip
EVERYTHING = frozenset(LAYOUT)
UNMASKED = frozenset({"doc", "rx"})
RX = frozenset({"rx"})
BLOCK = (("block", OTHER_DOCTOR),)
OPPOSE = (("oppose", ""),)
CLOSE = (("close", ""),)
MASK = (("set-treating", TREATING), ("mask", "lab"))
REFUSE = (("emergency", "refuse"),)
ALLOW = ("emergency", "allow")
DENIED = PERMISSION_DENIED
CLOSED = FAILED_PRECONDITION

RULES = [
    Rule("active-doctor", (), DOCTOR, False, EVERYTHING),
    Rule("active-pharmacist", (), PHARMACIST, False, RX),
    Rule("blocked", BLOCK, OTHER_DOCTOR, False, None, DENIED),
    Rule("blocked-even-in-emergency", BLOCK, OTHER_DOCTOR, True, None, DENIED),
    Rule("blocked-others-still-read", BLOCK, DOCTOR, False, EVERYTHING),
    Rule("blocked-patient-still-reads", BLOCK, THE_PATIENT, False, EVERYTHING),
    Rule("unblocked", (*BLOCK, ("unblock", OTHER_DOCTOR)), OTHER_DOCTOR, False, EVERYTHING),
    Rule("opposed-doctor", OPPOSE, DOCTOR, False, None, DENIED),
    Rule("opposed-pharmacist", OPPOSE, PHARMACIST, False, None, DENIED),
    Rule("opposed-treating", (("set-treating", TREATING), *OPPOSE), TREATING, False, None, DENIED),
    Rule("opposed-emergency", OPPOSE, OTHER_DOCTOR, True, None, DENIED),
    Rule("opposed-patient-still-reads", OPPOSE, THE_PATIENT, False, EVERYTHING),
    Rule("reopened", (*OPPOSE, ("reopen", "")), DOCTOR, False, EVERYTHING),
    Rule("closed-doctor-reads", CLOSE, DOCTOR, False, EVERYTHING, CLOSED),
    Rule("closed-pharmacist-reads", CLOSE, PHARMACIST, False, RX, CLOSED),
    Rule("closed-patient-reads", CLOSE, THE_PATIENT, False, EVERYTHING, CLOSED),
    Rule("masked-other-doctor", MASK, OTHER_DOCTOR, False, UNMASKED),
    Rule("masked-other-profession", MASK, MIDWIFE, False, RX),
    Rule("masked-author", MASK, DOCTOR, False, EVERYTHING),
    Rule("masked-treating-physician", MASK, TREATING, False, EVERYTHING),
    Rule("masked-patient", MASK, THE_PATIENT, False, EVERYTHING),
    Rule("masked-stays-hidden-in-emergency", MASK, OTHER_DOCTOR, True, UNMASKED),
    Rule("unmasked", (*MASK, ("unmask", "lab")), OTHER_DOCTOR, False, EVERYTHING),
    Rule("treating-cleared", (*MASK, ("set-treating", "none")), TREATING, False, UNMASKED),
    Rule("emergency-granted", (), OTHER_DOCTOR, True, EVERYTHING),
    Rule("emergency-within-the-matrix", (), PHARMACIST, True, RX),
    Rule("emergency-refused", REFUSE, OTHER_DOCTOR, True, None),
    Rule("emergency-refused-care-reads", REFUSE, OTHER_DOCTOR, False, EVERYTHING),
    Rule("emergency-refused-patient-reads", REFUSE, THE_PATIENT, False, EVERYTHING),
    Rule("emergency-allowed-again", (*REFUSE, ALLOW), OTHER_DOCTOR, True, EVERYTHING),
]

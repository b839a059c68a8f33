"""The access policy (dmp/policy.py) against the rules table, with no server.

The rows are those tests/integration/test_access_policy_*.py run over mutual TLS
(tests/access_rules.py); here each is asked of the pure policy. Which records a ReadScope
lets through is what node/scoping.py says in SQL, restated below as `shown`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import grpc
import pytest

from dmp.cli.patient import changed
from dmp.directives import PatientDirectives
from dmp.errors import DmpError, FailedPrecondition, PermissionDenied
from dmp.identity import Principal, Role
from dmp.ins import make_ins
from dmp.policy import (
    HIDDEN_FROM_PATIENT_US,
    AccessMatrix,
    ReadScope,
    check_history,
    check_node,
    check_operator,
    check_own_directives,
    check_own_head,
    check_register,
    check_sets_directives,
    check_witness_reader,
    check_witness_submitter,
    check_write,
    decide_read,
    may_supersede,
    refuse_reader,
)
from dmp.records import kind_name
from node.access_matrix import load_matrix
from tests.access_rules import (
    ALREADY_EXISTS,
    DENTIST,
    FAILED_PRECONDITION,
    LAYOUT,
    MIDWIFE,
    PERMISSION_DENIED,
    PHYSIO,
    PROFESSION_SEES,
    RULES,
    TABLE,
    THE_PATIENT,
    TREATING,
    Rule,
)
from tests.federation import DOCTOR, NURSE, OTHER_DOCTOR, PHARMACIST

MATRIX = load_matrix()
INS = make_ins("1800175000001")
NEIGHBOUR = make_ins("1800175000002")
NOW = 1_750_000_000 * 1_000_000
#: The profession on each practitioner's certificate (tests/federation.py, the fed fixture).
PROFESSION_OF = {
    DOCTOR: "doctor",
    OTHER_DOCTOR: "doctor",
    TREATING: "doctor",
    PHARMACIST: "pharmacist",
    NURSE: "nurse",
    MIDWIFE: "midwife",
    DENTIST: "dentist",
    PHYSIO: "physiotherapist",
}
#: What each expected status of a write means for the policy: allowed, or this refusal.
WRITE_OUTCOME: dict[grpc.StatusCode, type[DmpError] | None] = {
    ALREADY_EXISTS: None,  # let through to the store, which finds the id taken
    PERMISSION_DENIED: PermissionDenied,
    FAILED_PRECONDITION: FailedPrecondition,
}


@dataclass(frozen=True)
class Asked:
    """A verified access assertion, as the policy reads it."""

    subject: Principal
    patient_ins: str
    purpose_name: str


@dataclass(frozen=True)
class Stored:
    """What the scoping reads of a stored record."""

    id: str
    kind: str
    type_code: str
    author_identity: str
    root_id: str = ""
    hidden_from_patient: bool = False
    revealed: bool = False
    created_us: int = NOW

    @property
    def root(self) -> str:
        return self.root_id or self.id


def practitioner(rpps: str) -> Principal:
    return Principal(Role.PRACTITIONER, rpps, profession=PROFESSION_OF[rpps])


def patient(ins: str = INS) -> Principal:
    return Principal(Role.PATIENT, ins)


def caller_of(who: str) -> Principal:
    return patient() if who == THE_PATIENT else practitioner(who)


def asked(who: Principal, ins: str = INS, *, emergency: bool = False) -> Asked:
    if who.role is Role.PATIENT:
        return Asked(who, ins, "SELF")
    return Asked(who, ins, "EMERGENCY" if emergency else "CARE")


def shown(scope: ReadScope, records: list[Stored], now: int = NOW) -> set[str]:
    """The ids of the records the scope lets through (node/scoping.py, in SQL)."""
    masked_roots = {r.root for r in records if r.id in scope.hidden_masked}
    seen = set()
    for r in records:
        if scope.patient_view:
            ok = (
                not r.hidden_from_patient
                or r.revealed
                or r.created_us <= now - HIDDEN_FROM_PATIENT_US
            )
        elif scope.grant is None:
            ok = False
        else:
            ok = (r.kind in scope.grant.kinds or r.type_code in scope.grant.type_codes) and (
                r.root not in masked_roots or r.author_identity == scope.subject.uri
            )
        if ok:
            seen.add(r.id)
    return seen


def read(who: Principal, directives: PatientDirectives, *, emergency: bool = False) -> ReadScope:
    """The node's decision, after the directory's (the same refusals, asked first)."""
    assertion = asked(who, directives.patient_ins, emergency=emergency)
    refuse_reader(assertion, directives)
    return decide_read(assertion, directives, MATRIX)


# -- the profession matrix: each profession against each kind ---------------------------------


def _table_records() -> list[Stored]:
    records = []
    for name, (kind, code, _) in TABLE.items():
        kind_word = kind_name(kind)
        author = patient() if kind_word == "patient-note" else practitioner(DOCTOR)
        records.append(Stored(f"t-{name}", kind_word, code, author.uri))
    return records


@pytest.mark.parametrize(
    ("who", "sees"), [pytest.param(who, sees, id=who[0]) for who, sees in PROFESSION_SEES.items()]
)
def test_each_profession_reads_the_kinds_of_the_default_matrix(
    who: tuple[str, str], sees: set[str]
) -> None:
    profession, rpps = who
    caller = caller_of(rpps)
    if caller.role is Role.PRACTITIONER:
        assert caller.profession == profession
    scope = read(caller, PatientDirectives(INS))
    assert shown(scope, _table_records()) == {f"t-{name}" for name in sees}


def test_a_matrix_without_a_profession_refuses_it() -> None:
    without = AccessMatrix({p: g for p, g in MATRIX.grants.items() if p != "physiotherapist"})
    with pytest.raises(PermissionDenied, match="physiotherapist"):
        decide_read(asked(practitioner(PHYSIO)), PatientDirectives(INS), without)
    decide_read(asked(practitioner(DOCTOR)), PatientDirectives(INS), without)


# -- the patient's directives, emergency, each rule as a row -----------------------------------


def _layout() -> tuple[dict[str, str], list[Stored]]:
    ids = {name: f"{name}-{INS}" for name in LAYOUT}
    records = [
        Stored(ids[name], kind_name(kind), code, practitioner(DOCTOR).uri)
        for name, (_, kind, code) in LAYOUT.items()
    ]
    return ids, records


@pytest.mark.parametrize("rule", [pytest.param(r, id=r.name) for r in RULES])
def test_directive_rules(rule: Rule) -> None:
    ids, records = _layout()
    directives = PatientDirectives(INS)
    for change, target in rule.changes:
        directives = changed(directives, change, ids.get(target, target))
    # The patient reads everything whatever the directives, and sees what is masked.
    mine = read(patient(), directives)
    assert shown(mine, records) == set(ids.values())
    assert mine.masked == directives.masked_record_ids

    caller = caller_of(rule.caller)
    if rule.sees is None:
        with pytest.raises(PermissionDenied):
            refuse_reader(asked(caller, emergency=rule.emergency), directives)  # the directory
        with pytest.raises(PermissionDenied):
            decide_read(asked(caller, emergency=rule.emergency), directives, MATRIX)  # a node
    else:
        scope = read(caller, directives, emergency=rule.emergency)
        assert shown(scope, records) == {ids[name] for name in rule.sees}
        assert scope.masked == directives.masked_record_ids
    # The caller's own write: a patient writes a note, a professional a document.
    kind = "patient-note" if caller.role is Role.PATIENT else "document"
    refused = WRITE_OUTCOME[rule.write]
    if refused is None:
        check_write(caller, kind, directives)
    else:
        with pytest.raises(refused):
            check_write(caller, kind, directives)


def test_refusals_say_why() -> None:
    cases = {
        "blocked this professional": changed(PatientDirectives(INS), "block", OTHER_DOCTOR),
        "opposes access": changed(PatientDirectives(INS), "oppose", ""),
    }
    for why, directives in cases.items():
        for emergency in (False, True):
            with pytest.raises(PermissionDenied, match=why):
                read(practitioner(OTHER_DOCTOR), directives, emergency=emergency)
            with pytest.raises(PermissionDenied, match=why):
                check_write(practitioner(OTHER_DOCTOR), "document", directives)
    refusing = changed(PatientDirectives(INS), "emergency", "refuse")
    with pytest.raises(PermissionDenied, match="refuses emergency access"):
        read(practitioner(OTHER_DOCTOR), refusing, emergency=True)
    closed = changed(PatientDirectives(INS), "close", "")
    with pytest.raises(FailedPrecondition, match="record is closed"):
        check_write(practitioner(DOCTOR), "document", closed)
    with pytest.raises(FailedPrecondition, match="record is closed"):
        check_write(patient(), "patient-note", closed)


# -- masked documents: every version, the author, the treating physician ----------------------


def test_a_mask_covers_every_version_and_spares_the_author_and_the_treating() -> None:
    doc, other = practitioner(DOCTOR).uri, practitioner(OTHER_DOCTOR).uri
    first = Stored("mv1", "document", "11488-4", doc)
    second = Stored("mv2", "document", "11488-4", doc, root_id="mv1")
    plain = Stored("mvp", "document", "11488-4", other)
    records = [first, second, plain]
    directives = changed(changed(PatientDirectives(INS), "set-treating", TREATING), "mask", "mv1")
    assert shown(read(practitioner(OTHER_DOCTOR), directives), records) == {"mvp"}
    assert shown(read(practitioner(OTHER_DOCTOR), directives, emergency=True), records) == {"mvp"}
    for allowed in (practitioner(DOCTOR), practitioner(TREATING), patient()):
        assert shown(read(allowed, directives), records) == {"mv1", "mv2", "mvp"}


# -- hidden from the patient until revealed, or 30 days ----------------------------------------


def test_hidden_from_the_patient_until_revealed_or_30_days() -> None:
    doc = practitioner(DOCTOR).uri
    hidden = Stored("result", "document", "11502-2", doc, hidden_from_patient=True)
    revealed = Stored("shown", "document", "11502-2", doc, hidden_from_patient=True, revealed=True)
    visible = Stored("visible", "document", "11488-4", doc)
    records = [hidden, revealed, visible]
    mine = read(patient(), PatientDirectives(INS))
    assert shown(mine, records) == {"shown", "visible"}
    hour = 3600 * 1_000_000
    assert shown(mine, records, NOW + HIDDEN_FROM_PATIENT_US - hour) == {"shown", "visible"}
    assert shown(mine, records, NOW + HIDDEN_FROM_PATIENT_US + hour) == {
        "result",
        "shown",
        "visible",
    }
    for professional in (practitioner(DOCTOR), practitioner(OTHER_DOCTOR)):
        assert shown(read(professional, PatientDirectives(INS)), records) == {
            "result",
            "shown",
            "visible",
        }


# -- the patient's own record ------------------------------------------------------------------


def test_a_patient_reads_their_own_record_and_no_one_elses() -> None:
    for ask in (asked(patient(), NEIGHBOUR), asked(patient(NEIGHBOUR), INS)):
        directives = PatientDirectives(ask.patient_ins)
        with pytest.raises(PermissionDenied, match="only their own record"):
            refuse_reader(ask, directives)  # the directory
        with pytest.raises(PermissionDenied, match="only their own record"):
            decide_read(ask, directives, MATRIX)  # a node
    scope = read(patient(), PatientDirectives(INS))
    assert scope.patient_view and scope.patient_ins == INS


def test_patient_notes_are_written_by_the_patient_in_their_own_record() -> None:
    check_write(patient(), "patient-note", PatientDirectives(INS))
    refused = [
        (patient(), "patient-note", NEIGHBOUR),
        (patient(), "document", INS),
        (patient(), "prescription", INS),
        (practitioner(DOCTOR), "patient-note", INS),
        (Principal(Role.DIRECTORY), "document", INS),
        (Principal(Role.NODE, "11"), "document", INS),
    ]
    for writer, kind, ins in refused:
        with pytest.raises(PermissionDenied):
            check_write(writer, kind, PatientDirectives(ins))


def test_only_persons_read_records() -> None:
    for who in (Principal(Role.DIRECTORY), Principal(Role.NODE, "11")):
        with pytest.raises(PermissionDenied, match="may not read records"):
            decide_read(Asked(who, INS, "CARE"), PatientDirectives(INS), MATRIX)


# -- the access history is for the patient only -----------------------------------------------


def test_the_access_history_is_for_the_patient_only() -> None:
    check_history(asked(patient()))
    for refused in (
        None,
        asked(practitioner(DOCTOR)),
        asked(practitioner(DOCTOR), emergency=True),
        Asked(patient(), INS, "CARE"),
    ):
        with pytest.raises(PermissionDenied, match="for the patient only"):
            check_history(refused)


# -- only the author supersedes, within what they read -----------------------------------------


def test_only_the_author_of_a_record_writes_its_new_version() -> None:
    doc, me = practitioner(DOCTOR), patient()
    report = (doc.uri, "document", "11488-4")
    note = (me.uri, "patient-note", "51855-5")
    allowed = [(doc, report), (me, note)]
    refused = [
        (practitioner(PHARMACIST), report),  # nor can he read it
        (practitioner(OTHER_DOCTOR), report),  # a colleague's, masked or not
        (me, report),
        (practitioner(DOCTOR), note),
        (me, (me.uri, "document", "11488-4")),  # a patient's records are notes
        (Principal(Role.NODE, "11"), ("urn:dmp:node:11", "document", "11488-4")),
    ]
    for writer, (author, kind, code) in allowed:
        assert may_supersede(writer, author, kind, code, MATRIX)
    for writer, (author, kind, code) in refused:
        assert not may_supersede(writer, author, kind, code, MATRIX), (writer, kind)
    # A professional supersedes only within what their profession reads.
    pharmacist = practitioner(PHARMACIST)
    assert may_supersede(pharmacist, pharmacist.uri, "dispensation", "60593-1", MATRIX)
    assert not may_supersede(pharmacist, pharmacist.uri, "document", "11488-4", MATRIX)


# -- the directory's own calls -----------------------------------------------------------------


def test_the_directory_calls_check_who_calls() -> None:
    node, operator = Principal(Role.NODE, "53"), Principal(Role.DIRECTORY)
    doc, me, them = practitioner(DOCTOR), patient(), patient(NEIGHBOUR)
    check_register(doc)
    assert check_node(node) == "53"
    check_operator(operator)
    check_own_directives(me, INS)
    check_own_directives(node, INS)
    check_sets_directives(me)
    refusals: list[Callable[[], object]] = [
        partial(check_register, me),
        partial(check_node, doc),
        partial(check_operator, doc),
        partial(check_sets_directives, doc),
        *(partial(check_own_directives, who, INS) for who in (doc, them, operator)),
    ]
    for refusal in refusals:
        with pytest.raises(PermissionDenied):
            refusal()


def test_witnesses_keep_and_show_the_heads_of_services_only() -> None:
    node, other, directory = (
        Principal(Role.NODE, "53"),
        Principal(Role.NODE, "11"),
        Principal(Role.DIRECTORY),
    )
    check_witness_submitter(node, Role.NODE)
    check_witness_submitter(directory, Role.DIRECTORY)
    check_own_head(node, node.uri)
    check_witness_reader(node)
    check_witness_reader(directory)
    refusals: list[Callable[[], object]] = [
        partial(check_witness_submitter, directory, Role.NODE),
        partial(check_witness_submitter, practitioner(DOCTOR), Role.NODE),
        partial(check_own_head, node, other.uri),
        partial(check_own_head, node, ""),
        partial(check_witness_reader, practitioner(DOCTOR)),
        partial(check_witness_reader, patient()),
    ]
    for refusal in refusals:
        with pytest.raises(PermissionDenied):
            refusal()

"""Issue 4 §6 over mutual TLS: the patient's directives (blocks, treating physician,
emergency, closing, masks), each rule a row of tests/access_rules.py, by every path.
Helpers: access_federation.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial

import grpc
import pytest

from dmp.cli.patient import changed
from dmp.directives import PatientDirectives, from_proto, sign_directives
from dmp.v1 import access_pb2
from dmp.v1 import directory_service_pb2 as dpb
from tests.access_rules import DENIED, LAYOUT, RULES, THE_PATIENT, TREATING, Rule
from tests.federation import DOCTOR, OTHER_DOCTOR, wait_for
from tests.integration.access_federation import (
    ALL_REGIONS,
    DIRECTIVES_WAIT,
    DIRECTORY,
    DOC,
    FAILED_PRECONDITION,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OTHER,
    PERMISSION_DENIED,
    REASON,
    UNAUTHENTICATED,
    Fed,
    K,
    answer_of,
    check_view,
    code_of,
    eventually,
    patient_identity,
    practitioner,
    record,
    refusal,
    setup,
)

# -- 1. the patient's directives, emergency, each rule as a row -----------------------------


@pytest.mark.parametrize("rule", [pytest.param(r, id=r.name) for r in RULES])
def test_directive_rules(fed: Fed, rule: Rule) -> None:
    ins = fed.new_patient()
    ids = {}
    for name, (region, kind, code) in LAYOUT.items():
        ids[name] = fed.put(region, record(ins, f"{name}-{ins}", kind, code, name)).id
    fed.wait_fragments(ins, {"11": 1, "53": 1, "84": 1})
    directives = PatientDirectives(ins)
    for change, target in rule.changes:
        directives = fed.set_directives(ins, change, ids.get(target, target))
    me = patient_identity(ins)
    # The patient reads everything whatever the directives (and the view carries them).
    check_view(fed.view(me, ins), set(ids.values()))

    caller = me if rule.caller == THE_PATIENT else practitioner(rule.caller)
    emergency = REASON if rule.emergency else None
    if rule.sees is None:
        for call in (
            lambda: fed.view(caller, ins, emergency),
            lambda: fed.get_patient(caller, ins, emergency),
        ):
            assert code_of(call) == PERMISSION_DENIED
        for region in ALL_REGIONS:
            eventually(
                partial(fed.listed, caller, region, ins, emergency),
                PERMISSION_DENIED,
                f"node {region} to refuse {rule.caller}",
            )
    else:
        expected = {ids[name] for name in rule.sees}
        view = fed.view(caller, ins, emergency)
        check_view(view, expected)
        masked = {ids[name] for name in LAYOUT if ids[name] in directives.masked_record_ids}
        assert {r.id for r in view.records if r.masked} == masked & expected

        def node_gives(region: str, wanted: set[str]) -> bool:
            return fed.listed_ids(caller, region, ins, emergency) == wanted

        for name, (region, _, _) in LAYOUT.items():
            wanted = {ids[name]} & expected
            wait_for(
                partial(node_gives, region, wanted),
                f"node {region} to give {rule.caller} {wanted or 'nothing'}",
                timeout=DIRECTIVES_WAIT,
            )
    # Writing: the caller's own write, with an id already taken, so that nothing is stored.
    kind = K.RECORD_KIND_PATIENT_NOTE if caller == me else K.RECORD_KIND_DOCUMENT
    attempt = record(ins, ids["doc"], kind, "51855-5", "a new entry")
    eventually(lambda: fed.put("11", attempt, caller), rule.write, f"the write to be {rule.write}")


def test_a_node_fetches_a_change_itself_within_the_staleness_bound(fed: Fed) -> None:
    """No call through the directory carries the new directives: the node asks for them."""
    ins = fed.new_patient()
    doc = fed.put("84", record(ins, f"fetched-{ins}"))
    assert fed.listed_ids(DOC, "84", ins) == {doc.id}  # the node holds the current set
    fed.set_directives(ins, "block", DOCTOR)
    eventually(partial(fed.listed, DOC, "84", ins), DENIED, "node 84 to fetch the new set")
    assert fed.listed_ids(OTHER, "84", ins) == {doc.id}


def test_only_the_patient_reads_and_sets_their_directives(fed: Fed) -> None:
    ins, neighbour = fed.new_patient(), fed.new_patient()
    me, them = patient_identity(ins), patient_identity(neighbour)
    fed.set_directives(ins, "block", OTHER_DOCTOR)
    request = dpb.GetDirectivesRequest(patient_ins=ins)
    signed = fed.dir(me).GetDirectives(request, timeout=10).directives
    current = from_proto(access_pb2.Directives.FromString(signed.directives))
    assert (current.version, current.blocked_rpps) == (1, frozenset({OTHER_DOCTOR}))
    for identity in (DOC, OTHER, them, DIRECTORY):
        err = refusal(partial(fed.dir(identity).GetDirectives, request, timeout=10))
        assert err.code() == DENIED, identity

    def send(identity: str, directives: access_pb2.SignedDirectives) -> grpc.StatusCode:
        change = dpb.SetDirectivesRequest(directives=directives)
        return code_of(partial(fed.dir(identity).SetDirectives, change, timeout=10))

    unblock = changed(current, "unblock", OTHER_DOCTOR)
    # Signed by the patient but sent by someone else; signed by someone else.
    assert send(OTHER, sign_directives(fed.signer(me), unblock)) == DENIED
    assert send(them, sign_directives(fed.signer(me), unblock)) == INVALID_ARGUMENT
    assert send(me, sign_directives(fed.signer(OTHER), unblock)) == UNAUTHENTICATED
    assert send(me, sign_directives(fed.signer(them), unblock)) == UNAUTHENTICATED
    assert code_of(partial(fed.view, OTHER, ins)) == DENIED  # still blocked


# -- closed record: nothing new is written ----------------------------------------------------


def test_a_closed_record_is_read_but_takes_no_new_record(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    doc = fed.put("11", record(ins, f"closed-doc-{ins}"))
    rx = fed.put("53", record(ins, f"closed-rx-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    note = fed.put("53", record(ins, f"closed-note-{ins}", K.RECORD_KIND_PATIENT_NOTE), me)
    fed.wait_fragments(ins, {"11": 1, "53": 2})
    # Polled with a write the store refuses anyway (it supersedes no record of this node):
    # nothing is stored while a node still holds the previous directives.
    orphan = record(ins, f"orphan-{ins}")
    orphan.supersedes = f"nothing-{ins}"
    assert "no such record" in answer_of(lambda: fed.put("11", orphan))  # the check lets it by
    fed.set_directives(ins, "close")
    check_view(fed.view(me, ins), {doc.id, rx.id, note.id})  # carries the new set along

    def closed_at(region: str) -> bool:
        return "record is closed" in answer_of(partial(fed.put, region, orphan))

    for region in ALL_REGIONS:
        wait_for(
            partial(closed_at, region),
            f"node {region} to know the record is closed",
            timeout=DIRECTIVES_WAIT,
        )
    for region in ALL_REGIONS:
        err = refusal(partial(fed.put, region, record(ins, f"late-{region}-{ins}")))
        assert err.code() == FAILED_PRECONDITION
        assert "closed" in (err.details() or "")
    new_note = record(ins, f"late-note-{ins}", K.RECORD_KIND_PATIENT_NOTE)
    assert code_of(lambda: fed.put("53", new_note, me)) == FAILED_PRECONDITION
    newer = record(ins, f"closed-doc-v2-{ins}")
    newer.supersedes = doc.id
    assert code_of(lambda: fed.put("11", newer)) == FAILED_PRECONDITION
    # Everything stays readable, and nothing was added.
    everything = {doc.id, rx.id, note.id}
    check_view(fed.view(DOC, ins), everything)
    check_view(fed.view(me, ins), everything)
    listed = (fed.listed_ids(DOC, "11", ins) or set()) | (fed.listed_ids(DOC, "53", ins) or set())
    assert listed == everything
    counts = {f.region: f.record_count for f in fed.directory.index.fragments(ins)}
    assert counts == {"11": 1, "53": 2}
    # Reopened, the record takes new records again.
    fed.set_directives(ins, "reopen")
    check_view(fed.view(me, ins), everything)
    wait_for(
        lambda: "no such record" in answer_of(lambda: fed.put("11", orphan)),
        "node 11 to know the record is reopened",
        timeout=DIRECTIVES_WAIT,
    )
    assert fed.put("11", record(ins, f"reopened-{ins}")).id == f"reopened-{ins}"


# -- masked documents, by every path ----------------------------------------------------------


def test_a_masked_document_is_found_by_no_path_of_another_doctor(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    masked = fed.put("53", record(ins, f"masked-{ins}", title="Compte rendu psychiatrique"), DOC)
    plain = fed.put("53", record(ins, f"plain-{ins}"), OTHER)
    fed.wait_fragments(ins, {"53": 2})
    # Before the mask, the other doctor sees it: the refusals below come from the mask.
    assert fed.fetch(OTHER, ins, masked) == b"content"
    fed.set_directives(ins, "set-treating", TREATING)
    fed.set_directives(ins, "mask", masked.id)
    view = fed.view(OTHER, ins)
    check_view(view, {plain.id})
    assert "psychiatrique" not in str(view)
    assert code_of(lambda: fed.fetch(OTHER, ins, masked)) == NOT_FOUND
    wait_for(
        lambda: fed.listed_ids(OTHER, "53", ins) == {plain.id},
        "node 53 to apply the mask",
        timeout=DIRECTIVES_WAIT,
    )
    assert code_of(lambda: fed.get_record(OTHER, "53", ins, masked.id)) == NOT_FOUND
    for identity in (DOC, practitioner(TREATING), me):  # author, treating physician, patient
        check_view(fed.view(identity, ins), {masked.id, plain.id})
        assert fed.fetch(identity, ins, masked) == b"content"
        shown = {r.id: r.masked for r in fed.listed(identity, "53", ins)}
        assert shown == {masked.id: True, plain.id: False}


def test_a_mask_covers_every_version_of_the_record(fed: Fed) -> None:
    ins = fed.new_patient()
    first = fed.put("11", record(ins, f"mv1-{ins}", title="Compte rendu v1"), DOC)
    fed.set_directives(ins, "mask", first.id)
    second = record(ins, f"mv2-{ins}", title="Compte rendu v2")
    second.supersedes = first.id
    fed.put("11", second, DOC)
    plain = fed.put("11", record(ins, f"mvp-{ins}"), DOC)
    fed.wait_fragments(ins, {"11": 3})
    include = dpb.GetConsolidatedViewRequest(patient_ins=ins, include_superseded=True)
    view = fed.dir(OTHER).GetConsolidatedView(include, metadata=fed.md(OTHER, ins), timeout=10)
    check_view(view, {plain.id})  # neither version of the masked record
    mine = fed.dir(patient_identity(ins)).GetConsolidatedView(
        include, metadata=fed.md(patient_identity(ins), ins), timeout=10
    )
    assert {r.id: r.masked for r in mine.records} == {
        first.id: True,
        f"mv2-{ins}": True,
        plain.id: False,
    }


# -- bugs found ---------------------------------------------------------------------------


def test_directives_outlive_the_certificate_that_signed_them(fed: Fed) -> None:
    expiry = datetime.now(UTC) + timedelta(seconds=3)
    ins = fed.new_patient(not_after=expiry)
    with setup():
        doc = fed.put("11", record(ins, f"outlive-{ins}"))
        fed.wait_fragments(ins, {"11": 1})
        fed.set_directives(ins, "block", OTHER_DOCTOR)  # signed while the certificate is valid
        wait_for(
            lambda: datetime.now(UTC) > expiry + timedelta(seconds=1),
            "the patient's certificate to expire",
        )
    try:
        view = fed.view(DOC, ins)
    except grpc.RpcError as exc:
        raise AssertionError(
            f"the doctor cannot read the record any more: {exc.code()}: {exc.details()}"
        ) from None
    check_view(view, {doc.id})
    assert code_of(lambda: fed.view(OTHER, ins)) == PERMISSION_DENIED  # the block still holds

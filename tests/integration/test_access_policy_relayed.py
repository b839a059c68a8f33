"""Issue 4 §6 over mutual TLS: assertions the directory relays to the nodes: no replay,
a node's refusal reported in the view, a revoked signer refused once the CRL says so.
Helpers: access_federation.py.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from tests.integration.access_federation import (
    DIRECTORY,
    DOC,
    OK,
    REVOKED,
    UNAUTHENTICATED,
    Fed,
    K,
    S,
    Target,
    check_view,
    code_of,
    eventually,
    practitioner,
    record,
    refusal,
)


def test_a_replayed_assertion_is_refused_by_the_node(fed: Fed, target: Target) -> None:
    md = fed.md(DOC, target.ins)
    request = npb.ListRecordsRequest(patient_ins=target.ins)
    stub = fed.node(DOC, "11")
    assert [r.id for r in stub.ListRecords(request, metadata=md, timeout=10).records] == [
        target.doc.id
    ]
    err = refusal(lambda: stub.ListRecords(request, metadata=md, timeout=10))
    assert err.code() == UNAUTHENTICATED
    assert "already used" in (err.details() or "")


def test_a_replayed_assertion_is_refused_by_the_directory(fed: Fed, target: Target) -> None:
    md = fed.md(DOC, target.ins)
    request = dpb.GetConsolidatedViewRequest(patient_ins=target.ins)
    stub = fed.dir(DOC)
    check_view(
        stub.GetConsolidatedView(request, metadata=md, timeout=10), {target.doc.id, target.rx.id}
    )
    err = refusal(lambda: stub.GetConsolidatedView(request, metadata=md, timeout=10))
    assert err.code() == UNAUTHENTICATED
    assert "already used" in (err.details() or "")


def test_an_assertion_relayed_by_the_directory_cannot_be_replayed_at_a_node(
    fed: Fed, target: Target
) -> None:
    md = fed.md(DOC, target.ins)
    check_view(
        fed.dir(DOC).GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=target.ins), metadata=md, timeout=10
        ),
        {target.doc.id, target.rx.id},
    )
    for region in ("11", "53"):  # both saw it, relayed
        list_records = fed.node(DOC, region).ListRecords
        request = npb.ListRecordsRequest(patient_ins=target.ins)
        err = refusal(partial(list_records, request, metadata=md, timeout=10))
        assert err.code() == UNAUTHENTICATED


def test_a_node_refusal_shows_in_the_view_as_a_refused_region(fed: Fed, target: Target) -> None:
    """The assertion is valid for the directory, but node 53 has already seen it."""
    md = fed.md(DOC, target.ins)
    used = fed.node(DOC, "53").ListRecords(
        npb.ListRecordsRequest(patient_ins=target.ins), metadata=md, timeout=10
    )
    assert [r.id for r in used.records] == [target.rx.id]
    view = fed.dir(DOC).GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=target.ins), metadata=md, timeout=10
    )
    assert [r.id for r in view.records] == [target.doc.id]
    states = {s.region: (s.state, s.record_count) for s in view.regions}
    assert states == {"11": (S.REGION_STATE_ANSWERED, 1), "53": (S.REGION_STATE_REFUSED, 0)}
    message = next(s.message for s in view.regions if s.region == "53")
    assert "already used" in message
    assert target.rx.title not in message


def test_a_revoked_signer_is_refused_once_the_crl_says_so(fed: Fed) -> None:
    ins = fed.new_patient()
    revoked = practitioner(REVOKED)
    doc = fed.put("11", record(ins, f"rev-doc-{ins}"))
    rx = fed.put("53", record(ins, f"rev-rx-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    fed.wait_fragments(ins, {"11": 1, "53": 1})

    def relayed(region: str) -> Callable[[], object]:
        """The revoked doctor's assertion, carried by the directory's certificate."""
        return lambda: fed.node(DIRECTORY, region).ListRecords(
            npb.ListRecordsRequest(patient_ins=ins), metadata=fed.md(revoked, ins), timeout=10
        )

    def with_other_transport() -> object:
        """The revoked doctor's assertion at the directory, over another's connection."""
        return fed.dir(DOC).GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=ins),
            metadata=fed.md(revoked, ins),
            timeout=10,
        )

    assert fed.listed_ids(revoked, "11", ins) == {doc.id}
    assert code_of(relayed("11")) == OK and code_of(relayed("53")) == OK
    check_view(fed.view(revoked, ins), {doc.id, rx.id})
    fed.pki.revoke(revoked)
    for region in ("11", "53"):
        eventually(relayed(region), UNAUTHENTICATED, f"node {region} to read the new CRL")
        assert "revoked" in (refusal(relayed(region)).details() or "")
    eventually(with_other_transport, UNAUTHENTICATED, "the directory to read the new CRL")
    assert "revoked" in (refusal(with_other_transport).details() or "")
    # Its own connections are refused too.
    assert code_of(lambda: fed.listed(revoked, "11", ins)) == UNAUTHENTICATED
    assert code_of(lambda: fed.view(revoked, ins)) == UNAUTHENTICATED

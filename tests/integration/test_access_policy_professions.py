"""Issue 4 §6 over mutual TLS: each profession against each kind of record, and a region
whose operator's matrix refuses a profession. Helpers: access_federation.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest

from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import record_pb2
from tests.access_rules import PHYSIO, PROFESSION_SEES, TABLE, THE_PATIENT
from tests.federation import PHARMACIST
from tests.integration.access_federation import (
    DOC,
    NOT_FOUND,
    OK,
    PERMISSION_DENIED,
    SPECIAL,
    Fed,
    K,
    S,
    check_view,
    code_of,
    patient_identity,
    practitioner,
    record,
    refusal,
)

# -- 1. the profession matrix: each profession against each kind ------------------------------


@dataclass(frozen=True)
class Table:
    ins: str
    records: dict[str, record_pb2.Record]


@pytest.fixture(scope="module")
def table(fed: Fed) -> Table:
    ins = fed.new_patient()
    records = {}
    for name, (kind, code, region) in TABLE.items():
        author = patient_identity(ins) if kind == K.RECORD_KIND_PATIENT_NOTE else DOC
        records[name] = fed.put(region, record(ins, f"t-{name}", kind, code, name), author)
    fed.wait_fragments(ins, {"11": 6, "53": 5})
    return Table(ins, records)


@pytest.mark.parametrize(
    ("who", "sees"), [pytest.param(who, sees, id=who[0]) for who, sees in PROFESSION_SEES.items()]
)
def test_each_profession_reads_the_kinds_of_the_default_matrix(
    fed: Fed, table: Table, who: tuple[str, str], sees: set[str]
) -> None:
    profession, rpps = who
    if rpps == THE_PATIENT:
        identity = patient_identity(table.ins)
    else:
        identity = practitioner(rpps)
        assert fed.signer(identity).principal.profession == profession
    expected = {table.records[name].id for name in sees}
    check_view(fed.view(identity, table.ins), expected)
    at_nodes = fed.listed_ids(identity, "11", table.ins) or set()
    at_nodes |= fed.listed_ids(identity, "53", table.ins) or set()
    assert at_nodes == expected
    for name, stored in table.records.items():
        wanted = OK if name in sees else NOT_FOUND
        got = code_of(partial(fed.get_record, identity, stored.region, table.ins, stored.id))
        assert got == wanted, f"GetRecord {name}"
        got = code_of(partial(fed.fetch, identity, table.ins, stored))
        assert got == wanted, f"FetchRecordContent {name}"


def test_a_view_counts_only_what_it_returns_page_after_page(fed: Fed, table: Table) -> None:
    identity = practitioner(PHARMACIST)
    request = dpb.GetConsolidatedViewRequest(patient_ins=table.ins, page_size=1)
    seen: list[str] = []
    while True:
        page = fed.dir(identity).GetConsolidatedView(
            request, metadata=fed.md(identity, table.ins), timeout=10
        )
        assert len(page.records) <= 1
        assert sum(s.record_count for s in page.regions) == len(page.records)
        for status in page.regions:
            assert status.state == S.REGION_STATE_ANSWERED
            assert status.record_count == sum(1 for r in page.records if r.region == status.region)
        seen += [r.id for r in page.records]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    readable = PROFESSION_SEES["pharmacist", PHARMACIST]
    assert sorted(seen) == sorted(table.records[name].id for name in readable)


def test_a_region_whose_matrix_refuses_a_profession_is_reported_refused(fed: Fed) -> None:
    ins = fed.new_patient()
    physio = practitioner(PHYSIO)
    here = fed.put("11", record(ins, f"rx11-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    there = fed.put(SPECIAL, record(ins, f"rx93-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    fed.wait_fragments(ins, {"11": 1, SPECIAL: 1})
    check_view(fed.view(DOC, ins), {here.id, there.id})  # the doctor reads both regions
    view = fed.view(physio, ins)
    assert [r.id for r in view.records] == [here.id]
    states = {s.region: (s.state, s.record_count) for s in view.regions}
    assert states == {"11": (S.REGION_STATE_ANSWERED, 1), SPECIAL: (S.REGION_STATE_REFUSED, 0)}
    err = refusal(lambda: fed.listed(physio, SPECIAL, ins))
    assert err.code() == PERMISSION_DENIED
    assert "physiotherapist" in (err.details() or "")
    assert code_of(lambda: fed.fetch(physio, ins, there)) == PERMISSION_DENIED

"""Issue 11: FindPrescriptions at the directory asks every region holding the patient's
records in parallel, merges newest first, and answers one status per region: a region
that is down is named, the others still answer. Real mTLS, SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import prescription_pb2 as pb
from tests.integration.prescription_federation import (
    RxFed,
    pharmacist,
    prescription_id,
    refusal,
    running_rx_federation,
)

S = dpb.RegionState


@pytest.fixture
def fed(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[RxFed]:
    with running_rx_federation(pki_dir, db_factory) as federation:
        yield federation


def ids(found: list[pb.StoredPrescription]) -> list[str]:
    return [prescription_id(s) for s in found]


def test_find_merges_every_region_newest_first(fed: RxFed) -> None:
    ins = fed.new_patient()
    written = [prescription_id(fed.prescribe(ins, region=r)) for r in ("11", "84", "53", "11")]
    other = fed.new_patient(("11",))
    fed.prescribe(other, region="11")
    found = fed.rx(pharmacist("84")).find(ins)
    assert ids(found.prescriptions) == list(reversed(written))
    assert [s.region for s in found.prescriptions] == ["11", "53", "84", "11"]
    assert {r: (s.state, s.record_count) for r, s in found.regions.items()} == {
        "11": (S.REGION_STATE_ANSWERED, 2),
        "53": (S.REGION_STATE_ANSWERED, 1),
        "84": (S.REGION_STATE_ANSWERED, 1),
    }
    # The patient finds their own.
    assert ids(fed.rx(f"patient-{ins}").find(ins).prescriptions) == list(reversed(written))


def test_find_with_a_region_down_names_it_and_the_others_answer(fed: RxFed) -> None:
    ins = fed.new_patient()
    kept = [prescription_id(fed.prescribe(ins, region=r)) for r in ("11", "53")]
    fed.prescribe(ins, region="84")
    fed.nodes["84"].stop(grace=None)
    found = fed.rx(pharmacist("53")).find(ins)
    assert ids(found.prescriptions) == list(reversed(kept))
    assert found.regions["11"].state == S.REGION_STATE_ANSWERED
    assert found.regions["53"].state == S.REGION_STATE_ANSWERED
    down = found.regions["84"]
    assert down.state in (S.REGION_STATE_UNAVAILABLE, S.REGION_STATE_DEADLINE_EXCEEDED)
    assert "84" in down.message


def test_find_by_someone_who_may_not_is_refused_before_any_region(fed: RxFed) -> None:
    ins = fed.new_patient(("11",))
    fed.prescribe(ins, region="11")
    other = fed.new_patient(("11",))
    # Another patient may not search this patient's prescriptions.
    answer = refusal(lambda: fed.rx(f"patient-{other}").find(ins))
    assert answer.code == grpc.StatusCode.PERMISSION_DENIED

"""Issue 11: exactly once under concurrency, through the directory. Thirty dispensings of
the same prescription race from three pharmacists (pharmacies in three regions), each
over its own mutual-TLS channel to the directory, which relays them to the owning node:
exactly as many succeed as the prescription allows, the others are refused with a reason,
and what remains is exact. SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dmp.prescription_client import PrescriptionClient
from dmp.server import error_reason
from dmp.v1 import prescription_pb2 as pb
from tests.integration.prescription_federation import (
    PHARMACISTS,
    RxFed,
    pharmacist,
    pharmacy,
    prescription_id,
    running_rx_federation,
)

RACERS = 30
RENEWALS = 2
QUANTITY = 2


@pytest.fixture
def fed(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[RxFed]:
    with running_rx_federation(pki_dir, db_factory) as federation:
        yield federation


def test_thirty_pharmacies_racing_through_the_directory_dispense_exactly_as_allowed(
    fed: RxFed,
) -> None:
    ins = fed.new_patient(("11",))
    stored = fed.prescribe(ins, region="11", renewals=RENEWALS)
    pid = prescription_id(stored)
    allowed = RENEWALS + 1
    regions = sorted(PHARMACISTS)
    clients: list[tuple[str, PrescriptionClient]] = [
        (regions[k % 3], fed.rx(pharmacist(regions[k % 3]))) for k in range(RACERS)
    ]
    for _, client in clients:
        client.wait_ready()
    start = threading.Barrier(RACERS)
    outcomes: list[str] = []
    lock = threading.Lock()

    def race(k: int) -> None:
        region, client = clients[k]
        start.wait()
        try:
            client.dispense(
                pid, [pb.DispensedLine(line=0, quantity=QUANTITY)], pharmacy=pharmacy(region)
            )
            outcome = "OK"
        except grpc.RpcError as exc:
            outcome = f"{exc.code().name} {error_reason(exc)}"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=race, args=(k,)) for k in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcomes) == RACERS
    counted = Counter(outcomes)
    assert counted["OK"] == allowed, counted
    refused = {o for o in outcomes if o != "OK"}
    assert all(o.startswith("FAILED_PRECONDITION ") for o in refused), counted
    state = fed.rx(pharmacist("84")).get(pid).state
    assert state.status == pb.PRESCRIPTION_STATUS_COMPLETED
    assert len(state.dispensations) == allowed
    assert [d.dispensing for d in state.dispensations] == list(range(allowed))
    assert all([(line.line, line.quantity) for line in d.lines] == [(0, QUANTITY)]
               for d in state.dispensations)  # fmt: skip
    assert all(r.quantity == 0 for r in state.remaining)
    assert state.renewals_remaining == 0
    # The node holds the same, asked directly.
    direct = fed.rx(pharmacist("11"), "11").get(pid).state
    assert direct.dispensations == state.dispensations

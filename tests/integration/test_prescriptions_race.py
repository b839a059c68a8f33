"""Exactly once under concurrency, at the node, on SQLite and PostgreSQL: pharmacies racing
on one prescription get exactly as many dispensings as it allows, and retries racing with
one idempotency key record one dispensing."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from dmp.db import make_engine
from dmp.prescriptions import ALREADY_DISPENSED
from dmp.server import error_reason
from tests.federation import DOCTOR
from tests.integration.prescription_helpers import (
    PHARMACISTS,
    Actor,
    make_rx_pki,
    practitioner,
    rx_id,
    rx_node,
)

#: 30 racing dispensings from 5 pharmacies, 6 each (fewer than the calls one certificate
#: may have waiting for their request).
RACERS = 30


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rx-race-pki")
    make_rx_pki(directory)
    return directory


@pytest.fixture
def port(rx_pki: Path, db_url: str) -> Iterator[int]:
    with rx_node(rx_pki, db_url) as (running, _):
        yield running.port


def _rows(db_url: str, query: str, **params: object) -> list[tuple[object, ...]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(query), params)]
    finally:
        engine.dispose()


def test_thirty_pharmacies_racing_get_exactly_the_allowed_dispensings(
    rx_pki: Path, port: int, db_url: str
) -> None:
    doctor = Actor(rx_pki, practitioner(DOCTOR), port)
    pharmacies = [Actor(rx_pki, practitioner(rpps), port) for rpps in PHARMACISTS]
    try:
        rx = rx_id(doctor.prescribe(renewals=2))
        start = threading.Barrier(RACERS)

        def dispense(i: int) -> tuple[str, int | str]:
            pharmacy = pharmacies[i % len(pharmacies)]
            start.wait()
            try:
                answer = pharmacy.dispense(rx, (2, 1))
            except grpc.RpcError as exc:
                return exc.code().name, error_reason(exc) or ""
            return "OK", answer.dispensation.dispensing

        with ThreadPoolExecutor(RACERS) as pool:
            outcomes = list(pool.map(dispense, range(RACERS)))
        succeeded = sorted(n for code, n in outcomes if code == "OK")
        assert succeeded == [0, 1, 2], outcomes
        refused = Counter(outcomes[i] for i in range(RACERS) if outcomes[i][0] != "OK")
        assert refused == {("FAILED_PRECONDITION", ALREADY_DISPENSED): RACERS - 3}
        state = pharmacies[0].get(rx).state
        assert [r.quantity for r in state.remaining] == [0, 0]
        assert [d.dispensing for d in state.dispensations] == [0, 1, 2]
        assert state.renewals_remaining == 0
        stored = _rows(
            db_url,
            "SELECT count(*) FROM dispensations WHERE prescription_id = :rx",
            rx=rx,
        )
        records = _rows(
            db_url,
            "SELECT count(*) FROM records WHERE prescription_id = :rx AND kind = 'dispensation'",
            rx=rx,
        )
        assert stored == [(3,)] and records == [(3,)]
    finally:
        for actor in (doctor, *pharmacies):
            actor.close()


def test_retries_racing_with_one_key_record_one_dispensing(
    rx_pki: Path, port: int, db_url: str
) -> None:
    doctor = Actor(rx_pki, practitioner(DOCTOR), port)
    # One pharmacy's software retrying on several connections at once.
    tills = [Actor(rx_pki, practitioner(PHARMACISTS[0]), port) for _ in range(6)]
    try:
        for round_ in range(4):
            rx = rx_id(doctor.prescribe(renewals=3))
            start = threading.Barrier(len(tills))
            key = f"till-retry-{round_:04d}"

            def dispense(
                i: int, rx: str = rx, key: str = key, start: threading.Barrier = start
            ) -> str:
                start.wait()
                return tills[i].dispense(rx, key=key).dispensation.id

            with ThreadPoolExecutor(len(tills)) as pool:
                ids = list(pool.map(dispense, range(len(tills))))
            assert len(set(ids)) == 1, ids
            state = tills[0].get(rx).state
            assert len(state.dispensations) == 1 and state.renewals_remaining == 2
            assert _rows(
                db_url, "SELECT count(*) FROM dispensations WHERE prescription_id = :rx", rx=rx
            ) == [(1,)]
    finally:
        for actor in (doctor, *tills):
            actor.close()

"""Once DispensePrescription answered OK, kill -9 of the node loses nothing: the node as an
operator runs it (its own process), on SQLite and PostgreSQL."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from dmp.v1 import record_pb2
from tests.federation import DOCTOR, dmp_process, wait_listening
from tests.integration.prescription_helpers import (
    PHARMACISTS,
    Actor,
    make_rx_pki,
    practitioner,
    rx_id,
)


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rx-process-pki")
    make_rx_pki(directory)
    return directory


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_an_acknowledged_dispensing_survives_kill_9(rx_pki: Path, db_url: str) -> None:
    args = ["node", "serve", "--pki", str(rx_pki), "--region", "11", "--db", db_url]
    process = dmp_process(*args)
    try:
        port = _port(wait_listening(process))
        doctor = Actor(rx_pki, practitioner(DOCTOR), port)
        pharmacist = Actor(rx_pki, practitioner(PHARMACISTS[0]), port)
        rx = rx_id(doctor.prescribe(renewals=1))
        given = pharmacist.dispense(rx, key="ticket-before-kill").dispensation
        doctor.close()
        pharmacist.close()
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL

    again = dmp_process(*args)
    try:
        port = _port(wait_listening(again))
        doctor = Actor(rx_pki, practitioner(DOCTOR), port)
        pharmacist = Actor(rx_pki, practitioner(PHARMACISTS[0]), port)
        state = pharmacist.get(rx).state
        assert list(state.dispensations) == [given]
        assert state.renewals_remaining == 0
        records = doctor.records_of()
        dispensations = [r for r in records if r.kind == record_pb2.RECORD_KIND_DISPENSATION]
        assert [(r.id, r.prescription_id) for r in dispensations] == [(given.id, rx)]
        # The retry the pharmacy's software makes after the outage answers the same.
        assert pharmacist.dispense(rx, key="ticket-before-kill").dispensation == given
        doctor.close()
        pharmacist.close()
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=30)
    assert again.returncode == 0

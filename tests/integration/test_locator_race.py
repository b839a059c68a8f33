"""Writers racing the locator outbox: every stored record reaches the directory's counts.

On PostgreSQL a record's outbox row takes its seq when it is inserted, before the audit
lock that orders commits, so rows commit out of seq order. Delivery must forget only the
rows it read and reported; forgetting "everything up to the highest seq read" deleted rows
that committed just after the read, and their patients' records never showed in a view.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from directory.app import RunningDirectory
from directory.bulk import load_patients
from dmp.db import make_engine
from dmp.synth import patient_rows
from dmp.v1 import node_service_pb2 as npb
from node.app import RunningNode
from node.models import RecordRow
from tests.federation import (
    DOCTOR,
    client,
    draft,
    running_directory,
    running_node,
)

WRITERS = 6
#: Patients written, one record each: on PostgreSQL enough that the old range delete lost
#: several of them in every run; SQLite orders writes by its write lock, fewer suffice.
PATIENTS = {"postgresql": 800, "sqlite": 300}


@dataclass
class Federation:
    directory: RunningDirectory
    node: RunningNode
    node_db: str
    patients: int


@pytest.fixture
def federation(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[Federation]:
    """A directory that knows the patients (bulk-loaded, as a first load is) and a node."""
    node_db, directory_db = db_factory("node"), db_factory("directory")
    with running_directory(pki_dir, directory_db, health_interval=0.2) as directory:
        engine = make_engine(directory_db)
        try:
            count = PATIENTS[engine.dialect.name]
            assert load_patients(engine, patient_rows(0, count)) == count
        finally:
            engine.dispose()
        with running_node(pki_dir, "11", node_db, directory=f"127.0.0.1:{directory.port}") as node:
            yield Federation(directory, node, node_db, count)


def _node_counts(db_url: str) -> dict[str, int]:
    """What the node holds, per patient, read from its database."""
    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            rows = session.execute(
                select(RecordRow.patient_ins, func.count()).group_by(RecordRow.patient_ins)
            ).all()
    finally:
        engine.dispose()
    return {ins: count for ins, count in rows}


def test_locator_counts_equal_the_nodes_records_when_writers_race_delivery(
    pki_dir: Path, federation: Federation
) -> None:
    node, directory = federation.node, federation.directory
    patients = [row[0] for row in patient_rows(0, federation.patients)]

    # One record per patient (a lost notification is then a patient missing from the
    # locator), written by racing threads while the node's delivery thread reports after
    # every commit.
    writes = list(patients)
    random.Random(9).shuffle(writes)
    local = threading.local()
    clients = []
    lock = threading.Lock()

    def put(numbered: tuple[int, str]) -> None:
        n, ins = numbered
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
            with lock:
                clients.append(c)
        record = draft(ins, record_id=f"race-{n}")
        c.node.PutRecord(npb.PutRecordRequest(record=record, content=b"x"), timeout=30)

    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(put, enumerate(writes)))
    for c in clients:
        c.close()

    # Writers done: stop the background delivery, then deliver what is left from here.
    delivery = node.delivery
    assert delivery is not None
    delivery.close()
    while delivery.deliver_once():
        pass

    stored = _node_counts(federation.node_db)
    assert sum(stored.values()) == len(writes)
    located = {}
    for ins in patients:
        for fragment in directory.index.fragments(ins):
            located[ins] = fragment.record_count
    missing = {ins: (n, located.get(ins, 0)) for ins, n in stored.items() if located.get(ins) != n}
    assert not missing, (
        f"{len(missing)} patients' counts at the directory differ from the node's"
        f" (stored, located): {dict(list(missing.items())[:5])}"
    )

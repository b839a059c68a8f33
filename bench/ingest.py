"""Section d: how fast a node stores records, durably, on SQLite and on PostgreSQL.

One node process (`dmp node serve --db URL`, no directory: the locator outbox is written
with every record but not delivered) and one client process, the benchmark. Three ways
of writing, each run several times with records never stored before:

- single PutRecord calls one after the other (each acknowledged once durable);
- single PutRecord calls from a few client threads at once (`parallel`), and from many
  (`concurrent`, client threads spread over a few channels and identities);
- one IngestRecords stream, several records a message (the node commits a batch of up
  to 1,000 records at a time).

And, to read the write figures against the disk, how many durable commits per second the
same database takes in the same run: a loop of tiny write transactions (one row inserted,
then committed) from the benchmark process, on the node's SQLite file (WAL,
synchronous=FULL, as the node opens it) or PostgreSQL database, into a scratch table
dropped after.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Column, Float, Integer, MetaData, Table, insert

from bench.clients import channel, patient_call_metadata, wait_ready
from bench.procs import BenchError
from bench.report import say
from bench.stats import Goal, Results
from dmp import synth
from dmp.client import INGEST_MESSAGE_RECORDS, ingest_messages
from dmp.db import make_engine, writer
from dmp.demo import Service
from dmp.v1 import node_service_pb2, node_service_pb2_grpc

_NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class IngestPlan:
    runs: int = 5
    puts: int = 400
    parallel: int = 4
    concurrent: int = 16
    commits: int = 200
    batch: int = 5000
    seed: int = 0


class _Source:
    """Records to write: synthetic ones, each written under a fresh id."""

    def __init__(self, region: str, seed: int, patients: int = 100, per_patient: int = 20) -> None:
        self._drafts: list[tuple[synth.SyntheticPatient, synth.SyntheticRecord]] = []
        for patient in synth.patients(patients, seed=seed + 1, regions=[region]):
            for record in synth.records_for(
                patient, regions=[region], per_region=per_patient, seed=seed, now=_NOW
            ):
                self._drafts.append((patient, record))
        self._next = 0

    def warm_requests(self) -> list[node_service_pb2.PutRecordRequest]:
        """One record of each patient."""
        seen: dict[str, node_service_pb2.PutRecordRequest] = {}
        for n, (patient, record) in enumerate(self._drafts):
            if patient.ins not in seen:
                seen[patient.ins] = node_service_pb2.PutRecordRequest(
                    record=record.to_proto(f"warm-{n}"),
                    content=record.content,
                    patient=patient.to_proto(),
                )
        return list(seen.values())

    def requests(self, tag: str, count: int) -> list[node_service_pb2.PutRecordRequest]:
        out = []
        for _ in range(count):
            patient, record = self._drafts[self._next % len(self._drafts)]
            out.append(
                node_service_pb2.PutRecordRequest(
                    record=record.to_proto(f"{tag}-{self._next}"),
                    content=record.content,
                    patient=patient.to_proto(),
                )
            )
            self._next += 1
        return out


def measure_ingest(
    engine: str,
    db_url: str,
    pki_dir: Path,
    writer: str,
    workdir: Path,
    plan: IngestPlan,
    results: Results,
    *,
    region: str = "11",
    note: str = "",
    writers: Sequence[str] = (),
) -> None:
    """Ingest figures of one database engine (`engine` names it in the figures). The many
    concurrent clients write as `writers` (one channel each; `writer` alone if none)."""
    node = Service(
        f"ingest node ({engine})",
        ["node", "serve", "--pki", str(pki_dir), "--region", region, "--db", db_url],
        workdir / "logs" / f"ingest-node-{engine}.log",
    )
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    source = _Source(region, plan.seed)
    people = list(writers) or [writer]
    details = results.detail("d_ingest").setdefault(engine, {})
    details.update(
        {
            "database": db_url.split("@")[-1] if "@" in db_url else db_url.rsplit("/", 1)[-1],
            "puts_per_run": plan.puts,
            "parallel_clients": plan.parallel,
            "concurrent_clients": plan.concurrent,
            "concurrent_identities": len(people),
            "records_per_stream": plan.batch,
            "durable_commits_per_run": plan.commits,
            "records_per_message": INGEST_MESSAGE_RECORDS,
            "mean_content_bytes": round(
                sum(len(r.content) for r in source.requests("probe", 200)) / 200
            ),
        }
    )
    if note:
        details["durability"] = note
    node.start()
    conns = [channel(node.address, pki_dir, person) for person in people]
    try:
        for conn in conns:
            wait_ready(conn)
        stubs = [node_service_pb2_grpc.NodeServiceStub(conn) for conn in conns]
        stub = stubs[0]

        def put(request: node_service_pb2.PutRecordRequest, k: int = 0) -> None:
            who = people[k % len(people)]
            metadata = patient_call_metadata(pki_dir, who, request.record.patient_ins, "WRITE")
            stubs[k % len(stubs)].PutRecord(request, timeout=60, metadata=metadata)

        def put_all(requests: Sequence[node_service_pb2.PutRecordRequest], k: int = 0) -> None:
            for request in requests:
                put(request, k)

        def put_at_once(tag: str, clients: int, spread: bool) -> float:
            """The rate of `plan.puts` single puts from `clients` threads (over the
            writers' channels when `spread`, else all as `writer`)."""
            requests = source.requests(tag, plan.puts)
            shares = [requests[k::clients] for k in range(clients)]
            with ThreadPoolExecutor(max_workers=clients) as pool:
                start = time.perf_counter()
                list(pool.map(put_all, shares, range(clients) if spread else [0] * clients))
                return plan.puts / (time.perf_counter() - start)

        def stream(messages: Sequence[node_service_pb2.IngestRecordsRequest]) -> int:
            metadata = patient_call_metadata(pki_dir, writer, None, "WRITE")
            answer = stub.IngestRecords(iter(messages), timeout=600, metadata=metadata)
            return int(answer.stored_count)

        # One record per patient first: the node then knows every patient's traits. (On
        # PostgreSQL, concurrent first writes for one new patient race on its identity row
        # and one fails: see the benchmark's notes.)
        put_all(source.warm_requests())
        for run in range(plan.runs):
            say(f"d: {engine} run {run + 1}/{plan.runs}")
            commits = durable_commits(db_url, plan.commits)
            results.figure(
                f"d.{engine}.durable_commits",
                "d",
                f"{engine}: durable commits/s (one-row transactions, same database)",
                "commits/s",
                headline=True,
            ).values.append(commits)

            requests = source.requests(f"seq{run}", plan.puts)
            start = time.perf_counter()
            put_all(requests)
            rate = plan.puts / (time.perf_counter() - start)
            results.figure(
                f"d.{engine}.put_sequential",
                "d",
                f"{engine}: single durable PutRecord, 1 client",
                "rec/s",
                goal=Goal(">=", 2000.0),
                headline=True,
            ).values.append(rate)
            results.figure(
                f"d.{engine}.put_sequential_of_commits",
                "d",
                f"{engine}: 1-client PutRecord rate / durable commits/s",
                "%",
                goal=Goal(">=", 80.0, "issue 15"),
                headline=True,
            ).values.append(100.0 * rate / commits)

            results.figure(
                f"d.{engine}.put_parallel",
                "d",
                f"{engine}: single durable PutRecord, {plan.parallel} clients",
                "rec/s",
                goal=Goal(">=", 2000.0),
                headline=True,
            ).values.append(put_at_once(f"par{run}", plan.parallel, spread=False))

            results.figure(
                f"d.{engine}.put_concurrent",
                "d",
                f"{engine}: single durable PutRecord, {plan.concurrent} clients",
                "rec/s",
                goal=Goal(">=", 2000.0, "issue 15"),
                headline=True,
            ).values.append(put_at_once(f"con{run}", plan.concurrent, spread=True))

            # Built before the clock starts, as the client's messages (several records
            # each, as dmp/client.py sends them).
            messages = list(ingest_messages(source.requests(f"bat{run}", plan.batch)))
            start = time.perf_counter()
            stored = stream(messages)
            rate = plan.batch / (time.perf_counter() - start)
            if stored != plan.batch:
                raise BenchError(f"IngestRecords stored {stored} of {plan.batch} records")
            results.figure(
                f"d.{engine}.ingest_batched",
                "d",
                f"{engine}: IngestRecords stream",
                "rec/s",
                goal=Goal(">=", 20000.0),
                headline=True,
            ).values.append(rate)
    finally:
        for conn in conns:
            conn.close()
        node.stop()


def durable_commits(db_url: str, count: int) -> float:
    """Durable commits per second on this database: `count` write transactions of one row
    each, opened as the node opens its database (dmp/db.py), into a scratch table dropped
    after (the disk's flush rate, with the driver's round trips)."""
    engine = make_engine(db_url, pool_size=1)
    probe = Table(
        "bench_commit_probe",
        MetaData(),
        Column("n", Integer, primary_key=True, autoincrement=True),
        Column("at", Float, nullable=False),
    )
    try:
        probe.drop(engine, checkfirst=True)
        probe.create(engine)
        writes = writer(engine)
        statement = insert(probe)
        start = time.perf_counter()
        for _ in range(count):
            with writes.begin() as conn:
                conn.execute(statement, {"at": time.time()})
        rate = count / (time.perf_counter() - start)
        probe.drop(engine)
    finally:
        engine.dispose()
    return rate

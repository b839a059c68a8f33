"""Section e: the national directory with millions of patients, on SQLite and PostgreSQL.

Load N synthetic patients with directory/bulk.py (timed, every run: no cached database),
measure the database on disk, look patients up in-process (PatientIndex.get, the
benchmark's own engine) and over gRPC (GetPatient to a `dmp directory serve` process on
that database), and read the directory process's memory after start and while it answers.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from bench.clients import channel, patient_call_metadata, wait_ready
from bench.procs import RssSampler, peak_rss_mib, rss_mib
from bench.report import say
from bench.stats import Goal, Results, p50, p99
from directory.app import MIGRATIONS
from directory.bulk import load_patients
from directory.index import PatientIndex
from dmp import synth
from dmp.db import make_engine, upgrade
from dmp.demo import Service
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import directory_service_pb2_grpc

MiB = 1024 * 1024


def _mb(mib: float | None) -> float | None:
    return None if mib is None else round(mib * MiB / 1e6, 1)


def _sizes(engine: Engine, url: str) -> dict[str, Any]:
    """Bytes on disk: the whole database, and the table and its primary key index."""
    if engine.dialect.name == "sqlite":
        path = Path(url.removeprefix("sqlite:///"))
        files = {
            p.name: p.stat().st_size
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
            if p.exists()
        }
        pages: dict[str, int] = {}
        with engine.connect() as conn, contextlib.suppress(DBAPIError):  # dbstat: optional
            pages = {
                str(name): int(size)
                for name, size in conn.execute(
                    text(
                        "SELECT name, sum(pgsize) FROM dbstat"
                        " WHERE name IN ('patients', 'sqlite_autoindex_patients_1') GROUP BY name"
                    )
                ).all()
            }
        return {
            "database_bytes": sum(files.values()),
            "files": files,
            "table_bytes": pages.get("patients"),
            "pk_index_bytes": pages.get("sqlite_autoindex_patients_1"),
        }
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT pg_database_size(current_database()), pg_relation_size('patients'),"
                " pg_indexes_size('patients'), pg_total_relation_size('patients')"
            )
        ).one()
    return {
        "database_bytes": int(row[0]),
        "table_bytes": int(row[1]),
        "pk_index_bytes": int(row[2]),
        "table_total_bytes": int(row[3]),
    }


def _lookups(call: Callable[[str], object], sample: list[str]) -> list[float]:
    latencies = []
    for ins in sample:
        start = time.perf_counter()
        call(ins)
        latencies.append((time.perf_counter() - start) * 1000.0)
    return latencies


def measure_directory(
    engine_name: str,
    url: str,
    patients: int,
    pki_dir: Path,
    reader: str,
    workdir: Path,
    results: Results,
    *,
    runs: int,
    lookups: int,
    seed: int = 0,
) -> None:
    """Load, size, look up and weigh a directory of `patients` patients on one engine."""
    key = f"e.{engine_name}"
    label = f"{engine_name}, {patients:,} patients"
    details = results.detail("e_directory").setdefault(engine_name, {})
    details["patients"] = patients
    engine = make_engine(url)
    try:
        upgrade(engine, MIGRATIONS, "alembic_version_directory")
        say(f"e: loading {patients:,} patients into {engine_name}")
        start = time.perf_counter()
        loaded = load_patients(engine, synth.patient_rows(0, patients, seed=seed))
        elapsed = time.perf_counter() - start
        details["load_s"] = round(elapsed, 1)
        details["loaded"] = loaded
        results.figure(
            f"{key}.load_per_s",
            "e",
            f"{label}: bulk load",
            "patients/s",
            goal=Goal(">=", 100_000.0),
            headline=True,
            note="one load per run of the benchmark (not cached); includes INS key checks",
        ).values.append(loaded / elapsed)
        sizes = _sizes(engine, url)
        details["disk"] = sizes
        details["bytes_per_patient"] = round(sizes["database_bytes"] / max(patients, 1), 1)
        results.figure(f"{key}.database_mb", "e", f"{label}: database on disk", "MB").values.append(
            sizes["database_bytes"] / 1e6
        )

        rng = random.Random(seed + 11)
        samples = [
            [synth.ins_for_index(rng.randrange(patients), seed=seed) for _ in range(lookups)]
            for _ in range(runs + 1)
        ]
        index = PatientIndex(engine)
        _lookups(index.get, samples[0][: min(200, lookups)])  # warm the pool
        for run in range(runs):
            latencies = _lookups(index.get, samples[run + 1])
            results.figure(
                f"{key}.inproc.p50_ms", "e", f"{label}: PatientIndex.get in-process, p50", "ms"
            ).values.append(p50(latencies))
            results.figure(
                f"{key}.inproc.p99_ms", "e", f"{label}: PatientIndex.get in-process, p99", "ms"
            ).values.append(p99(latencies))
    finally:
        engine.dispose()

    service = Service(
        f"directory ({engine_name}, {patients:,} patients)",
        [
            "directory",
            "serve",
            "--pki",
            str(pki_dir),
            "--db",
            url,
            "--data-dir",
            str(workdir / "data-e"),
        ],
        workdir / "logs" / f"directory-{engine_name}-scale.log",
    )
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    service.start()
    try:
        time.sleep(1.0)  # let start-up settle before reading its memory
        details["rss_after_start_mb"] = _mb(rss_mib(service.pid))
        conn = channel(service.address, pki_dir, reader)
        wait_ready(conn)
        stub = directory_service_pb2_grpc.DirectoryServiceStub(conn)

        def get(ins: str) -> object:
            metadata = patient_call_metadata(pki_dir, reader, ins, "LOOKUP")
            return stub.GetPatient(dpb.GetPatientRequest(ins=ins), timeout=10, metadata=metadata)

        with RssSampler(service.pid) as sampler:
            _lookups(get, samples[0])
            for run in range(runs):
                latencies = _lookups(get, samples[run + 1])
                results.figure(
                    f"{key}.grpc.p50_ms", "e", f"{label}: GetPatient over gRPC, p50", "ms"
                ).values.append(p50(latencies))
                results.figure(
                    f"{key}.grpc.p99_ms",
                    "e",
                    f"{label}: GetPatient over gRPC, p99",
                    "ms",
                    goal=Goal("<=", 2.0),
                    headline=True,
                ).values.append(p99(latencies))
        conn.close()
        peak = peak_rss_mib(service.pid)
        details["rss_during_lookups_max_mb"] = _mb(sampler.maximum)
        details["rss_peak_mb"] = _mb(peak)
        if peak is not None:
            results.figure(
                f"{key}.rss_mb",
                "e",
                f"{label}: directory process peak RSS",
                "MB",
                goal=Goal("<=", 300.0),
                headline=True,
                note="VmHWM after start and all the lookups; one value",
            ).values.append(peak * MiB / 1e6)
    finally:
        service.stop()
    details["lookups_per_run"] = lookups

"""`make bench` at toy sizes: the benchmark code runs end to end and writes its JSON.

A smoke test of the benchmark code only: no figure is checked (tests never assert timings).
Every section runs, against 3 regions, a handful of patients and a 1,000-patient directory,
a few dispensings and 16 racing clients on one prescription each, the nodes encrypted
in place, a backup of 40 records, a hand-over of a node holding 200 records while 2 writers
write (and every write they were told was stored read back at the successor);
PostgreSQL too when its binaries are there.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.run import main
from tests.postgres import find_binaries

SECTIONS = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")


def test_bench_runs_every_section_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    postgres = find_binaries() is not None
    argv = [
        "--out", str(out), "--workdir", str(tmp_path / "work"),
        "--regions", "3", "--patients", "6", "--wide-patients", "2", "--records-per-region", "3",
        "--runs", "2", "--views", "4", "--saturation-seconds", "0.5",
        "--saturation-clients", "1", "--saturation-threads", "2",
        "--delay-ms", "5", "--delay-views", "2",
        "--ingest-puts", "8", "--ingest-parallel", "2", "--ingest-batch", "20",
        "--directory-patients", "1000", "--directory-lookups", "10",
        "--rx-dispenses", "3", "--rx-racers", "16", "--rx-per-racer", "1",
        "--backup-records", "40",
        "--handover-records", "200", "--handover-writers", "2", "--handover-settle", "0.5",
    ]  # fmt: skip
    if not postgres:
        argv.append("--no-postgres")

    assert main(argv) == 0

    data = json.loads(out.read_text())
    assert {"machine", "config", "summary", "figures", "details", "errors"} <= data.keys()
    assert data["errors"] == {}
    machine = data["machine"]
    for key in ("cpu_count", "cpu_model", "python", "grpcio", "sqlite", "postgresql"):
        assert key in machine
    figures = {figure["key"]: figure for figure in data["figures"]}
    for figure in figures.values():
        assert {"median", "min", "max", "runs", "unit", "goal", "met"} <= figure.keys()
    assert {figure["section"] for figure in figures.values()} == set(SECTIONS)
    expected = [
        "a.view_all.p50_ms",
        "a.view_all.p99_ms",
        "a.saturation.views_per_s",
        "b.floor.p50_ms",
        "b.ratio",
        "c.one.added_ms",
        "c.all.added_ms",
        "d.sqlite.put_sequential",
        "d.sqlite.ingest_batched",
        "e.sqlite.load_per_s",
        "e.sqlite.grpc.p99_ms",
        "e.sqlite.rss_mb",
        "f.directory.peak_rss_mb",
        "g.dispense.p50_ms",
        "g.dispense.view_ratio",
        "g.race.dispensings_per_s",
        "h.view.encrypted_ratio",
        "h.encrypt.records_per_s",
        "i.sqlite.backup_mb_s",
        "i.sqlite.verify_records_s",
    ]
    if postgres:
        expected += [
            "d.postgresql.ingest_batched",
            "e.postgresql.grpc.p99_ms",
            "i.postgresql.verify_mb_s",
            "j.sqlite_to_postgresql.switch_s",
            "j.postgresql_to_sqlite.unavailable_s",
        ]
    else:
        expected += ["j.sqlite_to_sqlite.switch_s", "j.sqlite_to_sqlite.snapshot_records_s"]
    missing = [key for key in expected if key not in figures]
    assert not missing, f"figures missing from the JSON: {missing}"
    goals = [figure for figure in figures.values() if figure["goal"] is not None]
    assert goals and all(figure["met"] in (True, False) for figure in goals)

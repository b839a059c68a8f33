"""`make bench`: the federation's figures against the goals of issue 6.

    python -m bench.run                      # everything: ten minutes on 2 cores, j nine more
    python -m bench.run --quick              # smaller sizes, fewer runs (a few minutes)
    python -m bench.run --only a --only b    # some sections only
    python -m bench.run --out /tmp/x.json    # elsewhere than bench/results/latest.json

Sections (bench/README.md says what each figure means):
  a  consolidated view across the regions: latency with one in flight, saturation
  b  the floor: the same fan-out over the same mTLS channels to trivial servers
  c  views with one region, then all, behind a 50 ms delaying proxy
  d  node ingest: single durable puts and batched streams, SQLite and PostgreSQL
  e  directory with 10 million patients, SQLite and PostgreSQL
  f  peak memory of the directory and the nodes during a
  g  e-prescription: dispense through the directory (p50, ratio to a view), 16 racing clients
  h  encryption at rest: view p50 with the nodes encrypted / in clear (same run), encrypt rate
  i  backup and verify throughput (MB/s, records/s) of a node holding 100,000 records
  j  hand-over of a node holding 100,000 records to a successor host while 4 writers run

Prints a table on stdout (progress on stderr) and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.backup import BackupPlan, measure_backup
from bench.encryption import measure_encryption
from bench.federation import BenchFederation, BenchIdentities, FederationPlan, ViewPlan
from bench.handover import HandoverPlan, measure_handover
from bench.ingest import IngestPlan, measure_ingest
from bench.prescriptions import PrescriptionPlan, measure_prescriptions
from bench.report import ROOT, document, git_state, machine, say, table, write_json
from bench.stats import Results
from bench.views import Floor, measure_delay, measure_rss, measure_saturation, measure_views
from dmp.regions import METROPOLITAN

SECTIONS = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")
DEFAULT_OUT = ROOT / "bench" / "results" / "latest.json"

#: The benchmark's PostgreSQL: durable (the test cluster turns fsync, synchronous_commit and
#: full_page_writes off; here they are on), with room for bulk loads.
POSTGRES_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    "maintenance_work_mem": "512MB",
    "max_wal_size": "4GB",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="smaller sizes and fewer runs (for development)")
    add("--only", action="append", metavar="SECTION", help="run only these sections (a..j)")
    add("--out", type=Path, default=DEFAULT_OUT, help="JSON file (default %(default)s)")
    add("--workdir", type=Path, help="keep the databases and logs here (default: a temp dir)")
    add("--keep", action="store_true", help="keep the temporary work directory")
    add("--seed", type=int, default=0)
    add("--runs", type=int, help="runs of each measurement (default 5, quick 3)")
    group = parser.add_argument_group("a, b, c, f: the federation")
    group.add_argument("--regions", type=int, default=len(METROPOLITAN), help="default 13")
    group.add_argument("--patients", type=int, help="default 1000 (quick 300)")
    group.add_argument("--records-per-region", type=int, default=10)
    group.add_argument("--home-regions", type=int, default=3, help="regions of most patients")
    group.add_argument(
        "--wide-patients", type=int, help="patients with records in every region (default 100)"
    )
    group.add_argument("--views", type=int, help="views per run, one in flight (default 200)")
    group.add_argument("--saturation-seconds", type=float, help="per run (default 5)")
    group.add_argument("--saturation-clients", type=int, default=2, help="client processes")
    group.add_argument("--saturation-threads", type=int, default=4, help="per client process")
    group.add_argument("--delay-ms", type=float, default=50.0)
    group.add_argument("--delay-views", type=int, help="views per delay setting (default 40)")
    group = parser.add_argument_group("g: e-prescription")
    group.add_argument(
        "--rx-dispenses", type=int, help="dispensings per run, 1 in flight (default 100)"
    )
    group.add_argument("--rx-racers", type=int, default=16, help="racing clients (default 16)")
    group.add_argument(
        "--rx-per-racer", type=int, help="dispensings per racing client and run (default 10)"
    )
    group = parser.add_argument_group("d: ingest")
    group.add_argument("--ingest-puts", type=int, help="single puts per run (default 400)")
    group.add_argument("--ingest-parallel", type=int, default=4, help="parallel put clients")
    group.add_argument(
        "--ingest-concurrent",
        type=int,
        default=16,
        help="concurrent put clients, over the writers' channels (default 16)",
    )
    group.add_argument("--ingest-batch", type=int, help="records per stream (default 5000)")
    group = parser.add_argument_group("e: directory at scale")
    group.add_argument(
        "--directory-patients", type=int, help="default 10,000,000 (quick 1,000,000)"
    )
    group.add_argument("--directory-lookups", type=int, help="lookups per run (default 2000)")
    group = parser.add_argument_group("i: backup")
    group.add_argument(
        "--backup-records", type=int, help="records the node holds (default 100,000; quick 20,000)"
    )
    group = parser.add_argument_group("j: hand-over to a successor host")
    group.add_argument(
        "--handover-records",
        type=int,
        help="records the predecessor holds (default 100,000; quick 20,000)",
    )
    group.add_argument("--handover-writers", type=int, default=4, help="writer threads")
    group.add_argument(
        "--handover-rate",
        type=float,
        default=100.0,
        help="puts/s of all the writers together (default 100; 0: as fast as they can)",
    )
    group.add_argument(
        "--handover-settle",
        type=float,
        help="seconds of writes after the snapshot, before `complete` (default 3, quick 2)",
    )
    parser.add_argument(
        "--no-postgres",
        action="store_true",
        help="skip the PostgreSQL variants of d, e and i; j hands over from SQLite to SQLite",
    )
    return parser


def _pick(value: int | float | None, full: int | float, quick: int | float, is_quick: bool) -> Any:
    if value is not None:
        return value
    return quick if is_quick else full


def _sections(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    chosen = {part.strip().lower() for item in only for part in item.split(",") if part.strip()}
    unknown = chosen - set(SECTIONS)
    if unknown:
        raise SystemExit(f"bench: unknown section(s) {', '.join(sorted(unknown))}: a..j")
    return [s for s in SECTIONS if s in chosen]


class _Postgres:
    """One durable throwaway cluster for d and e, started on first use."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.cluster: Any = None
        self.skipped = ""

    def url(self, database: str) -> str | None:
        if not self.enabled:
            self.skipped = "--no-postgres"
            return None
        if self.cluster is None:
            from tests.postgres import PostgresCluster, PostgresError

            try:
                say("starting a throwaway PostgreSQL cluster (fsync on)")
                self.cluster = PostgresCluster(settings=POSTGRES_SETTINGS).start()
            except PostgresError as exc:
                self.enabled = False
                self.skipped = str(exc)
                say(f"PostgreSQL skipped: {exc}")
                return None
        url: str = self.cluster.create_database(database)
        return url

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def _guarded(results: Results, section: str, step: Callable[[], None]) -> None:
    """Run one section's step; a failure is reported and the other sections still run."""
    try:
        step()
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        previous = results.errors.get(section)
        message = f"{type(exc).__name__}: {exc}"
        results.errors[section] = f"{previous}; {message}" if previous else message
        say(f"section {section} failed: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    sections = _sections(args.only)
    runs = _pick(args.runs, 5, 3, quick)
    plan = FederationPlan(
        regions=tuple(METROPOLITAN[: max(1, min(args.regions, len(METROPOLITAN)))]),
        patients=_pick(args.patients, 1000, 300, quick),
        per_region=args.records_per_region,
        home_regions=args.home_regions,
        wide_patients=_pick(args.wide_patients, 100, 30, quick),
        seed=args.seed,
    )
    views = ViewPlan(
        runs=runs,
        views=_pick(args.views, 200, 60, quick),
        saturation_seconds=_pick(args.saturation_seconds, 5.0, 3.0, quick),
        saturation_processes=args.saturation_clients,
        saturation_threads=args.saturation_threads,
        delay_ms=args.delay_ms,
        delay_views=_pick(args.delay_views, 40, 20, quick),
    )
    ingest = IngestPlan(
        runs=runs,
        puts=_pick(args.ingest_puts, 400, 200, quick),
        parallel=args.ingest_parallel,
        concurrent=args.ingest_concurrent,
        batch=_pick(args.ingest_batch, 5000, 2000, quick),
        seed=args.seed,
    )
    prescriptions = PrescriptionPlan(
        runs=runs,
        dispenses=_pick(args.rx_dispenses, 100, 40, quick),
        racers=args.rx_racers,
        per_racer=_pick(args.rx_per_racer, 10, 5, quick),
    )
    backup = BackupPlan(records=_pick(args.backup_records, 100_000, 20_000, quick), seed=args.seed)
    handover = HandoverPlan(
        records=_pick(args.handover_records, 100_000, 20_000, quick),
        writers=args.handover_writers,
        rate=args.handover_rate,
        settle_seconds=_pick(args.handover_settle, 3.0, 2.0, quick),
        seed=args.seed,
    )
    directory_patients = _pick(args.directory_patients, 10_000_000, 1_000_000, quick)
    directory_lookups = _pick(args.directory_lookups, 2000, 500, quick)
    config: dict[str, Any] = {
        "sections": sections,
        "quick": quick,
        "runs": runs,
        "federation": vars(plan) | {"regions": list(plan.regions)},
        "views": vars(views),
        "ingest": vars(ingest),
        "prescriptions": vars(prescriptions),
        "backup": vars(backup),
        "handover": vars(handover),
        "directory": {"patients": directory_patients, "lookups_per_run": directory_lookups},
        "postgresql_settings": POSTGRES_SETTINGS if not args.no_postgres else None,
        "sqlite": "WAL, synchronous=FULL (dmp/db.py), as the services run it",
        "database_cache": "none: every database is created and loaded in this run",
    }

    started = time.monotonic()
    machine_info = machine()
    say(
        f"sections {','.join(sections)} on {machine_info['cpu_count']} CPUs"
        f" ({machine_info['cpu_model']})"
    )
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="dmp-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    results = Results()
    postgres = _Postgres(enabled=not args.no_postgres)
    try:
        identities = BenchIdentities.make(workdir / "pki", plan.regions, seed=args.seed)
        _federation_sections(workdir, plan, views, prescriptions, identities, sections, results)
        if "d" in sections:
            _ingest_section(workdir, identities, ingest, postgres, results)
        if "i" in sections:
            _backup_section(workdir, identities, backup, postgres, results, quick=quick)
        if "j" in sections:
            _handover_section(workdir, identities, handover, postgres, results)
        if "e" in sections:
            _directory_section(
                workdir,
                identities,
                directory_patients,
                directory_lookups,
                runs,
                postgres,
                results,
                seed=args.seed,
            )
    finally:
        postgres.stop()
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"work directory kept: {workdir}")
    if postgres.skipped:
        config["postgresql_skipped"] = postgres.skipped
    end_state = git_state()
    if end_state != (machine_info["git_commit"], machine_info["git_dirty"]):
        # Servers start at different times: their code may differ from section to section.
        machine_info["git_commit_at_end"], machine_info["git_dirty_at_end"] = end_state
        config["warning"] = "the repository changed during the run: rerun on a quiet tree"
    duration = time.monotonic() - started
    data = document(results, machine_info, config, duration)
    write_json(args.out, data)
    print()
    print(
        f"DMP federation benchmark: {machine_info['cpu_count']} CPUs {machine_info['cpu_model']},"
        f" Python {machine_info['python']}, grpcio {machine_info['grpcio']},"
        f" SQLite {machine_info['sqlite']}, {machine_info['postgresql'] or 'no PostgreSQL'};"
        f" commit {(machine_info['git_commit'] or '?')[:10]}"
        + (" (uncommitted changes)" if machine_info["git_dirty"] else "")
    )
    print(table(results))
    if "warning" in config:
        print(f"WARNING: {config['warning']}")
    summary = data["summary"]
    print(
        f"goals met: {summary['met']} of {summary['goals']};"
        f" {duration / 60:.1f} min; figures in {args.out}"
    )
    return 1 if results.errors else 0


def _federation_sections(
    workdir: Path,
    plan: FederationPlan,
    views: ViewPlan,
    prescriptions: PrescriptionPlan,
    identities: BenchIdentities,
    sections: Sequence[str],
    results: Results,
) -> None:
    wanted = set(sections)
    if not wanted & {"a", "b", "c", "f", "g", "h"}:
        return
    federation = BenchFederation(workdir / "federation", plan, identities)
    running = bool(wanted & {"a", "c", "f", "g", "h"})
    floor: Floor | None = None
    try:
        if running:
            say(f"starting a directory and {len(plan.regions)} nodes")
            federation.start()
            say(
                f"loading {plan.patients} patients"
                f" ({federation.dataset.records() * plan.per_region} records)"
            )
            federation.load(results)
        if "b" in wanted:
            say(f"starting {len(plan.regions)} trivial servers for the floor")
            floor = Floor(federation, records=plan.per_region)
            federation.extra.append(floor)
            floor.start()
        if wanted & {"a", "b"}:
            _guarded(
                results,
                "a" if "a" in wanted else "b",
                lambda: measure_views(federation, views, results, view="a" in wanted, floor=floor),
            )
        if floor is not None:
            floor.stop()
            federation.extra.remove(floor)
        if "a" in wanted:
            _guarded(results, "a", lambda: measure_saturation(federation, views, results))
        if "a" in wanted or "f" in wanted:
            _guarded(results, "f", lambda: measure_rss(federation, results))
        if "c" in wanted:
            _guarded(results, "c", lambda: measure_delay(federation, views, results))
        if "g" in wanted:
            _guarded(
                results, "g", lambda: measure_prescriptions(federation, prescriptions, results)
            )
        if "h" in wanted:  # last: it leaves the nodes encrypted
            _guarded(
                results,
                "h",
                lambda: measure_encryption(federation, views.runs, views.views, results),
            )
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        results.errors["federation"] = f"{type(exc).__name__}: {exc}"
    finally:
        federation.stop()


def _ingest_section(
    workdir: Path,
    identities: BenchIdentities,
    plan: IngestPlan,
    postgres: _Postgres,
    results: Results,
) -> None:
    base = workdir / "ingest"
    base.mkdir(parents=True, exist_ok=True)
    sqlite_url = f"sqlite:///{base / 'node-11.db'}"
    _guarded(
        results,
        "d",
        lambda: measure_ingest(
            "sqlite",
            sqlite_url,
            identities.pki_dir,
            identities.doctor,
            base,
            plan,
            results,
            note="SQLite WAL, synchronous=FULL: every commit is fsynced",
            writers=identities.writers,
        ),
    )

    def on_postgres() -> None:
        url = postgres.url("bench_node")
        if url is None:
            return
        measure_ingest(
            "postgresql",
            url,
            identities.pki_dir,
            identities.doctor,
            base,
            plan,
            results,
            note="PostgreSQL fsync=on, synchronous_commit=on, full_page_writes=on",
            writers=identities.writers,
        )

    _guarded(results, "d", on_postgres)


def _size_note(records: int, option: str) -> str:
    """The figures' note when a node holds fewer or more records than a full run's."""
    if records == 100_000:
        return ""
    return f"{records} records (--quick or {option}), not the 100,000 of a full run"


def _backup_section(
    workdir: Path,
    identities: BenchIdentities,
    plan: BackupPlan,
    postgres: _Postgres,
    results: Results,
    *,
    quick: bool,
) -> None:
    base = workdir / "backup"
    base.mkdir(parents=True, exist_ok=True)
    note = _size_note(plan.records, "--backup-records")

    def on(engine: str, url: str | None) -> None:
        if url is not None:
            measure_backup(
                engine, url, identities.pki_dir, identities.doctor, base, plan, results, note=note
            )

    _guarded(results, "i", lambda: on("sqlite", f"sqlite:///{base / 'node-11.db'}"))
    _guarded(results, "i", lambda: on("postgresql", postgres.url("bench_backup")))


def _handover_section(
    workdir: Path,
    identities: BenchIdentities,
    plan: HandoverPlan,
    postgres: _Postgres,
    results: Results,
) -> None:
    base = workdir / "handover"
    base.mkdir(parents=True, exist_ok=True)
    note = _size_note(plan.records, "--handover-records")

    def on(a: str, a_url: str | None, b: str, b_url: str | None) -> None:
        if a_url is not None and b_url is not None:
            measure_handover(
                a, a_url, b, b_url, identities.pki_dir, identities.doctor, base, plan, results,
                note=note,
            )  # fmt: skip

    def sqlite(name: str) -> str:
        return f"sqlite:///{base / name}"

    if not postgres.enabled:
        _guarded(results, "j", lambda: on("sqlite", sqlite("a.db"), "sqlite", sqlite("b.db")))
        return
    _guarded(
        results,
        "j",
        lambda: on("sqlite", sqlite("a.db"), "postgresql", postgres.url("bench_handover_b")),
    )
    _guarded(
        results,
        "j",
        lambda: on("postgresql", postgres.url("bench_handover_a"), "sqlite", sqlite("b2.db")),
    )


def _directory_section(
    workdir: Path,
    identities: BenchIdentities,
    patients: int,
    lookups: int,
    runs: int,
    postgres: _Postgres,
    results: Results,
    *,
    seed: int,
) -> None:
    from bench.directory_scale import measure_directory

    base = workdir / "directory-scale"
    base.mkdir(parents=True, exist_ok=True)

    def on(engine: str, url: str | None) -> None:
        if url is None:
            return
        measure_directory(
            engine,
            url,
            patients,
            identities.pki_dir,
            identities.doctor,
            base,
            results,
            runs=runs,
            lookups=lookups,
            seed=seed,
        )

    _guarded(results, "e", lambda: on("sqlite", f"sqlite:///{base / 'directory.db'}"))
    _guarded(results, "e", lambda: on("postgresql", postgres.url("bench_directory")))


if __name__ == "__main__":
    sys.exit(main())

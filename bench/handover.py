"""Section j: a region handed over to a successor host while writers keep writing.

The predecessor A (`dmp node serve --db A_URL`, its own copy of the national PKI) is loaded
with records through section i's loader; 4 writer threads then put records one at a time,
each under its own id, so that a retry is idempotent. The operator's steps follow, as
processes: `dmp node handover start --to B's certificate` on A; the successor B
(`dmp node serve --successor-of A --listen 127.0.0.1:PORT`, its own PKI copy holding its
own certificate for the same region, issued by the national operator) receives the
snapshot then the changes; a few seconds after the snapshot, `dmp node handover complete`
freezes A and returns once B confirmed. A writer told REGION_MOVING waits the retry delay
and sends the same put again; told REGION_MOVED, it sends it to the successor the error
names. Figures: `complete` to the first put B acknowledged, the longest stretch around the
switch with no acknowledged put, records/s of the snapshot; then every acknowledged record
must be listed by B (a lost write fails the section).
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from sqlalchemy import func, select

from bench.backup import BackupPlan, _load
from bench.clients import channel, patient_call_metadata, wait_ready
from bench.ingest import _Source
from bench.procs import BenchError
from bench.report import say
from bench.stats import Goal, Results
from dmp.db import make_engine
from dmp.demo import Service
from dmp.pki import Pki
from dmp.server import error_metadata, error_reason
from dmp.v1 import node_service_pb2, node_service_pb2_grpc
from node.handover_state import read
from node.handover_watch import RETRY_SECONDS
from node.models import HandoverChangeRow
from tests.postgres import free_port

REGION = "11"
#: A writer's pause before retrying a put its node could not be reached for (the
#: successor between the predecessor's REGION_MOVED and its own first call).
UNREACHABLE_RETRY_SECONDS = 0.1
#: How long one put may be retried before the section fails.
PUT_GIVE_UP_SECONDS = 120.0
_TAKEN_OVER = re.compile(r"taken over from (\S+): (\d+) rows in ([0-9.]+) s")


@dataclass(frozen=True)
class HandoverPlan:
    records: int = 100_000
    writers: int = 4
    #: Puts per second of all the writers together, each writer paced to its share; 0:
    #: every writer puts as fast as its node answers.
    rate: float = 100.0
    #: Seconds the writers run on the predecessor after the snapshot, before `complete`.
    settle_seconds: float = 3.0
    #: `complete` waits (at most `catch_up_seconds`) until the successor has at most this
    #: many changed rows left to apply, as an operator watching `handover status` would.
    caught_up_rows: int = 1000
    catch_up_seconds: float = 600.0
    #: Seconds the writers run on the successor after its first acknowledged put.
    after_seconds: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class _Ack:
    at: float
    address: str
    record_id: str


@dataclass
class _Writers:
    """Writer threads putting records one at a time, following the region where it moves."""

    address: str
    pki_dir: Path
    identity: str
    source: _Source
    count: int
    rate: float
    acks: list[_Ack] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    moving: int = 0
    moved: int = 0
    unreachable: int = 0
    first_moving: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.count):
            thread = threading.Thread(target=self._run, args=(n,), name=f"writer-{n}")
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=PUT_GIVE_UP_SECONDS + 30)

    def acknowledged_by(self, address: str) -> list[_Ack]:
        with self._lock:
            return [ack for ack in self.acks if ack.address == address]

    def _next(self) -> node_service_pb2.PutRecordRequest:
        with self._lock:
            return self.source.requests("hw", 1)[0]

    def _run(self, n: int) -> None:
        address = self.address
        conn = channel(address, self.pki_dir, self.identity)
        try:
            stub = node_service_pb2_grpc.NodeServiceStub(conn)
            interval = self.count / self.rate if self.rate > 0 else 0.0
            due = time.monotonic() + interval * n / self.count
            while not self._stop.is_set():
                pause = due - time.monotonic()
                if pause > 0 and self._stop.wait(pause):
                    break
                due = max(due + interval, time.monotonic())
                request = self._next()
                given_up = time.monotonic() + PUT_GIVE_UP_SECONDS
                while not self._stop.is_set():
                    if time.monotonic() > given_up:
                        raise BenchError(f"writer {n}: a put retried for {PUT_GIVE_UP_SECONDS} s")
                    try:
                        metadata = patient_call_metadata(
                            self.pki_dir, self.identity, request.record.patient_ins, "WRITE"
                        )
                        stub.PutRecord(request, timeout=30, metadata=metadata)
                    except grpc.RpcError as exc:
                        successor = self._refused(n, exc)
                        if successor and successor != address:
                            conn.close()
                            address = successor
                            conn = channel(address, self.pki_dir, self.identity)
                            stub = node_service_pb2_grpc.NodeServiceStub(conn)
                        continue
                    with self._lock:
                        self.acks.append(_Ack(time.monotonic(), address, request.record.id))
                    break
        except Exception as exc:
            with self._lock:
                self.errors.append(f"writer {n}: {type(exc).__name__}: {exc}")
        finally:
            conn.close()

    def _refused(self, n: int, exc: grpc.RpcError) -> str:
        """Wait as a refused put asks; the successor's address when the region moved."""
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            reason = error_reason(exc)
            if reason == "REGION_MOVING":
                with self._lock:
                    self.moving += 1
                    if self.first_moving is None:
                        self.first_moving = time.monotonic()
                time.sleep(RETRY_SECONDS)
                return ""
            if reason == "REGION_MOVED":
                successor = error_metadata(exc).get("successor", "")
                if not successor:
                    raise BenchError(f"writer {n}: REGION_MOVED without a successor address")
                with self._lock:
                    self.moved += 1
                return successor
            with self._lock:
                self.unreachable += 1
            time.sleep(UNREACHABLE_RETRY_SECONDS)
            return ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ""
        raise BenchError(f"writer {n}: PutRecord answered {code.name}: {exc.details()}")


class _Successor:
    """The successor's `dmp node serve --successor-of` process; its stdout lines, timed."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.lines: list[tuple[float, str]] = []
        self.started = 0.0
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        process = self.service.spawn()
        self._reader = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._reader.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            at = time.monotonic()
            if "listening on" in line:
                self.service.address = line.rsplit(" ", 1)[1].strip()
            self.lines.append((at, line.strip()))

    def first(self, text: str) -> float | None:
        return next((at for at, line in self.lines if text in line), None)

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.first(text)
            if at is not None:
                return at
            if not self.service.running():
                break
            time.sleep(0.02)
        raise BenchError(f"the successor never printed {text!r}: see {self.service.log_path}")

    def stop(self) -> None:
        self.service.stop()
        if self._reader is not None:
            self._reader.join(timeout=5)


def _cli(args: Sequence[str], what: str, timeout: float = 180.0) -> str:
    """One `dmp` command in its own process, as the operator runs it; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "dmp.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise BenchError(f"{what} exited {done.returncode}: {last}")
    return done.stdout


def _wait_snapshot(url: str, timeout: float) -> float:
    """When the successor's database says the snapshot is applied (polled every 50 ms)."""
    engine = make_engine(url, pool_size=1)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                handover = read(engine)
            except Exception:  # the successor is still creating its schema
                handover = None
            if handover is not None and handover.snapshot_done:
                return time.monotonic()
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise BenchError(f"the successor did not finish the snapshot within {timeout:g} s")


def _listed(address: str, pki_dir: Path, identity: str, patients: Sequence[str]) -> set[str]:
    """Every record id the node at `address` lists for these patients."""
    conn = channel(address, pki_dir, identity)
    ids: set[str] = set()
    try:
        wait_ready(conn)
        stub = node_service_pb2_grpc.NodeServiceStub(conn)
        for ins in patients:
            request = node_service_pb2.ListRecordsRequest(patient_ins=ins, page_size=1000)
            while True:
                metadata = patient_call_metadata(pki_dir, identity, ins, "VIEW")
                page = stub.ListRecords(request, timeout=60, metadata=metadata)
                ids.update(record.id for record in page.records)
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
    finally:
        conn.close()
    return ids


def _wait_caught_up(url: str, rows: int, timeout: float) -> tuple[float, int]:
    """Wait until the predecessor has at most `rows` changes the successor has not applied
    (what `dmp node handover status` counts); the seconds waited and the count then."""
    engine = make_engine(url, pool_size=1)
    started = time.monotonic()
    try:
        while True:
            with engine.connect() as conn:
                count = select(func.count()).select_from(HandoverChangeRow.__table__)
                pending = int(conn.execute(count).scalar_one())
            if pending <= rows or time.monotonic() - started > timeout:
                return time.monotonic() - started, pending
            time.sleep(0.2)
    finally:
        engine.dispose()


def _quiet_gap(times: Sequence[float], start: float, end: float) -> tuple[float, float]:
    """The longest interval between consecutive acknowledgements that overlaps
    [start, end]: (its length, where it began relative to `start`)."""
    ordered = sorted(times)
    best = (0.0, 0.0)
    for before, after in itertools.pairwise(ordered):
        if after >= start and before <= end and after - before > best[0]:
            best = (after - before, before - start)
    return best


def _pki_dirs(national: Path, base: Path) -> tuple[Path, Path, Path]:
    """The national operator's PKI copy, A's copy, and B's copy after the national
    operator issued B's certificate for the same region."""
    operator = base / "national"
    a_dir, b_dir = base / "a-pki", base / "b-pki"
    for path in (operator, a_dir, b_dir):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(national, operator)
    shutil.copytree(operator, a_dir)
    Pki.load(operator).issue_node(REGION)
    shutil.copytree(operator, b_dir)
    return operator, a_dir, b_dir


def measure_handover(
    a_engine: str,
    a_url: str,
    b_engine: str,
    b_url: str,
    pki_dir: Path,
    writer: str,
    workdir: Path,
    plan: HandoverPlan,
    results: Results,
    *,
    note: str = "",
) -> None:
    """Hand region 11 over from a node on `a_url` to one on `b_url` while writers write."""
    pair = f"{a_engine}_to_{b_engine}"
    base = workdir / pair
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    operator, a_dir, b_dir = _pki_dirs(pki_dir, base)
    node_args = ["node", "serve", "--region", REGION]
    predecessor = Service(
        f"predecessor ({a_engine})",
        [*node_args, "--pki", str(a_dir), "--db", a_url],
        logs / "predecessor.log",
    )
    port = free_port()
    successor = _Successor(
        Service(
            f"successor ({b_engine})",
            [*node_args, "--pki", str(b_dir), "--db", b_url, "--listen", f"127.0.0.1:{port}"],
            logs / "successor.log",
        )
    )
    source = _Source(REGION, plan.seed)
    writers: _Writers | None = None
    try:
        predecessor.start()
        _load(
            predecessor.address,
            operator,
            writer,
            BackupPlan(records=plan.records, seed=plan.seed),
            section="j",
        )
        writers = _Writers(predecessor.address, operator, writer, source, plan.writers, plan.rate)
        writers.start()
        on_a = ["--pki", str(a_dir), "--region", REGION, "--db", a_url]
        say(f"j: {pair}: handover start, {plan.writers} writers running")
        certificate = str(b_dir / f"node-{REGION}.pem")
        _cli(["node", "handover", "start", "--to", certificate, *on_a], "start")
        successor.service.args += ["--successor-of", predecessor.address]
        successor.start()
        first_progress = successor.wait_for("hand-over: snapshot", timeout=120)
        snapshot_done = _wait_snapshot(b_url, timeout=1800)
        say(f"j: {pair}: snapshot applied in {snapshot_done - successor.started:.1f} s")
        time.sleep(plan.settle_seconds)
        caught_up, pending = _wait_caught_up(a_url, plan.caught_up_rows, plan.catch_up_seconds)
        say(
            f"j: {pair}: handover complete ({pending} changes not yet applied by the successor,"
            f" {caught_up:.1f} s after the settling)"
        )
        t0 = time.monotonic()
        _cli(["node", "handover", "complete", *on_a], "complete")
        completed = time.monotonic()
        listening = successor.wait_for("listening on", timeout=120)
        deadline = time.monotonic() + 60
        while not writers.acknowledged_by(successor.service.address):
            if time.monotonic() > deadline or writers.errors:
                break
            time.sleep(0.02)
        time.sleep(plan.after_seconds)
        writers.stop()
        if writers.errors:
            raise BenchError("; ".join(writers.errors))
        at_b = [a.at for a in writers.acknowledged_by(successor.service.address) if a.at >= t0]
        if not at_b:
            raise BenchError("no put was acknowledged by the successor")
        first_b = min(at_b)
        acked = {ack.record_id for ack in writers.acks}
        say(f"j: {pair}: checking {len(acked)} acknowledged records at the successor")
        patients = sorted({request.record.patient_ins for request in source.warm_requests()})
        listed = _listed(successor.service.address, operator, writer, patients)
    finally:
        if writers is not None:
            writers.stop()
        successor.stop()
        predecessor.stop()
    lost = acked - listed
    loaded = sum(1 for record_id in listed if record_id.startswith("bk"))
    if lost or loaded != plan.records:
        raise BenchError(
            f"the successor lists {loaded} of the {plan.records} records loaded and misses"
            f" {len(lost)} of the {len(acked)} acknowledged puts"
        )
    matched = next(
        (m for _, line in successor.lines if (m := _TAKEN_OVER.search(line)) is not None), None
    )
    rows = int(matched.group(2)) if matched else 0
    snapshot_s = snapshot_done - successor.started
    gap, gap_at = _quiet_gap([ack.at for ack in writers.acks], t0, first_b)
    pace = f"{plan.rate:g} puts/s" if plan.rate > 0 else "unpaced"
    label = f"{a_engine} -> {b_engine}, {plan.records} records, {plan.writers} writers {pace}"
    results.figure(
        f"j.{pair}.switch_s",
        "j",
        f"{label}: complete -> successor serving writes",
        "s",
        goal=Goal("<=", 5.0, source="issue 14"),
        note=note,
        headline=True,
    ).values.append(first_b - t0)
    results.figure(
        f"j.{pair}.unavailable_s",
        "j",
        f"{label}: longest time with no put acknowledged, around the switch",
        "s",
        note=note,
    ).values.append(gap)
    results.figure(
        f"j.{pair}.snapshot_records_s",
        "j",
        f"{label}: snapshot streamed (records / snapshot time)",
        "rec/s",
        note=note,
    ).values.append(plan.records / snapshot_s)
    results.figure(
        f"j.{pair}.rows_streamed", "j", f"{label}: rows streamed in all", "rows", note=note
    ).values.append(rows)
    results.detail("j_handover")[pair] = {
        "records_loaded": plan.records,
        "writers": plan.writers,
        "puts_acknowledged": len(acked),
        "puts_acknowledged_by_successor": len(writers.acknowledged_by(successor.service.address)),
        "snapshot_seconds": round(snapshot_s, 2),
        "successor_first_progress_after_start_s": round(first_progress - successor.started, 2),
        "catch_up_wait_s": round(caught_up, 2),
        "changes_pending_before_complete": pending,
        "complete_seconds": round(completed - t0, 2),
        "successor_listening_after_complete_s": round(listening - t0, 2),
        "first_refusal_after_complete_s": (
            round(writers.first_moving - t0, 3) if writers.first_moving is not None else None
        ),
        "quiet_gap_starts_after_complete_s": round(gap_at, 3),
        "longest_gap_whole_run_s": round(
            _quiet_gap([ack.at for ack in writers.acks], 0.0, float("inf"))[0], 3
        ),
        "region_moving_refusals": writers.moving,
        "region_moved_redirects": writers.moved,
        "successor_unreachable_retries": writers.unreachable,
        "successor_final_line": matched.group(0) if matched else None,
        "records_listed_at_successor": len(listed),
    }

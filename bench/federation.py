"""Sections a, b, c and f: the consolidated view across the regions, its transport floor,
views under network delay, and the memory of the directory and the nodes.

One directory and one node per region run as their own processes (`dmp directory serve`,
`dmp node serve`, through dmp.demo.Service) on SQLite files. Patients are registered at the
directory and their records streamed to the nodes with IngestRecords; measuring starts
only once the directory's locator knows every fragment.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench.clients import channel, patient_call_metadata, wait_ready
from bench.procs import (
    BenchError,
    start_all,
    stop_all,
)
from bench.stats import Results
from dmp import synth
from dmp.client import ingest_messages
from dmp.demo import Service, make_pki, node_service, wait_until
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import (
    directory_service_pb2_grpc,
    node_service_pb2,
    node_service_pb2_grpc,
    record_pb2,
)

ANSWERED = dpb.REGION_STATE_ANSWERED
REGION_DEADLINE = 2.0
#: Pause after the locator knows every region when the directory hides the counts.
LOCATOR_SETTLE_S = 3.0
MB_PER_MIB = 1024 * 1024 / 1e6
#: The floor's channels hold a health Watch open, as directory/channels.py does for nodes
#: (grpcio then keeps one polling thread per channel instead of one per burst of calls).
#: The floor must stay the directory's own fan-out: change both together.
HOLD_WATCH = True


@dataclass(frozen=True)
class FederationPlan:
    regions: tuple[str, ...]
    patients: int = 1000
    per_region: int = 10
    home_regions: int = 3
    wide_patients: int = 100
    seed: int = 0


@dataclass(frozen=True)
class ViewPlan:
    runs: int = 5
    views: int = 200
    saturation_seconds: float = 5.0
    saturation_processes: int = 2
    saturation_threads: int = 4
    delay_ms: float = 50.0
    delay_views: int = 40


@dataclass
class Dataset:
    """Who has records where: most patients in a few regions, the wide ones in all."""

    patients: list[synth.SyntheticPatient]
    placement: dict[str, tuple[str, ...]]
    wide: list[str]
    narrow: list[str]

    @classmethod
    def make(cls, plan: FederationPlan) -> Dataset:
        regions = plan.regions
        patients = synth.patients(plan.patients, seed=plan.seed, regions=regions)
        placement: dict[str, tuple[str, ...]] = {}
        wide: list[str] = []
        narrow: list[str] = []
        homes = min(plan.home_regions, len(regions))
        for i, patient in enumerate(patients):
            if i < plan.wide_patients:
                placement[patient.ins] = regions
                wide.append(patient.ins)
                continue
            first = regions.index(patient.home_region)
            placement[patient.ins] = tuple(
                regions[(first + k) % len(regions)] for k in range(homes)
            )
            narrow.append(patient.ins)
        return cls(patients, placement, wide, narrow)

    def expected(self, per_region: int) -> dict[str, dict[str, int]]:
        return {ins: dict.fromkeys(regions, per_region) for ins, regions in self.placement.items()}

    def records(self) -> int:
        return sum(len(regions) for regions in self.placement.values())


#: Doctors with a certificate of their own, who write records in section d.
WRITERS = 4


@dataclass
class BenchIdentities:
    """The benchmark's PKI: a node certificate per region, the directory, a doctor who
    reads and writes, a pharmacist who writes dispensations."""

    pki_dir: Path
    doctor: str
    pharmacist: str
    #: One pharmacist a pharmacy racing in section g (the first is `pharmacist`): a
    #: person's own calls are limited at the directory, as one person's should be.
    pharmacies: tuple[str, ...] = ()
    #: Doctors writing at once in section d (the first is `doctor`): many clients of a node
    #: are many people, each with their own certificate and channel.
    writers: tuple[str, ...] = ()

    @classmethod
    def make(
        cls, pki_dir: Path, regions: Sequence[str], seed: int = 0, pharmacies: int = 16
    ) -> BenchIdentities:
        people = synth.practitioners(40 * pharmacies, seed=seed)
        doctors = [p for p in people if p[1] == "doctor"]
        pharmacists = [p for p in people if p[1] == "pharmacist"][:pharmacies] or doctors[:1]
        writers = doctors[:WRITERS]
        make_pki(pki_dir, regions, [*writers, *pharmacists], [])
        names = tuple(f"practitioner-{p[0]}" for p in pharmacists)
        doctor_names = tuple(f"practitioner-{p[0]}" for p in writers)
        return cls(pki_dir, doctor_names[0], names[0], names, doctor_names)


@dataclass
class BenchFederation:
    """A directory and a node per region, in their own processes, with synthetic data."""

    workdir: Path
    plan: FederationPlan
    identities: BenchIdentities
    directory: Service | None = field(init=False, default=None)
    nodes: dict[str, Service] = field(init=False, default_factory=dict)
    dataset: Dataset = field(init=False)
    extra: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.dataset = Dataset.make(self.plan)

    @property
    def pki_dir(self) -> Path:
        return self.identities.pki_dir

    @property
    def doctor(self) -> str:
        return self.identities.doctor

    @property
    def pharmacist(self) -> str:
        return self.identities.pharmacist

    # -- processes -----------------------------------------------------------------------

    def start(self) -> None:
        data = self.workdir / "data"
        logs = self.workdir / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        self.directory = Service(
            "directory",
            [
                "directory",
                "serve",
                "--pki",
                str(self.pki_dir),
                "--data-dir",
                str(data),
                "--region-deadline",
                str(REGION_DEADLINE),
            ],
            logs / "directory.log",
        )
        self.directory.start()
        self.nodes = {
            # In clear: sections a-g measure as they always did; h encrypts them in place.
            region: node_service(
                self.pki_dir, self.workdir, region, self.directory.address, encrypted=False
            )
            for region in self.plan.regions
        }
        start_all(self.nodes.values())
        self.wait_routed({region: node.address for region, node in self.nodes.items()})

    def stop(self) -> None:
        stop_all([*self.extra, *self.nodes.values()])
        if self.directory is not None:
            self.directory.stop()

    def pids(self, which: str = "nodes") -> list[int]:
        if which == "directory":
            return [self.directory.pid] if self.directory is not None else []
        return [node.pid for node in self.nodes.values()]

    def directory_channel(self) -> grpc.Channel:
        assert self.directory is not None
        conn = channel(self.directory.address, self.pki_dir, self.doctor)
        wait_ready(conn)
        return conn

    def wait_routed(self, addresses: dict[str, str], timeout: float = 60.0) -> None:
        """Until the directory routes to every region, at these addresses, healthy."""
        with self.directory_channel() as conn:
            stub = directory_service_pb2_grpc.DirectoryServiceStub(conn)

            def routed() -> bool:
                nodes = stub.ListNodes(dpb.ListNodesRequest(), timeout=5).nodes
                known = {n.region: n.address for n in nodes if n.healthy}
                return all(known.get(r) == a for r, a in addresses.items())

            wait_until(routed, "the directory to route to every region", timeout)

    # -- data ----------------------------------------------------------------------------

    def load(self, results: Results) -> None:
        """Register the patients, stream their records to the nodes, wait for the locator."""
        assert self.directory is not None
        plan = self.plan
        dataset = self.dataset
        details = results.detail("a_view")
        details["dataset"] = {
            "regions": len(plan.regions),
            "patients": plan.patients,
            "records_per_region": plan.per_region,
            "regions_per_patient": min(plan.home_regions, len(plan.regions)),
            "patients_in_all_regions": len(dataset.wide),
            "records": dataset.records() * plan.per_region,
        }
        started = time.perf_counter()
        self._register(dataset)
        registered = time.perf_counter()
        self._ingest(dataset)
        ingested = time.perf_counter()
        self._wait_located(dataset.expected(plan.per_region))
        located = time.perf_counter()
        records = dataset.records() * plan.per_region
        details["load"] = {
            "register_s": round(registered - started, 2),
            "ingest_s": round(ingested - registered, 2),
            "ingest_records_per_s": round(records / max(ingested - registered, 1e-9)),
            "locator_wait_s": round(located - ingested, 2),
            "note": "setup only: ingest figures are section d",
        }

    def _register(self, dataset: Dataset) -> None:
        with self.directory_channel() as conn:
            stub = directory_service_pb2_grpc.DirectoryServiceStub(conn)

            def register(patient: synth.SyntheticPatient) -> None:
                metadata = patient_call_metadata(self.pki_dir, self.doctor, patient.ins, "WRITE")
                request = dpb.RegisterPatientRequest(patient=patient.to_proto())
                stub.RegisterPatient(request, timeout=30, metadata=metadata)

            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(register, dataset.patients))

    def _ingest(self, dataset: Dataset) -> None:
        """One IngestRecords stream per node and writer (dispensations by a pharmacist)."""
        plan = self.plan
        by_stream: dict[tuple[str, str], list[node_service_pb2.PutRecordRequest]] = {}
        for patient in dataset.patients:
            identity = patient.to_proto()
            records = synth.records_for(
                patient,
                regions=dataset.placement[patient.ins],
                per_region=plan.per_region,
                seed=plan.seed,
                now=_NOW,
            )
            for record in records:
                dispensing = record.kind == record_pb2.RECORD_KIND_DISPENSATION
                writer = self.pharmacist if dispensing else self.doctor
                put = node_service_pb2.PutRecordRequest(
                    record=record.to_proto(str(uuid.uuid4())),
                    content=record.content,
                    patient=identity,
                )
                stream = by_stream.setdefault((record.region, writer), [])
                stream.append(put)

        def send(key: tuple[str, str]) -> int:
            region, writer = key
            conn = channel(self.nodes[region].address, self.pki_dir, writer)
            try:
                stub = node_service_pb2_grpc.NodeServiceStub(conn)
                metadata = patient_call_metadata(self.pki_dir, writer, None, "WRITE")
                messages = ingest_messages(by_stream[key])
                answer = stub.IngestRecords(messages, timeout=600, metadata=metadata)
                return int(answer.stored_count)
            finally:
                conn.close()

        with ThreadPoolExecutor(max_workers=4) as pool:
            stored = sum(pool.map(send, list(by_stream)))
        expected = sum(len(stream) for stream in by_stream.values())
        if stored != expected:
            raise BenchError(f"ingest stored {stored} records, not {expected}")

    def _wait_located(self, expected: dict[str, dict[str, int]]) -> None:
        """Until GetPatient names every region of every patient with its record count.

        Directories that no longer show counts to people (record_count left at 0) are
        waited for on the regions alone, then for the outboxes to settle (a short pause:
        later reports of the same patients only update counts, which views do not use).
        """
        pending = dict(expected)
        counted = True
        with self.directory_channel() as conn:
            stub = directory_service_pb2_grpc.DirectoryServiceStub(conn)

            def located() -> bool:
                nonlocal counted
                for ins, counts in list(pending.items()):
                    metadata = patient_call_metadata(self.pki_dir, self.doctor, ins, "LOOKUP")
                    answer = stub.GetPatient(
                        dpb.GetPatientRequest(ins=ins), timeout=10, metadata=metadata
                    )
                    known = {f.region: f.record_count for f in answer.fragments}
                    if known and not any(known.values()):
                        counted = False
                    if (known if counted else set(known)) != (counts if counted else set(counts)):
                        return False
                    del pending[ins]
                return True

            wait_until(located, "the directory's locator to know every fragment", 300)
        if not counted:
            time.sleep(LOCATOR_SETTLE_S)

    def node_answer_bytes(self, ins: str) -> int:
        """Size of a node's ListRecords answer for a patient (to compare with the floor)."""
        region = self.plan.regions[0]
        with channel(self.nodes[region].address, self.pki_dir, self.doctor) as conn:
            stub = node_service_pb2_grpc.NodeServiceStub(conn)
            request = node_service_pb2.ListRecordsRequest(
                patient_ins=ins, page_size=50, statuses=[record_pb2.RECORD_STATUS_CURRENT]
            )
            metadata = patient_call_metadata(self.pki_dir, self.doctor, ins, "VIEW")
            answer = stub.ListRecords(request, timeout=10, metadata=metadata)
            return int(answer.ByteSize())


#: Records' dates are drawn up to this instant: the same data in every run.
_NOW = datetime(2026, 1, 1, tzinfo=UTC)


# -- measuring views -----------------------------------------------------------------------

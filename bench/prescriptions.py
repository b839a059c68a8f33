"""Section g of `make bench`: e-prescription dispensing through the directory.

- A pharmacist's dispensing relayed by the directory to the owning node, one in flight,
  p50, and as a ratio to a consolidated view of the same patient measured in the same run
  (the view fans out to every region; a dispensing is one relayed durable write).
- Dispensings per second with 16 racing clients (threads of this process, each over its
  own mutual-TLS channel) on distinct prescriptions: the owning node's write path under
  concurrency, every dispensing acknowledged durable.

Prescriptions are written beforehand by a doctor at the node of the first region with the
typed client; each allows one dispensing of one line. The timed calls go over raw stubs
with metadata signed just before each call, as the other sections do (bench/clients.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from bench.clients import channel, credentials, patient_call_metadata, wait_ready
from bench.federation import BenchFederation
from bench.procs import BenchError
from bench.report import say
from bench.stats import Results, p50
from dmp.prescription_client import PrescriptionClient, idempotency_key
from dmp.prescriptions import parse_line
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import directory_service_pb2_grpc
from dmp.v1 import prescription_pb2 as pb
from dmp.v1.prescription_pb2_grpc import PrescriptionServiceStub

LINE = "3400935955838|1|1 comprimé|3 fois par jour|7 jours"
PHARMACY = "Pharmacie du banc d'essai"


@dataclass(frozen=True)
class PrescriptionPlan:
    runs: int = 5
    #: Dispensings per run, one in flight (each followed by a view of the same patient).
    dispenses: int = 100
    racers: int = 16
    #: Dispensings per racing client per run.
    per_racer: int = 10


def _write(federation: BenchFederation, patient: str, count: int) -> list[str]:
    """`count` prescriptions of one dispensing each, held by the first region's node."""
    region = federation.plan.regions[0]
    address = federation.nodes[region].address
    creds = credentials(federation.pki_dir, federation.doctor)
    line = parse_line(LINE)

    def write(_: int) -> str:
        with PrescriptionClient(address, creds) as client:
            stored = client.create(patient, [line], region=region, organization="Bench")
        return pb.Prescription.FromString(stored.signed.prescription).id

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(write, range(count)))


def _dispense_request(prescription_id: str) -> pb.DispensePrescriptionRequest:
    return pb.DispensePrescriptionRequest(
        dispensation=pb.Dispensation(
            prescription_id=prescription_id,
            lines=[pb.DispensedLine(line=0, quantity=1)],
            pharmacy=PHARMACY,
            idempotency_key=idempotency_key(),
        )
    )


def _one_in_flight(
    federation: BenchFederation, patient: str, ids: Sequence[str]
) -> tuple[list[float], list[float]]:
    """Dispense each prescription through the directory, each followed by a view of the
    same patient: (dispense latencies, view latencies), in ms."""
    assert federation.directory is not None
    fed = federation
    pharmacy = channel(federation.directory.address, fed.pki_dir, fed.pharmacist)
    wait_ready(pharmacy)
    doctor = fed.directory_channel()
    try:
        dispense = PrescriptionServiceStub(pharmacy).DispensePrescription
        view = directory_service_pb2_grpc.DirectoryServiceStub(doctor).GetConsolidatedView
        dispensed: list[float] = []
        viewed: list[float] = []
        for prescription_id in ids:
            metadata = patient_call_metadata(
                fed.pki_dir, fed.pharmacist, "", "DISPENSE", record_id=prescription_id
            )
            request = _dispense_request(prescription_id)
            start = time.perf_counter()
            dispense(request, timeout=10, metadata=metadata)
            dispensed.append((time.perf_counter() - start) * 1000.0)
            metadata = patient_call_metadata(fed.pki_dir, fed.doctor, patient, "VIEW")
            start = time.perf_counter()
            view(dpb.GetConsolidatedViewRequest(patient_ins=patient), timeout=10, metadata=metadata)
            viewed.append((time.perf_counter() - start) * 1000.0)
        return dispensed, viewed
    finally:
        pharmacy.close()
        doctor.close()


def _race(federation: BenchFederation, batches: Sequence[Sequence[str]]) -> tuple[int, float]:
    """Each racing client dispenses its own prescriptions as fast as it can, all starting
    together: (dispensings acknowledged, seconds from the start to the last answer)."""
    assert federation.directory is not None
    fed = federation
    address = federation.directory.address
    channels = [channel(address, fed.pki_dir, fed.pharmacist) for _ in batches]
    for conn in channels:
        wait_ready(conn)
    start_line = threading.Barrier(len(batches) + 1)
    done = [0] * len(batches)
    failures: list[str] = []

    def racer(k: int) -> None:
        stub = PrescriptionServiceStub(channels[k])
        calls = [
            (
                _dispense_request(pid),
                patient_call_metadata(fed.pki_dir, fed.pharmacist, "", "DISPENSE", record_id=pid),
            )
            for pid in batches[k]
        ]
        start_line.wait()
        for request, metadata in calls:
            try:
                stub.DispensePrescription(request, timeout=30, metadata=metadata)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            done[k] += 1

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(len(batches))]
    try:
        for thread in threads:
            thread.start()
        start_line.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        for conn in channels:
            conn.close()
    if failures:
        raise BenchError(f"{len(failures)} dispensings failed, e.g. {failures[0]}")
    return sum(done), elapsed


def measure_prescriptions(
    federation: BenchFederation, plan: PrescriptionPlan, results: Results
) -> None:
    """Section g on a running, loaded federation."""
    dataset = federation.dataset
    patient = (dataset.wide or dataset.narrow)[0]
    n = len(federation.plan.regions)
    per_run = plan.dispenses + plan.racers * plan.per_racer
    say(f"g: writing {plan.runs * per_run + 2} prescriptions at node {federation.plan.regions[0]}")
    ids = _write(federation, patient, plan.runs * per_run + 2)
    _one_in_flight(federation, patient, ids[-2:])  # warm the channels and caches
    details = results.detail("g_prescriptions")
    details["plan"] = {
        "patient_regions": len(dataset.placement[patient]),
        "prescription_region": federation.plan.regions[0],
        "dispenses_one_in_flight": plan.dispenses,
        "racing_clients": plan.racers,
        "dispensings_per_racer": plan.per_racer,
        "racers": "threads of the benchmark process, one mTLS channel each",
    }
    details["runs"] = []
    for run in range(plan.runs):
        say(f"g: run {run + 1}/{plan.runs}")
        batch = ids[run * per_run : (run + 1) * per_run]
        single, racing = batch[: plan.dispenses], batch[plan.dispenses :]
        dispensed, viewed = _one_in_flight(federation, patient, single)
        results.figure(
            "g.dispense.p50_ms",
            "g",
            "dispense through the directory, 1 in flight, p50",
            "ms",
            headline=True,
        ).values.append(p50(dispensed))
        results.figure(
            "g.dispense.view_ratio",
            "g",
            f"dispense p50 / view p50 of the same patient (in {n} regions)",
            "x",
            note="per run, each dispensing followed by a view of the same patient",
        ).values.append(p50(dispensed) / p50(viewed))
        batches = [racing[k :: plan.racers] for k in range(plan.racers)]
        count, elapsed = _race(federation, batches)
        results.figure(
            "g.race.dispensings_per_s",
            "g",
            f"dispensings/s, {plan.racers} racing clients on distinct prescriptions",
            "/s",
            headline=True,
        ).values.append(count / elapsed)
        details["runs"].append(
            {
                "dispense_p50_ms": round(p50(dispensed), 3),
                "view_p50_ms": round(p50(viewed), 3),
                "race_dispensings": count,
                "race_seconds": round(elapsed, 3),
            }
        )

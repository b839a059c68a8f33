"""A whole federation on one machine: PKI, directory and regional nodes as separate
processes on free ports, synthetic patients spread over the regions, a doctor's
consolidated view, an e-prescription written in one region and dispensed in another
(dmp/prescription_demo.py), then a region that stops and the partial answer that names it.

The pieces (process handling, loading synthetic patients) serve the tests and the
benchmarks as well.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from dmp import synth
from dmp.client import DirectoryClient, NodeClient
from dmp.envelope import init_kek_file
from dmp.fhir.systems import INS_SYSTEM
from dmp.pki import Pki, load_credentials
from dmp.prescription_demo import DOCTOR as RX_DOCTOR
from dmp.prescription_demo import PHARMACIST as RX_PHARMACIST
from dmp.prescription_demo import run_scene
from dmp.printing import print_history, print_view
from dmp.regions import region_name
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import record_pb2

log = logging.getLogger("dmp.demo")

DEMO_REGIONS = ("11", "53", "84")


class DemoError(Exception):
    """The demo could not run a step: one line for the operator."""


@dataclass
class Service:
    """A federation process started by the demo."""

    name: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[str] | None = None
    address: str = ""
    _log: IO[str] | None = None

    def spawn(self) -> subprocess.Popen[str]:
        """Start the process, its stderr to the log, its stdout a pipe for the caller."""
        # Logs name callers (INS numbers in patients' URIs): for the demo's user only.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        self._log = os.fdopen(fd, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmp.cli.main", *self.args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # Ctrl-C in the demo's terminal reaches only the demo
        )
        return self.process

    def start(self, timeout: float = 30.0) -> str:
        """Spawn, then wait for its first line, 'listening on HOST:PORT'."""
        process = self.spawn()
        assert process.stdout is not None
        line = process.stdout.readline()
        if "listening on" not in line:
            process.wait(timeout=timeout)
            raise DemoError(f"{self.name} did not start: see {self.log_path}")
        self.address = line.rsplit(" ", 1)[1].strip()
        return self.address

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (drain, exit 0), then SIGKILL if it does not go."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class Federation:
    """The processes of a demo federation and where they keep their files."""

    workdir: Path
    pki_dir: Path
    directory: Service
    nodes: dict[str, Service] = field(default_factory=dict)

    def services(self) -> list[Service]:
        return [*self.nodes.values(), self.directory]

    def stop(self) -> None:
        for service in self.services():
            service.stop()


def make_pki(
    pki_dir: Path,
    regions: Sequence[str],
    people: Sequence[tuple[str, str, str]],
    patients: Sequence[synth.SyntheticPatient],
) -> Pki:
    pki = Pki.init(pki_dir)
    pki.issue_directory()
    for region in regions:
        pki.issue_node(region)
    for rpps, profession, name in people:
        pki.issue_practitioner(rpps, profession, name)
    for patient in patients:
        pki.issue_patient(patient.ins, patient.display_name)
    return pki


def start_federation(
    workdir: Path, pki_dir: Path, regions: Sequence[str], *, region_deadline: float = 2.0
) -> Federation:
    """Directory first, then one node per region announcing itself to it."""
    data = workdir / "data"
    logs = workdir / "logs"
    for private in (data, logs):
        private.mkdir(parents=True, exist_ok=True, mode=0o700)
        private.chmod(0o700)
    directory = Service(
        "directory",
        [
            "directory",
            "serve",
            "--pki",
            str(pki_dir),
            "--data-dir",
            str(data),
            "--region-deadline",
            str(region_deadline),
        ],
        logs / "directory.log",
    )
    federation = Federation(workdir, pki_dir, directory)
    try:
        directory.start()
        for region in regions:
            federation.nodes[region] = node_service(pki_dir, workdir, region, directory.address)
            federation.nodes[region].start()
    except BaseException:
        federation.stop()
        raise
    return federation


def node_service(
    pki_dir: Path,
    workdir: Path,
    region: str,
    directory: str,
    listen: str = "127.0.0.1:0",
    *,
    encrypted: bool = True,
) -> Service:
    """A node process; `encrypted` at rest (as a node should be) with its own KEK, in
    WORKDIR/keys apart from its database."""
    args = [
        "node", "serve", "--pki", str(pki_dir), "--region", region, "--listen", listen,
        "--data-dir", str(workdir / "data"), "--directory", directory,
    ]  # fmt: skip
    if encrypted:
        args += ["--kek-file", str(node_kek(workdir, region))]
    return Service(
        f"node {region}",
        args,
        workdir / "logs" / f"node-{region}.log",
    )  # fmt: skip


def node_kek(workdir: Path, region: str) -> Path:
    """The KEK file of a node of WORKDIR, made when missing."""
    kek = workdir / "keys" / f"node-{region}.kek"
    if not kek.exists():
        init_kek_file(kek)
    return kek


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise DemoError(f"timed out waiting for {what}")


def spread(
    patients: Sequence[synth.SyntheticPatient], regions: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """Which regions hold records of each patient: the first patient everywhere, the others
    in their home region and the next one."""
    placement: dict[str, tuple[str, ...]] = {}
    for i, patient in enumerate(patients):
        if i == 0 or len(regions) <= 2:
            placement[patient.ins] = tuple(regions)
        else:
            first = regions[i % len(regions)]
            second = regions[(i + 1) % len(regions)]
            placement[patient.ins] = (first, second)
    return placement


def load_patients(
    pki_dir: Path,
    directory: str,
    nodes: dict[str, str],
    patients: Sequence[synth.SyntheticPatient],
    people: Sequence[tuple[str, str, str]],
    *,
    per_region: int,
    seed: int = 0,
) -> dict[str, dict[str, int]]:
    """Register every patient and write their records to the nodes of their regions, each
    by a professional of a fitting profession (dispensations by pharmacists, the rest by
    doctors). Returns, per INS, the number of records per region."""
    doctors = [f"practitioner-{rpps}" for rpps, profession, _ in people if profession == "doctor"]
    pharmacists = [f"practitioner-{rpps}" for rpps, p, _ in people if p == "pharmacist"] or doctors
    writers = {who: load_credentials(pki_dir, who) for who in {*doctors, *pharmacists}}
    nodes_as = {
        (who, region): NodeClient(address, creds)
        for who, creds in writers.items()
        for region, address in nodes.items()
    }
    directory_client = DirectoryClient(directory, writers[doctors[0]])
    placement = spread(patients, list(nodes))
    expected: dict[str, dict[str, int]] = {}
    try:
        for patient in patients:
            directory_client.register_patient(patient.to_proto(), timeout=10)

        def write(patient: synth.SyntheticPatient) -> None:
            records = synth.records_for(
                patient, regions=placement[patient.ins], per_region=per_region, seed=seed
            )
            for n, record in enumerate(records):
                dispensing = record.kind == record_pb2.RECORD_KIND_DISPENSATION
                team = pharmacists if dispensing else doctors
                who = team[(n + len(patient.ins)) % len(team)]
                nodes_as[(who, record.region)].put_record(
                    record.to_proto(str(uuid.uuid4())),
                    record.content,
                    patient=patient.to_proto(),
                    timeout=30,
                )

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(write, patients))
        for patient in patients:
            expected[patient.ins] = {region: per_region for region in placement[patient.ins]}
    finally:
        for client in (*nodes_as.values(), directory_client):
            client.close()
    return expected


def _print_view(
    pki_dir: Path, directory: str, identity: str, ins: str, emergency: str | None = None
) -> None:
    with DirectoryClient(directory, load_credentials(pki_dir, identity)) as client:
        request = dpb.GetConsolidatedViewRequest(patient_ins=ins, page_size=100)
        view = client.view(request, limit=500, timeout=10.0, emergency=emergency)
    print_view(view.records, view.regions)


def run_demo(
    *, keep_running: bool, patients_count: int, per_region: int, workdir: Path | None, seed: int = 0
) -> int:
    started = time.monotonic()
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="dmp-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    pki_dir = work / "pki"
    people = synth.practitioners(6, seed=seed)
    doctor = next(p for p in people if p[1] == "doctor")
    patients = synth.patients(patients_count, seed=seed, regions=DEMO_REGIONS)
    print(f"== DMP federation demo in {work}")
    make_pki(pki_dir, DEMO_REGIONS, people, patients)
    print(
        f"PKI: root CA, directory, {len(DEMO_REGIONS)} nodes,"
        f" {len(people)} professionals, {len(patients)} patients"
    )
    federation = start_federation(work, pki_dir, DEMO_REGIONS)
    stopped_cleanly = False
    gateway: Service | None = None
    try:
        print(
            f"directory listening on {federation.directory.address}"
            f" (pid {federation.directory.pid})"
        )
        for region, node in federation.nodes.items():
            print(
                f"node {region} {region_name(region)} listening on {node.address} (pid {node.pid})"
            )
        creds_identity = f"practitioner-{doctor[0]}"
        _wait_routed(federation, creds_identity, set(DEMO_REGIONS))
        expected = load_patients(
            pki_dir,
            federation.directory.address,
            {r: n.address for r, n in federation.nodes.items()},
            patients,
            people,
            per_region=per_region,
            seed=seed,
        )
        total = sum(sum(c.values()) for c in expected.values())
        print(
            f"loaded {len(patients)} patients and {total} records"
            f" over regions {', '.join(DEMO_REGIONS)}"
        )
        _wait_located(federation, creds_identity, expected)
        first = patients[0]
        gateway = _start_fhir_gateway(federation, creds_identity, first.ins, doctor[2])
        print()
        print(
            f"== {doctor[2]} ({doctor[1]}) views the record of {first.display_name},"
            f" INS {first.ins}"
        )
        _print_view(pki_dir, federation.directory.address, creds_identity, first.ins)
        other = next(p for p in people if p[1] == "doctor" and p != doctor)
        reason = "unconscious patient, emergency admission"
        print()
        print(f"== {other[2]} (doctor, emergency department) breaks the glass: {reason!r}")
        _print_view(
            pki_dir, federation.directory.address, f"practitioner-{other[0]}", first.ins, reason
        )
        print()
        print(f"== {first.display_name} reads who accessed their record (dmp patient history)")
        with DirectoryClient(
            federation.directory.address, load_credentials(pki_dir, f"patient-{first.ins}")
        ) as patient_client:
            print_history(patient_client.access_history(first.ins))
        print()
        run_scene(
            pki_dir,
            federation.directory.address,
            {r: n.address for r, n in federation.nodes.items()},
            first.ins,
            first.display_name,
        )
        victim = DEMO_REGIONS[1]
        print()
        print(f"== region {victim} ({region_name(victim)}) stops; the same view, partial:")
        federation.nodes[victim].stop()
        _print_view(pki_dir, federation.directory.address, creds_identity, first.ins)
        if keep_running:
            node = federation.nodes[victim]
            federation.nodes[victim] = node_service(
                pki_dir, work, victim, federation.directory.address, listen=node.address
            )
            federation.nodes[victim].start()
            _wait_routed(federation, creds_identity, set(DEMO_REGIONS))
            print()
            print(f"== region {victim} is back on {federation.nodes[victim].address}")
            _print_commands(federation, creds_identity, first.ins, people, patients)
            _wait_for_signal()
        print()
        gateway.stop()
        federation.stop()
        stopped_cleanly = gateway.process is not None and gateway.process.returncode == 0
        stopped_cleanly = stopped_cleanly and all(
            s.process is not None and s.process.returncode == 0
            for s in federation.services()
            if s.name != f"node {victim}"
        )
        how = "clean shutdown" if stopped_cleanly else "some processes had to be killed"
        print(f"federation stopped ({how}); {time.monotonic() - started:.1f} s")
    finally:
        if gateway is not None:
            gateway.stop()
        federation.stop()
        if own_dir and not keep_running:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if stopped_cleanly else 1


def _start_fhir_gateway(federation: Federation, identity: str, ins: str, name: str) -> Service:
    """`dmp fhir serve` as the doctor: its address, and a curl a hospital's software could
    send (run once here to show its answer)."""
    gateway = Service(
        "FHIR gateway",
        ["fhir", "serve", "--pki", str(federation.pki_dir), "--as", identity,
         "--directory", federation.directory.address, "--listen", "127.0.0.1:0"],
        federation.workdir / "logs" / "fhir-gateway.log",
    )  # fmt: skip
    address = gateway.start()
    url = f"http://{address}/DocumentReference?patient.identifier={INS_SYSTEM}|{ins}&_count=5"
    with urllib.request.urlopen(url, timeout=30) as answer:
        bundle = json.load(answer)
    print()
    print(
        f"== FHIR gateway for hospital software, as {name}: http://{address}/ (pid {gateway.pid})"
    )
    print(f"  curl -s '{url}'")
    entries = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    paged = any(link["relation"] == "next" for link in bundle.get("link", []))
    more = ", and a next link to the following page" if paged else ""
    print(f"  -> a searchset Bundle of {len(entries)} DocumentReferences{more}")
    return gateway


def _wait_routed(federation: Federation, identity: str, regions: set[str]) -> None:
    with DirectoryClient(
        federation.directory.address, load_credentials(federation.pki_dir, identity)
    ) as client:

        def routed() -> bool:
            return {n.region for n in client.list_nodes(timeout=5) if n.healthy} >= regions

        wait_until(routed, f"the directory to route to regions {sorted(regions)}")


def _wait_located(
    federation: Federation, identity: str, expected: dict[str, dict[str, int]]
) -> None:
    """Until a doctor's view of each patient shows every record loaded, region by region
    (the directory shows no one its locator's counts)."""
    creds = load_credentials(federation.pki_dir, identity)
    with DirectoryClient(federation.directory.address, creds) as client:
        pending = dict(expected)

        def located() -> bool:
            for ins, counts in list(pending.items()):
                request = dpb.GetConsolidatedViewRequest(patient_ins=ins, page_size=1000)
                view = client.view(request, limit=10_000, timeout=10.0)
                seen: dict[str, int] = {}
                for record in view.records:
                    seen[record.region] = seen.get(record.region, 0) + 1
                if seen != counts:
                    return False
                del pending[ins]
            return True

        wait_until(located, "the directory to locate every fragment")


def _print_commands(
    federation: Federation,
    identity: str,
    ins: str,
    people: Sequence[tuple[str, str, str]],
    patients: Sequence[synth.SyntheticPatient],
) -> None:
    directory = federation.directory.address
    first_node = federation.nodes[DEMO_REGIONS[0]]
    hung = federation.nodes[DEMO_REGIONS[1]]
    lines = [
        "",
        f"The federation stays up until Ctrl-C (or SIGTERM to pid {os.getpid()}).",
        f"  directory:  {directory} (pid {federation.directory.pid})",
        *(f"  node {r}:    {n.address} (pid {n.pid})" for r, n in federation.nodes.items()),
        f"  logs:       {federation.workdir / 'logs'}",
        "  identities: " + ", ".join(f"practitioner-{rpps} ({job})" for rpps, job, _ in people),
        "  patients:   " + ", ".join(p.ins for p in patients[:4]) + ", ...",
        "",
        "In another terminal:",
        f"  export DMP_PKI={federation.pki_dir}",
        "Query as a doctor:",
        f"  dmp query --as {identity} --directory {directory} --patient {ins}",
        "Fetch a record's content through the directory (ids and regions: dmp query --json):",
        f"  dmp record get --as {identity} --directory {directory} --patient {ins} \\",
        "      --region REGION --record ID --out record.bin",
        "As the patient: their own record, then a directive (mask, block, emergency refuse...):",
        f"  dmp patient view --as patient-{ins} --directory {directory}",
        f"  dmp patient emergency refuse --as patient-{ins} --directory {directory}",
        "Write a record to a node:",
        f"  dmp record put --as {identity} --node {first_node.address} --patient {ins} \\",
        '      --kind document --type-code 11488-4 --title "Compte rendu" --file report.pdf',
        "E-prescription: write one at node 11 (its id, and its QR code), then as a pharmacist:",
        f"  dmp prescription create --as practitioner-{RX_DOCTOR[0]} --node {first_node.address}"
        f" --patient {ins} \\",
        '      --line "3400935955838|1|1 comprimé|3 fois par jour|7 jours" --renewals 1'
        " --qr rx.png",
        f"  dmp prescription show ID --as practitioner-{RX_PHARMACIST[0]} --directory {directory}",
        f"  dmp prescription dispense ID --as practitioner-{RX_PHARMACIST[0]}"
        f' --directory {directory} --pharmacy "{RX_PHARMACIST[3]}"',
        f"  dmp prescription find --as patient-{ins} --directory {directory} --patient {ins}",
        "Make a region hang, query again (named as not answering within 2 s), resume it:",
        f"  kill -STOP {hung.pid}; dmp query --as {identity} --directory {directory}"
        f" --patient {ins}; kill -CONT {hung.pid}",
    ]
    print("\n".join(lines), flush=True)


def _wait_for_signal() -> None:
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not received:
            signal.pause()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

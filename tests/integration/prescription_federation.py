"""What the e-prescription tests through the directory share: a directory and nodes 11, 53
and 84 over real mutual TLS (SQLite files or PostgreSQL databases), a doctor who prescribes
in region 11, three pharmacists with pharmacies in three regions, a patient with records
in every region, and typed clients (dmp/prescription_client.py) as each of them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from directory.app import RunningDirectory
from dmp.client import DirectoryClient, NodeClient
from dmp.ins import make_ins
from dmp.pki import Pki, load_credentials
from dmp.prescription_client import PrescriptionClient
from dmp.prescriptions import parse_line
from dmp.server import error_reason
from dmp.v1 import prescription_pb2 as pb
from node.app import RunningNode
from tests.federation import (
    DOCTOR,
    REGIONS,
    draft,
    identity_of,
    running_directory,
    running_node,
    wait_for,
)

#: Pharmacists, each with a pharmacy in another region (identities are national; where
#: they work is the pharmacy's name).
PHARMACISTS = {
    "11": ("10000000311", "Pharmacie Alésia, Paris"),
    "53": ("10000000353", "Pharmacie du Port, Brest"),
    "84": ("10000000384", "Pharmacie Bellecour, Lyon"),
}
DOC = f"practitioner-{DOCTOR}"
LINE = "3400935955838|2|1 comprimé|3 fois par jour|7 jours"
OTHER_LINE = "3400930000014|1|1 sachet|matin et soir|30 jours"
#: Patients of these tests: distinct INS across every federation of the session (the PKI
#: directory is the session's).
_PATIENTS = itertools.count(random.randrange(100_000, 900_000))


def pharmacist(region: str) -> str:
    return f"practitioner-{PHARMACISTS[region][0]}"


def pharmacy(region: str) -> str:
    return PHARMACISTS[region][1]


def issue_pharmacists(pki_dir: Path) -> None:
    pki = Pki.load(pki_dir)
    for region, (rpps, _) in PHARMACISTS.items():
        if not (pki_dir / f"practitioner-{rpps}.pem").exists():
            pki.issue_practitioner(rpps, "pharmacist", f"Pharmacien {region}")


@dataclass(frozen=True)
class Refusal:
    """What a caller sees of a refused call."""

    code: grpc.StatusCode
    reason: str | None
    details: str


def refusal(call: Callable[[], object]) -> Refusal:
    try:
        call()
    except grpc.RpcError as exc:
        return Refusal(exc.code(), error_reason(exc), exc.details() or "")
    raise AssertionError("the call was not refused")


@dataclass
class RxFed:
    pki_dir: Path
    directory: RunningDirectory
    nodes: dict[str, RunningNode]
    stack: ExitStack
    _clients: list[PrescriptionClient] = field(default_factory=list)

    def address(self, region: str | None = None) -> str:
        port = self.directory.port if region is None else self.nodes[region].port
        return f"127.0.0.1:{port}"

    def rx(self, identity: str, region: str | None = None) -> PrescriptionClient:
        """A prescription client as `identity`, at the directory or at a region's node."""
        client = PrescriptionClient(self.address(region), load_credentials(self.pki_dir, identity))
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def new_patient(self, regions: tuple[str, ...] = REGIONS) -> str:
        """A registered patient with a record (and so a fragment) in each of `regions`,
        and a certificate of their own."""
        number = next(_PATIENTS)
        ins = make_ins(f"1860275{number:06d}")
        Pki.load(self.pki_dir).issue_patient(ins, f"Patient {number}")
        creds = load_credentials(self.pki_dir, DOC)
        with DirectoryClient(self.address(), creds) as directory:
            directory.register_patient(identity_of(ins), timeout=10)
        for region in regions:
            with NodeClient(self.address(region), creds) as node:
                node.put_record(draft(ins), b"consultation", patient=identity_of(ins))

        def located() -> bool:
            return {f.region for f in self.directory.index.fragments(ins)} == set(regions)

        wait_for(located, f"the directory to locate {ins} in {regions}")
        return ins

    def prescribe(
        self,
        ins: str,
        *,
        region: str = "11",
        lines: tuple[str, ...] = (LINE,),
        renewals: int = 0,
        interval_days: int = 0,
        through_directory: bool = False,
    ) -> pb.StoredPrescription:
        """The doctor's prescription, held by the node of `region`."""
        where = None if through_directory else region
        return self.rx(DOC, where).create(
            ins,
            [parse_line(text) for text in lines],
            region=region,
            organization="Cabinet de test",
            renewals=renewals,
            min_interval_days=interval_days,
        )


def prescription_id(stored: pb.StoredPrescription) -> str:
    return pb.Prescription.FromString(stored.signed.prescription).id


@contextmanager
def running_rx_federation(
    pki_dir: Path, db_factory: Callable[[str], str], regions: tuple[str, ...] = REGIONS
) -> Iterator[RxFed]:
    issue_pharmacists(pki_dir)
    with ExitStack() as stack:
        directory = stack.enter_context(
            running_directory(pki_dir, db_factory("directory"), health_interval=0.2)
        )
        nodes = {
            region: stack.enter_context(
                running_node(
                    pki_dir,
                    region,
                    db_factory(f"node-{region}"),
                    directory=f"127.0.0.1:{directory.port}",
                )
            )
            for region in regions
        }
        wait_for(
            lambda: (
                {r for r, route in directory.discovery.routes().items() if route.healthy}
                >= set(regions)
            ),
            f"the directory to route to {regions}",
        )
        fed = RxFed(pki_dir, directory, nodes, stack)
        stack.callback(fed.close)
        yield fed

"""Wiring of the national directory: configuration in, a running server out."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc

from directory.access import DirectoryAccess
from directory.channels import NodeChannels
from directory.directives import DirectiveStore
from directory.fanout import FanOut
from directory.index import PatientIndex
from directory.models import audit_checkpoints, audit_events, seen_nonces, witnessed_heads
from directory.registry import EmbeddedRegistry
from directory.servicer import DirectoryServicer
from directory.view import DEFAULT_REGION_DEADLINE, ViewAssembler
from dmp.assertion import AssertionVerifier
from dmp.audit.calls import Auditor
from dmp.audit.log import AuditLog
from dmp.audit.merkle_proofs import LeafSubtrees
from dmp.audit.refusals import RefusalTrail
from dmp.audit.witness import WitnessStore
from dmp.audit.witness_client import HeadPublisher, WitnessStub
from dmp.audit.witness_rpc import WITNESS_SERVICE, WitnessServicer, add_witness_service
from dmp.db import make_engine, sqlite_url, upgrade
from dmp.dbfile import prepare_sqlite, private_directory
from dmp.discovery import Discovery
from dmp.errors import FailedPrecondition
from dmp.identity import Role
from dmp.nonces import StoredNonces
from dmp.pki import CRL_FILE, RevocationList, certificate_from_pem, load_credentials
from dmp.server import FederationServer, ServiceSpec, start_server
from dmp.signing import SignatureVerifier
from dmp.streams import StreamLimits
from dmp.v1 import directory_service_pb2, directory_service_pb2_grpc, witness_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"
DIRECTORY_SERVICE = directory_service_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name


@dataclass
class DirectoryConfig:
    pki_dir: Path
    listen: str = "127.0.0.1:0"
    db_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path("data"))
    region_deadline: float = DEFAULT_REGION_DEADLINE
    consul_url: str | None = None
    health_interval: float = 1.0
    #: Seconds between signed checkpoints of the audit trail (and one at shutdown).
    audit_checkpoint_interval: float = 60.0
    #: Accept an existing empty SQLite file as a new database (refused otherwise).
    initialise: bool = False
    #: ... and one as soon as this many events were added since the last one.
    audit_checkpoint_every: int = 1000
    #: Seconds a person's stream may wait on its peer before it is closed (dmp/streams.py).
    stream_idle_timeout: float = 60.0
    #: Seconds over which identical refusals are counted into one event (dmp/audit/refusals.py).
    refusal_window: float = 10.0

    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        private_directory(self.data_dir)
        return sqlite_url(self.data_dir / "directory.db")


@dataclass
class RunningDirectory:
    server: FederationServer
    index: PatientIndex
    discovery: Discovery
    registry: EmbeddedRegistry | None
    audit: AuditLog
    witness_publisher: HeadPublisher | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, grace: float | None = 5.0) -> None:
        self.server.stop(grace)


def start_directory(config: DirectoryConfig) -> RunningDirectory:
    credentials = load_credentials(config.pki_dir, "directory")
    if credentials.principal.role is not Role.DIRECTORY:
        raise FailedPrecondition("directory.pem does not name urn:dmp:directory")
    url = config.database_url()
    prepare_sqlite(url, initialise=config.initialise)
    engine = make_engine(url)
    upgrade(engine, MIGRATIONS, "alembic_version_directory")
    index = PatientIndex(engine)
    channels = NodeChannels(credentials)
    registry: EmbeddedRegistry | None = None
    discovery: Discovery
    if config.consul_url:
        from dmp.discovery.consul import ConsulDiscovery

        discovery = ConsulDiscovery(config.consul_url, verify=channels.problems)
    else:
        registry = EmbeddedRegistry(engine, channels, check_interval=config.health_interval)
        discovery = registry
    discovery.start()
    fanout = FanOut(discovery, channels, config.region_deadline)
    assembler = ViewAssembler(index, fanout)
    ca = certificate_from_pem(credentials.ca_pem)
    revocation = RevocationList(config.pki_dir / CRL_FILE, ca)
    signatures = SignatureVerifier(ca, revocation)
    directives = DirectiveStore(engine, signatures)
    nonces = StoredNonces(engine, seen_nonces)
    access = DirectoryAccess(AssertionVerifier(signatures, nonces=nonces), directives)
    audit_log = AuditLog(
        engine,
        audit_events,
        audit_checkpoints,
        source_id=credentials.principal.uri,
        signer=credentials,
        checkpoint_interval=config.audit_checkpoint_interval,
        checkpoint_every=config.audit_checkpoint_every,
    )
    auditor = Auditor(audit_log, RefusalTrail(audit_log, window=config.refusal_window))
    witness = WitnessServicer(
        WitnessStore(engine, witnessed_heads, credentials, ca), auditor, Role.NODE
    )

    def node_witnesses() -> dict[str, WitnessStub]:
        """Every node the directory routes to witnesses the directory's audit heads."""
        return {
            f"node {route.region}": witness_pb2_grpc.WitnessServiceStub(
                channels.channel(route.region, route.address)
            )
            for route in discovery.routes().values()
            if route.healthy
        }

    publisher = HeadPublisher(audit_log, engine, LeafSubtrees(engine, audit_events), node_witnesses)
    servicer = DirectoryServicer(
        index,
        discovery,
        registry,
        channels,
        assembler,
        access,
        directives,
        fanout,
        auditor,
    )

    def add(server: grpc.Server) -> None:
        directory_service_pb2_grpc.add_DirectoryServiceServicer_to_server(servicer, server)

    try:
        running = start_server(
            credentials=credentials,
            revocation=revocation,
            listen=config.listen,
            services=[
                ServiceSpec(DIRECTORY_SERVICE, add),
                ServiceSpec(WITNESS_SERVICE, add_witness_service(witness)),
            ],
            stream_limits=StreamLimits(idle_timeout=config.stream_idle_timeout),
            refusals=auditor.refusals,
        )
    except BaseException:
        discovery.close()
        channels.close()
        raise
    audit_log.start()
    publisher.start()
    running.on_stop.extend(
        [
            auditor.close,  # counted refusals, a last signed checkpoint...
            partial(publisher.close, 1.0),  # ... sent to the nodes that can be reached
            discovery.close,
            channels.close,
            engine.dispose,
        ]
    )
    return RunningDirectory(
        server=running,
        index=index,
        discovery=discovery,
        registry=registry,
        audit=audit_log,
        witness_publisher=publisher,
    )

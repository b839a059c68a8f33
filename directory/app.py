"""Wiring of the national directory: configuration in, a running server out."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc

from directory.access import DirectoryAccess
from directory.channels import NodeChannels
from directory.directives import DirectiveStore
from directory.fanout import FanOut
from directory.index import PatientIndex
from directory.models import audit_checkpoints, audit_events, seen_nonces, witnessed_heads
from directory.prescribing import PrescriptionRelay
from directory.prescription_servicer import DirectoryPrescriptionServicer
from directory.registry import EmbeddedRegistry
from directory.service import DirectoryService
from directory.servicer import DirectoryServicer
from directory.view import DEFAULT_REGION_DEADLINE, ViewAssembler
from dmp.audit.log import AuditLog
from dmp.audit.witness_client import HeadPublisher, WitnessStub
from dmp.db import sqlite_url
from dmp.dbfile import private_directory
from dmp.discovery import Discovery
from dmp.errors import FailedPrecondition
from dmp.foundation import RunningService, ServiceSettings, ServiceTables, open_foundation
from dmp.identity import Role
from dmp.pki import load_credentials
from dmp.server import ServiceSpec
from dmp.v1 import (
    directory_service_pb2,
    directory_service_pb2_grpc,
    prescription_pb2,
    prescription_pb2_grpc,
    witness_pb2_grpc,
)

MIGRATIONS = Path(__file__).parent / "migrations"
TABLES = ServiceTables(
    MIGRATIONS,
    "alembic_version_directory",
    audit_events,
    audit_checkpoints,
    seen_nonces,
    witnessed_heads,
)
DIRECTORY_SERVICE = directory_service_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name
PRESCRIPTION_SERVICE = prescription_pb2.DESCRIPTOR.services_by_name["PrescriptionService"].full_name


@dataclass
class DirectoryConfig(ServiceSettings):
    pki_dir: Path
    region_deadline: float = DEFAULT_REGION_DEADLINE
    consul_url: str | None = None
    health_interval: float = 1.0

    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        private_directory(self.data_dir)
        return sqlite_url(self.data_dir / "directory.db")


@dataclass
class RunningDirectory(RunningService):
    index: PatientIndex
    discovery: Discovery
    registry: EmbeddedRegistry | None
    audit: AuditLog
    witness_publisher: HeadPublisher | None = None


def start_directory(config: DirectoryConfig) -> RunningDirectory:
    credentials = load_credentials(config.pki_dir, "directory")
    if credentials.principal.role is not Role.DIRECTORY:
        raise FailedPrecondition("directory.pem does not name urn:dmp:directory")
    base = open_foundation(
        credentials, config.pki_dir, config.database_url(), config, TABLES, witness_of=Role.NODE
    )
    engine, audit_log, auditor = base.engine, base.audit_log, base.auditor
    index = PatientIndex(engine)
    channels = NodeChannels(credentials)
    registry: EmbeddedRegistry | None = None
    discovery: Discovery
    if config.consul_url:
        from dmp.discovery.consul_discovery import ConsulDiscovery

        discovery = ConsulDiscovery(config.consul_url, verify=channels.problems)
    else:
        registry = EmbeddedRegistry(engine, channels, check_interval=config.health_interval)
        discovery = registry
    discovery.start()
    fanout = FanOut(discovery, channels, config.region_deadline)
    assembler = ViewAssembler(index, fanout)
    directives = DirectiveStore(engine, base.signatures)
    access = DirectoryAccess(base.assertions, directives)

    def node_witnesses() -> dict[str, WitnessStub]:
        """Every node the directory routes to witnesses the directory's audit heads."""
        return {
            f"node {route.region}": witness_pb2_grpc.WitnessServiceStub(
                channels.channel(route.region, route.address)
            )
            for route in discovery.routes().values()
            if route.healthy
        }

    publisher = HeadPublisher(audit_log, engine, base.subtrees, node_witnesses)
    servicer = DirectoryServicer(
        DirectoryService(
            engine,
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
    )
    prescriptions = DirectoryPrescriptionServicer(
        PrescriptionRelay(index, discovery, channels, access, fanout, auditor)
    )

    def add(server: grpc.Server) -> None:
        directory_service_pb2_grpc.add_DirectoryServiceServicer_to_server(servicer, server)

    def add_prescriptions(server: grpc.Server) -> None:
        prescription_pb2_grpc.add_PrescriptionServiceServicer_to_server(prescriptions, server)

    try:
        running = base.serve(
            config,
            [
                ServiceSpec(DIRECTORY_SERVICE, add),
                ServiceSpec(PRESCRIPTION_SERVICE, add_prescriptions),
            ],
        )
    except BaseException:
        discovery.close()
        channels.close()
        raise
    publisher.start()
    running.on_stop.extend(
        [
            partial(publisher.close, 1.0),  # the last checkpoint, to the nodes reachable
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

"""Wiring of a regional node: configuration in, a running server out (one place)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import Engine

from dmp.audit.log import AuditLog
from dmp.audit.merkle_proofs import LeafSubtrees
from dmp.audit.witness_client import HeadPublisher, compare_with_witnessed, fetch_witnessed
from dmp.clock import now_us
from dmp.db import sqlite_url
from dmp.dbfile import private_directory
from dmp.discovery.embedded import EmbeddedAnnouncer
from dmp.envelope import load_kek_file
from dmp.errors import FailedPrecondition
from dmp.foundation import RunningService, ServiceSettings, ServiceTables, open_foundation
from dmp.identity import Role
from dmp.pki import (
    certificate_dns_names,
    certificate_from_pem,
    load_credentials,
    node_tls_name,
)
from dmp.regions import check_region
from dmp.server import ServiceGate, ServiceSpec, host_port
from dmp.shared_commit import SharedCommit
from dmp.tls import DEFAULT_MAX_CONTENT, secure_channel
from dmp.v1 import (
    handover_pb2,
    handover_pb2_grpc,
    node_service_pb2,
    node_service_pb2_grpc,
    prescription_pb2,
    prescription_pb2_grpc,
    witness_pb2_grpc,
)
from node.access import NodeAccess
from node.access_matrix import load_matrix
from node.backup_schedule import BackupScheduler
from node.directives import DirectiveCache
from node.handover_source import HandoverSource
from node.handover_state import FREEZING, FROZEN, HANDED_OVER, IN_CHARGE, PREDECESSOR, read
from node.handover_watch import Background, HandoverWatch, moved, moving
from node.keys import Sealer, foreign_keys, has_sealed_data
from node.locator import OutboxDelivery
from node.models import audit_checkpoints, audit_events, seen_nonces, witnessed_heads
from node.prescribing import PrescriptionService
from node.prescription_servicer import PrescriptionServicer
from node.prescription_store import PrescriptionStore
from node.service import RecordService
from node.servicer import NodeServicer
from node.store import RecordStore

log = logging.getLogger("dmp.node")

MIGRATIONS = Path(__file__).parent / "migrations"
TABLES = ServiceTables(
    MIGRATIONS,
    "alembic_version_node",
    audit_events,
    audit_checkpoints,
    seen_nonces,
    witnessed_heads,
)
NODE_SERVICE = node_service_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name
PRESCRIPTION_SERVICE = prescription_pb2.DESCRIPTOR.services_by_name["PrescriptionService"].full_name
HANDOVER_SERVICE = handover_pb2.DESCRIPTOR.services_by_name["HandoverService"].full_name


@dataclass
class NodeConfig(ServiceSettings):
    pki_dir: Path
    region: str
    max_content: int = DEFAULT_MAX_CONTENT
    #: host:port of the directory (embedded discovery and the locator outbox).
    directory: str | None = None
    #: Consul agent URL: register there instead of announcing to the directory.
    consul_url: str | None = None
    #: host:port to announce; default: the listen host with the bound port.
    advertise: str | None = None
    #: JSON profession matrix (default: node/access_matrix.json).
    access_matrix: Path | None = None
    #: Serve even when the directory witnessed a longer audit log than this node holds
    #: (logged as an error; the directory then refuses this node's new heads).
    accept_missing_audit: bool = False
    #: The key-encryption key file (dmp node init-kek): records are stored encrypted.
    #: Without it the node stores in clear (warned loudly) and refuses a database that
    #: holds encrypted records.
    kek_file: Path | None = None
    #: KEKs that only open the data keys not yet rewrapped, while `dmp node rotate-kek`
    #: runs beside the serving node (restart without them once it is done).
    previous_kek_files: tuple[Path, ...] = ()
    #: Microseconds since the epoch (tests inject a clock to move time).
    clock: Callable[[], int] = now_us
    #: Scheduled backups (node/backup_schedule.py): every this many seconds, into this
    #: directory, keeping the newest `backup_keep`; none without `backup_every`.
    backup_every: float | None = None
    backup_keep: int = 7
    backup_dir: Path | None = None

    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        private_directory(self.data_dir)
        return sqlite_url(self.data_dir / f"node-{self.region}.db")


@dataclass
class RunningNode(RunningService):
    store: RecordStore
    region: str
    delivery: OutboxDelivery | None = None
    audit: AuditLog | None = None
    witness_publisher: HeadPublisher | None = None
    backups: BackupScheduler | None = None
    #: The shared commits of single puts (`stats` counts their batches).
    puts: SharedCommit[Any, Any] | None = None


def start_node(config: NodeConfig) -> RunningNode:
    region = check_region(config.region)
    credentials = load_credentials(config.pki_dir, f"node-{region}")
    me = credentials.principal
    if me.role is not Role.NODE or me.key != region:
        raise FailedPrecondition(
            f"the certificate node-{region}.pem names {me.uri}, not urn:dmp:node:{region}:"
            " a node serves only the region of its own certificate"
        )
    if node_tls_name(region) not in certificate_dns_names(
        certificate_from_pem(credentials.cert_pem)
    ):
        raise FailedPrecondition(
            f"the certificate node-{region}.pem does not carry the DNS name"
            f" {node_tls_name(region)}, by which the directory checks that it reaches this"
            f" region's node (certificates issued before region names lack it): reissue it"
            f" with `dmp pki issue node --region {region} --pki DIR` (keeping its --host names)"
        )
    base = open_foundation(
        credentials,
        config.pki_dir,
        config.database_url(),
        config,
        TABLES,
        witness_of=Role.DIRECTORY,
        region=region,
    )
    engine, audit_log, auditor = base.engine, base.audit_log, base.auditor
    try:
        gate = _handover_gate(engine, region)
        sealer = _sealer(engine, config.kek_file, config.previous_kek_files)
    except BaseException:
        engine.dispose()
        raise
    store = RecordStore(
        engine, region, max_content=config.max_content, clock=config.clock, sealer=sealer
    )
    directory_channel = secure_channel(config.directory, credentials) if config.directory else None
    if directory_channel is None:
        log.warning("no --directory: patient directives are not known to this node")
    access = NodeAccess(
        base.assertions,
        DirectiveCache(base.signatures, directory_channel),
        load_matrix(config.access_matrix) if config.access_matrix else load_matrix(),
    )
    publisher = None
    if directory_channel is not None:
        directory_stub = witness_pb2_grpc.WitnessServiceStub(directory_channel)
        try:
            _compare_with_directory(directory_stub, audit_log, base.subtrees, config)
        except BaseException:
            directory_channel.close()
            engine.dispose()
            raise
        publisher = HeadPublisher(
            audit_log, engine, base.subtrees, lambda: {"the directory": directory_stub}
        )
    records = RecordService(engine, store, access, auditor)
    servicer = NodeServicer(records)
    prescriptions = PrescriptionServicer(
        PrescriptionService(
            engine,
            PrescriptionStore(engine, region, sealer),
            store,
            access,
            auditor,
            base.signatures,
            clock=config.clock,
        )
    )

    def add(server: grpc.Server) -> None:
        node_service_pb2_grpc.add_NodeServiceServicer_to_server(servicer, server)

    def add_prescriptions(server: grpc.Server) -> None:
        prescription_pb2_grpc.add_PrescriptionServiceServicer_to_server(prescriptions, server)

    handover_source = HandoverSource(engine, credentials, sealer)

    def add_handover(server: grpc.Server) -> None:
        handover_pb2_grpc.add_HandoverServiceServicer_to_server(handover_source, server)

    running = base.serve(
        config,
        [
            ServiceSpec(NODE_SERVICE, add),
            ServiceSpec(PRESCRIPTION_SERVICE, add_prescriptions),
            ServiceSpec(HANDOVER_SERVICE, add_handover),
        ],
        max_content=config.max_content,
        gate=gate,
    )
    address = config.advertise or host_port(config.listen, running.port)
    if publisher is not None and directory_channel is not None:
        publisher.start()
        running.on_stop.append(publisher.close)  # the last checkpoint, to the directory
        running.on_stop.append(directory_channel.close)
    running.on_stop.append(records.shared.close)  # its connection, before the pool's
    running.on_stop.append(engine.dispose)
    backups = None
    if config.backup_every:
        backups = BackupScheduler(
            engine,
            credentials,
            config.backup_dir or config.data_dir / "backups",
            every=config.backup_every,
            keep=config.backup_keep,
            health_servicer=running.health,
            kek=sealer.kek if sealer is not None else None,
        )
        backups.start()
        running.on_stop.insert(0, backups.close)  # before the database closes
    delivery: list[OutboxDelivery] = []

    def start_background() -> list[Callable[[], None]]:
        """Announcing this node and delivering its outbox (stopped while it hands over)."""
        stops: list[Callable[[], None]] = []
        try:
            if config.consul_url:
                from dmp.discovery.consul import ConsulAnnouncer

                consul = ConsulAnnouncer(config.consul_url, region, address)
                consul.start()
                stops.append(consul.close)  # withdraw before draining
            if directory_channel is not None:
                outbox = OutboxDelivery(store, directory_channel)
                outbox.start()
                delivery[:] = [outbox]
                stops.append(outbox.close)
                if not config.consul_url:
                    announcer = EmbeddedAnnouncer(directory_channel, address)
                    announcer.start()
                    stops.insert(0, announcer.close)
        except BaseException:
            for stop in stops:
                stop()
            raise
        return stops

    background = Background(start_background)
    watch = HandoverWatch(
        engine,
        region,
        running,
        audit_log,
        auditor,
        background,
        [NODE_SERVICE, PRESCRIPTION_SERVICE],
    )
    try:
        if watch.prepare():
            background.start()
        watch.start()
    except BaseException:
        running.stop(None)
        raise
    running.before_stop.append(background.stop)  # withdraw before draining
    running.before_stop.insert(0, watch.close)
    return RunningNode(
        server=running,
        store=store,
        region=region,
        delivery=delivery[0] if delivery else None,
        audit=audit_log,
        witness_publisher=publisher,
        backups=backups,
        puts=records.shared,
    )


def _handover_gate(engine: Engine, region: str) -> ServiceGate:
    """The server's gate, closed from the start on a node that froze or handed over its
    region; a successor still receiving refuses to serve at all."""
    gate = ServiceGate(open_to=[HANDOVER_SERVICE])
    handover = read(engine)
    if handover is None:
        return gate
    if handover.role == PREDECESSOR:
        if handover.state in (FREEZING, FROZEN):
            gate.close(moving(region))
        elif handover.state == HANDED_OVER:
            gate.close(moved(region, handover.peer_address))
    elif handover.state != IN_CHARGE:
        raise FailedPrecondition(
            f"this database is still receiving region {region} from {handover.peer_address}:"
            f" serve it with --successor-of {handover.peer_address} to finish the hand-over",
            reason="HANDOVER_RECEIVING",
        )
    return gate


def _sealer(
    engine: Engine, kek_file: Path | None, previous_files: tuple[Path, ...] = ()
) -> Sealer | None:
    """The node's sealer, from its KEK file; None for a node without one, which may only
    serve a database without encrypted records."""
    with engine.connect() as connection:
        if kek_file is None:
            if has_sealed_data(connection):
                raise FailedPrecondition(
                    "refusing to serve: this database holds encrypted records and no"
                    " --kek-file was given; start the node with the KEK file that wraps"
                    " its data keys",
                    reason="KEK_REQUIRED",
                )
            log.warning(
                "no --kek-file: this node stores record content and titles IN CLEAR; create a"
                " KEK with `dmp node init-kek FILE` and serve with --kek-file FILE"
            )
            return None
        kek = load_kek_file(kek_file)
        sealer = Sealer(kek, previous=[load_kek_file(path) for path in previous_files])
        others = foreign_keys(connection, sealer.kek_ids)
    if others:
        raise FailedPrecondition(
            f"refusing to serve: {others} data key(s) of this database are wrapped by another"
            f" KEK than {kek.key_id} ({kek_file}): give the KEK file they were wrapped with,"
            " or finish the rotation with `dmp node rotate-kek`",
            reason="WRONG_KEK",
        )
    log.info("records are encrypted at rest with data keys wrapped by KEK %s", kek.key_id)
    return sealer


def _compare_with_directory(
    directory: witness_pb2_grpc.WitnessServiceStub,
    audit_log: AuditLog,
    subtrees: LeafSubtrees,
    config: NodeConfig,
) -> None:
    """Refuse to serve a log shorter than, or inconsistent with, the latest head of ours the
    directory witnessed (records lost with their audit events: a truncated -wal, an old
    backup). A directory out of reach is no reason not to start: say so and go on."""
    me = audit_log.source_id
    try:
        latest = fetch_witnessed(directory, me, latest_only=True, timeout=5.0)
    except grpc.RpcError as exc:
        log.warning(
            "cannot ask the directory for the audit head it witnessed for %s (%s): starting"
            " without comparing this node's audit log with it",
            me,
            exc.code().name,
        )
        return
    if not latest:
        return
    problem = compare_with_witnessed(audit_log.size(), latest[0], subtrees)
    if not problem:
        log.info("audit log of %s matches the head the directory witnessed", me)
        return
    if config.accept_missing_audit:
        log.error("%s; serving anyway (--accept-missing-audit)", problem)
        return
    raise FailedPrecondition(
        f"refusing to serve: {problem}. Restore the database holding them, or start with"
        " --accept-missing-audit to serve without them",
        reason="AUDIT_BEHIND_WITNESS",
    )

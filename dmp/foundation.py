"""What every federation server stands on, wired once for the node and the directory.

Credentials of the service's own certificate, its database (created private, migrated),
the CA and its revocation list, the signature and assertion verifiers with the stored
nonces, the audit log with its counted refusals, and the witness of the other side's audit
heads; then the server itself and the order in which all of it stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from sqlalchemy import Engine, Table

from dmp.assertion import AssertionVerifier
from dmp.audit.calls import Auditor
from dmp.audit.log import AuditLog
from dmp.audit.merkle_proofs import LeafSubtrees
from dmp.audit.refusals import RefusalTrail
from dmp.audit.witness import WitnessStore
from dmp.audit.witness_rpc import WITNESS_SERVICE, WitnessServicer, add_witness_service
from dmp.audit.witness_service import Witnessing
from dmp.db import make_engine, upgrade
from dmp.dbfile import prepare_sqlite
from dmp.identity import Role
from dmp.nonces import StoredNonces
from dmp.pki import CRL_FILE, Credentials, RevocationList, certificate_from_pem
from dmp.server import FederationServer, ServiceGate, ServiceSpec, start_server
from dmp.signing import SignatureVerifier
from dmp.streams import StreamLimits
from dmp.tls import DEFAULT_MAX_CONTENT


@dataclass(kw_only=True)
class ServiceSettings:
    """The settings a node and the directory share."""

    listen: str = "127.0.0.1:0"
    db_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path("data"))
    #: Seconds between signed checkpoints of the audit trail (and one at shutdown).
    audit_checkpoint_interval: float = 60.0
    #: ... and one as soon as this many events were added since the last one.
    audit_checkpoint_every: int = 1000
    #: Seconds a person's stream may wait on its peer before it is closed (dmp/streams.py).
    stream_idle_timeout: float = 60.0
    #: Seconds over which identical refusals are counted into one event (dmp/audit/refusals.py).
    refusal_window: float = 10.0
    #: Accept an existing empty SQLite file as a new database (refused otherwise).
    initialise: bool = False


@dataclass
class RunningService:
    """A started server: its port, and how to stop it (in the order its stop hooks say)."""

    server: FederationServer

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self, grace: float | None = 5.0) -> None:
        self.server.stop(grace)


@dataclass(frozen=True)
class ServiceTables:
    """The tables of one service's schema that the foundation works on."""

    migrations: Path
    version_table: str
    audit_events: Table
    audit_checkpoints: Table
    seen_nonces: Table
    witnessed_heads: Table


@dataclass
class Foundation:
    """A service's shared parts, open and ready; `serve` starts its server on them."""

    credentials: Credentials
    engine: Engine
    ca: x509.Certificate
    revocation: RevocationList
    signatures: SignatureVerifier
    assertions: AssertionVerifier
    audit_log: AuditLog
    auditor: Auditor
    subtrees: LeafSubtrees
    witness: WitnessServicer

    def serve(
        self,
        settings: ServiceSettings,
        services: Sequence[ServiceSpec],
        *,
        max_content: int = DEFAULT_MAX_CONTENT,
        gate: ServiceGate | None = None,
    ) -> FederationServer:
        """Start the server with the service's own services and the witness service, then
        the audit log; at stop: counted refusals and a last checkpoint, then the database."""
        running = start_server(
            credentials=self.credentials,
            revocation=self.revocation,
            listen=settings.listen,
            services=[*services, ServiceSpec(WITNESS_SERVICE, add_witness_service(self.witness))],
            max_content=max_content,
            stream_limits=StreamLimits(idle_timeout=settings.stream_idle_timeout),
            refusals=self.auditor.refusals,
            gate=gate,
        )
        self.audit_log.start()
        running.on_stop.append(self.auditor.close)
        return running


def open_foundation(
    credentials: Credentials,
    pki_dir: Path,
    database_url: str,
    settings: ServiceSettings,
    tables: ServiceTables,
    *,
    witness_of: Role,
    region: str = "",
) -> Foundation:
    """Open the database (private, migrated) and build what both services need.
    `witness_of` is the role whose audit heads this service witnesses."""
    prepare_sqlite(database_url, initialise=settings.initialise)
    engine = make_engine(database_url)
    try:
        upgrade(engine, tables.migrations, tables.version_table)
    except BaseException:
        engine.dispose()
        raise
    ca = certificate_from_pem(credentials.ca_pem)
    revocation = RevocationList(pki_dir / CRL_FILE, ca)
    signatures = SignatureVerifier(ca, revocation)
    nonces = StoredNonces(engine, tables.seen_nonces)
    assertions = AssertionVerifier(signatures, nonces=nonces)
    audit_log = AuditLog(
        engine,
        tables.audit_events,
        tables.audit_checkpoints,
        source_id=credentials.principal.uri,
        region=region,
        signer=credentials,
        checkpoint_interval=settings.audit_checkpoint_interval,
        checkpoint_every=settings.audit_checkpoint_every,
        nonces=nonces,
    )
    auditor = Auditor(audit_log, RefusalTrail(audit_log, window=settings.refusal_window))
    witness = WitnessServicer(
        Witnessing(
            engine,
            WitnessStore(engine, tables.witnessed_heads, credentials, ca),
            auditor,
            witness_of,
        )
    )
    return Foundation(
        credentials=credentials,
        engine=engine,
        ca=ca,
        revocation=revocation,
        signatures=signatures,
        assertions=assertions,
        audit_log=audit_log,
        auditor=auditor,
        subtrees=LeafSubtrees(engine, tables.audit_events),
        witness=witness,
    )

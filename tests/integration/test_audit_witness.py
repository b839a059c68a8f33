"""Witnessed audit heads over real mutual TLS, on SQLite and PostgreSQL: a node's signed
tree heads kept by the directory (and the directory's by the nodes), the two rewrites of
issue 9 that `dmp audit verify` missed caught against them, online and from an exported
file, and a node whose audit tail is gone refusing to serve."""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from directory.app import RunningDirectory
from directory.models import witnessed_heads as directory_witnessed
from dmp.audit.checkpoints import sign_checkpoint
from dmp.audit.events import AuditEvent, EventType
from dmp.audit.log import AuditLog
from dmp.audit.merkle import event_leaf_hash
from dmp.audit.merkle_proofs import LeafSubtrees
from dmp.audit.tables import audit_tables
from dmp.audit.witness import head_to_proto, list_witnessed
from dmp.cli import audit as audit_cli
from dmp.db import make_engine, new_metadata, writer
from dmp.errors import FailedPrecondition
from dmp.pki import load_credentials
from dmp.v1 import witness_pb2 as wpb
from dmp.v1 import witness_pb2_grpc
from node.app import RunningNode
from node.models import witnessed_heads as node_witnessed
from tests.federation import (
    DOCTOR,
    PATIENT,
    client,
    dmp_process,
    running_directory,
    running_node,
    wait_for,
)

NODE = "urn:dmp:node:11"
DIRECTORY = "urn:dmp:directory"
QUIET = {"audit_checkpoint_interval": 3600.0}  # checkpoints only when a test takes them


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        event_type=EventType.READ_RECORD,
        active_participant_user_id=f"urn:dmp:practitioner:{DOCTOR}",
        participant_object_patient_ins=PATIENT,
        participant_object_record_ids=(f"rec-{i}",),
        purpose_of_use="EMERGENCY" if i == 5 else "CARE",
        request_id=f"req-{i}",
    )


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dmp")
    sub = parser.add_subparsers(dest="command", required=True)
    audit_cli.register(sub)
    args = parser.parse_args(["audit", *argv])
    result: int = args.handler(args)
    return result


@dataclass
class Setup:
    pki_dir: Path
    node_db: str
    directory_db: str
    directory: RunningDirectory
    stack: ExitStack

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.directory.port}"

    def start_node(self, **kwargs: object) -> RunningNode:
        return self.stack.enter_context(
            running_node(
                self.pki_dir, "11", self.node_db, directory=self.address, **{**QUIET, **kwargs}
            )
        )

    def witnessed_sizes(self) -> list[int]:
        engine = make_engine(self.directory_db)
        try:
            return [w.head.tree_size for w in list_witnessed(engine, directory_witnessed, NODE)]
        finally:
            engine.dispose()

    def sql(self, *statements: str) -> None:
        """Rewrite the node's database with plain SQL and no key."""
        engine = make_engine(self.node_db)
        try:
            with engine.begin() as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            engine.dispose()

    def verify(self, *extra: str) -> int:
        return _cli("verify", "--db", self.node_db, "--pki", str(self.pki_dir), *extra)

    def online(self) -> tuple[str, ...]:
        return ("--witness", self.address, "--as", "node-11")


@pytest.fixture
def setup(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[Setup]:
    node_db, directory_db = db_factory("node"), db_factory("directory")
    with ExitStack() as stack:
        directory = stack.enter_context(running_directory(pki_dir, directory_db, **QUIET))
        yield Setup(pki_dir, node_db, directory_db, directory, stack)


def _write_and_witness(node: RunningNode, first: int, last: int, every: int = 10) -> None:
    """Events first..last at the node, a checkpoint every `every`, each sent to the witness."""
    assert node.audit is not None and node.witness_publisher is not None
    for i in range(first, last + 1):
        node.audit.record(_event(i))
        if i % every == 0:
            assert node.audit.checkpoint() is not None
            assert node.witness_publisher.push_once()


def _stopped_with_30_witnessed(setup: Setup) -> int:
    """A node that wrote 30 events in three witnessed checkpoints, then stopped. Returns
    the size of the latest head the directory witnessed (the checkpoint at shutdown)."""
    with ExitStack() as stack:
        node = stack.enter_context(
            running_node(setup.pki_dir, "11", setup.node_db, directory=setup.address, **QUIET)
        )
        _write_and_witness(node, 1, 30)
    sizes = setup.witnessed_sizes()
    assert sizes[:3] == [10, 20, 30]
    return sizes[-1]


def test_an_honest_log_verifies_against_its_witness(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    latest = _stopped_with_30_witnessed(setup)
    node = setup.start_node()  # the start-up comparison passes
    _write_and_witness(node, 31, 40)
    assert node.witness_publisher is not None
    assert node.witness_publisher.witnessed_size("the directory") >= 40 > latest
    capsys.readouterr()
    assert setup.verify(*setup.online()) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: the audit log of {NODE} verifies")
    assert "it matches the" in out and "heads its witness kept" in out
    exported = tmp_path / "witnessed.jsonl"
    assert (
        _cli(
            "witnessed",
            "export",
            "--signer",
            NODE,
            "--db",
            setup.directory_db,
            "--output",
            str(exported),
        )
        == 0
    )
    assert setup.verify("--witnessed", str(exported)) == 0


def _attack_tail(setup: Setup) -> None:
    setup.sql(
        "DELETE FROM audit_events WHERE seq > 20",
        "DELETE FROM audit_checkpoints WHERE tree_size > 20",
    )


def _attack_rewrite(setup: Setup) -> None:
    """Drop every checkpoint, remove the emergency access (seq 5), renumber the events
    after it and recompute their leaf hashes: a log that verifies on its own."""
    engine = make_engine(setup.node_db)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_checkpoints"))
            conn.execute(text("DELETE FROM audit_events WHERE seq = 5"))
            rows = conn.execute(
                text("SELECT seq, event_json FROM audit_events WHERE seq > 5 ORDER BY seq")
            ).all()
            for seq, event_json in rows:
                conn.execute(
                    text("UPDATE audit_events SET seq = :new, leaf_hash = :leaf WHERE seq = :old"),
                    {
                        "new": seq - 1,
                        "old": seq,
                        "leaf": event_leaf_hash(seq - 1, event_json.encode()),
                    },
                )
    finally:
        engine.dispose()


@pytest.mark.parametrize("attack", [_attack_tail, _attack_rewrite], ids=["tail", "rewrite"])
def test_a_rewritten_log_fails_verify_against_its_witness(
    setup: Setup,
    attack: Callable[[Setup], None],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    latest = _stopped_with_30_witnessed(setup)
    exported = tmp_path / "witnessed.jsonl"
    assert (
        _cli(
            "witnessed",
            "export",
            "--signer",
            NODE,
            *setup.online(),
            "--pki",
            str(setup.pki_dir),
            "--output",
            str(exported),
        )
        == 0
    )
    attack(setup)
    capsys.readouterr()
    assert setup.verify() == 0  # on its own, the rewritten log still verifies: the weakness
    assert capsys.readouterr().out.startswith("OK: ")
    for witness in (setup.online(), ("--witnessed", str(exported))):
        assert setup.verify(*witness) == 1
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"FAILED: the audit log of {NODE} does not match the")
        assert "checkpoint-missing at seq 30: the head of 30 events" in "\n".join(lines)
        if attack is _attack_tail:
            assert (
                f"truncated at seq 21: the log ends at seq 20 but {DIRECTORY} witnessed"
                in (lines[1])
            )
            assert f"events 21..{latest} were removed" in lines[1]
        else:
            assert lines[1].startswith("inconsistent at seq 10: events 1..10 do not make")


@pytest.mark.parametrize("attack", [_attack_tail, _attack_rewrite], ids=["tail", "rewrite"])
def test_a_node_missing_witnessed_events_refuses_to_serve(
    setup: Setup, attack: Callable[[Setup], None], caplog: pytest.LogCaptureFixture
) -> None:
    latest = _stopped_with_30_witnessed(setup)
    attack(setup)
    held = 20 if attack is _attack_tail else latest - 1
    with pytest.raises(FailedPrecondition) as refused:
        setup.start_node()
    message = refused.value.message
    assert message.startswith(f"refusing to serve: the audit log holds {held} events but")
    assert f"witnessed a head of {latest} events signed by {NODE}" in message
    assert f"events {held + 1}..{latest} are missing" in message or (
        f"event {latest} is missing" in message
    )
    assert "--accept-missing-audit" in message
    # The operator may still serve, told what is missing.
    caplog.set_level(logging.ERROR, logger="dmp.node")
    node = setup.start_node(accept_missing_audit=True)
    assert node.port > 0
    assert any("serving anyway" in r.getMessage() for r in caplog.records)


def test_a_node_whose_events_were_changed_refuses_to_serve(setup: Setup) -> None:
    _stopped_with_30_witnessed(setup)
    engine = make_engine(setup.node_db)
    try:
        with engine.begin() as conn:
            event_json = conn.execute(text("SELECT event_json FROM audit_events WHERE seq = 5"))
            forged = event_json.scalar_one().replace("EMERGENCY", "CARE")
            conn.execute(
                text("UPDATE audit_events SET event_json = :j, leaf_hash = :h WHERE seq = 5"),
                {"j": forged, "h": event_leaf_hash(5, forged.encode())},
            )
    finally:
        engine.dispose()
    with pytest.raises(FailedPrecondition, match="do not hash to the root of the head"):
        setup.start_node()


def test_a_node_starts_without_its_witness_and_delivers_later(
    pki_dir: Path, db_factory: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    directory_db = db_factory("directory")
    with running_directory(pki_dir, directory_db, **QUIET) as directory:
        port = directory.port
    caplog.set_level(logging.WARNING)
    address = f"127.0.0.1:{port}"
    with running_node(pki_dir, "11", db_factory("node"), directory=address, **QUIET) as node:
        assert any("starting without comparing" in r.getMessage() for r in caplog.records)
        assert node.audit is not None and node.witness_publisher is not None
        for i in range(1, 8):
            node.audit.record(_event(i))
        assert node.audit.checkpoint() is not None
        assert not node.witness_publisher.push_once(timeout=2.0)
        node.audit.record(_event(8))
        assert node.audit.checkpoint() is not None
        with running_directory(pki_dir, directory_db, listen=address, **QUIET):
            assert node.witness_publisher.push_once(wait_for_ready=True)
            assert node.witness_publisher.witnessed_size("the directory") == 8
    engine = make_engine(directory_db)
    try:
        # A witness new to the node gets its latest head, then each one after it.
        assert [w.head.tree_size for w in list_witnessed(engine, directory_witnessed, NODE)] == [8]
    finally:
        engine.dispose()


def test_the_directory_s_heads_are_witnessed_by_the_nodes(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    node = setup.start_node()
    log = setup.directory.audit
    publisher = setup.directory.witness_publisher
    assert publisher is not None
    for i in range(1, 6):
        log.record(_event(i))
    wait_for(lambda: "node 11" in _routes(setup), "the directory to route to node 11")
    first = log.checkpoint()
    assert first is not None
    assert publisher.push_once()
    log.record(_event(6))
    second = log.checkpoint()
    assert second is not None and publisher.push_once()
    engine = make_engine(setup.node_db)
    try:
        held = [w.head.tree_size for w in list_witnessed(engine, node_witnessed, DIRECTORY)]
    finally:
        engine.dispose()
    assert held == [first.tree_size, second.tree_size]
    capsys.readouterr()
    assert (
        _cli(
            "verify",
            "--db",
            setup.directory_db,
            "--pki",
            str(setup.pki_dir),
            "--witness",
            f"127.0.0.1:{node.port}",
            "--as",
            "directory",
        )
        == 0
    )
    assert "heads its witness kept" in capsys.readouterr().out


def _routes(setup: Setup) -> set[str]:
    return {f"node {r}" for r, route in setup.directory.discovery.routes().items() if route.healthy}


def test_the_witness_refuses_foreign_smaller_and_inconsistent_heads(setup: Setup) -> None:
    node = setup.start_node()
    _write_and_witness(node, 1, 20)
    node11 = load_credentials(setup.pki_dir, "node-11")
    assert node.audit is not None
    engine = make_engine(setup.node_db)
    setup.stack.callback(engine.dispose)
    subtrees = LeafSubtrees(engine, node.audit.events_table)
    root10, root20 = subtrees.root(10), subtrees.root(20)
    stubs = {}
    for identity in ("node-11", "node-53", f"patient-{PATIENT}", "directory"):
        c = client(setup.pki_dir, identity, setup.directory.port)
        setup.stack.callback(c.close)
        stubs[identity] = witness_pb2_grpc.WitnessServiceStub(c.channel)

    def send(identity: str, head: wpb.SignedTreeHead, start: int, proof: list[bytes]) -> None:
        stubs[identity].WitnessTreeHead(
            wpb.WitnessTreeHeadRequest(head=head, proof_from_size=start, consistency_proof=proof)
        )

    def refused(code: grpc.StatusCode, words: str, *args: object) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            send(*args)  # type: ignore[arg-type]
        assert caught.value.code() == code, caught.value.details()
        assert words in (caught.value.details() or "")

    again = head_to_proto(sign_checkpoint(node11, 20, root20))
    refused(
        grpc.StatusCode.PERMISSION_DENIED, "only the heads of its own", "node-53", again, 20, []
    )
    refused(grpc.StatusCode.PERMISSION_DENIED, "of the node identities", "directory", again, 0, [])
    smaller = head_to_proto(sign_checkpoint(node11, 15, subtrees.root(15)))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "never shrinks", "node-11", smaller, 20, [])
    forked = head_to_proto(sign_checkpoint(node11, 10, root20))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "was rewritten", "node-11", forked, 20, [])
    node.audit.record(_event(21))
    root21 = subtrees.root(21)
    bogus = [root10]
    grown = head_to_proto(sign_checkpoint(node11, 21, root21))
    refused(grpc.StatusCode.FAILED_PRECONDITION, "not consistent with", "node-11", grown, 20, bogus)
    refused(grpc.StatusCode.FAILED_PRECONDITION, "send a proof from 20", "node-11", grown, 10, [])
    unsigned = wpb.SignedTreeHead()
    unsigned.CopyFrom(grown)
    unsigned.signature = b"x"
    refused(grpc.StatusCode.INVALID_ARGUMENT, "does not verify", "node-11", unsigned, 20, [])
    send("node-11", grown, 20, subtrees.consistency(20, 21))  # the right proof is accepted
    send("node-11", again, 20, [])  # an old head sent again is harmless
    with pytest.raises(grpc.RpcError) as caught:
        stubs[f"patient-{PATIENT}"].ListWitnessedTreeHeads(
            wpb.ListWitnessedTreeHeadsRequest(signer=NODE)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Every witness call is in the directory's audit log, refusals included.
    events = _directory_events(setup.directory_db)
    witnessed = [e for e in events if "witness the audit head of urn:dmp:node:11" in e]
    assert any('"status_code":"PERMISSION_DENIED"' in e for e in witnessed)
    assert any('"status_code":"FAILED_PRECONDITION"' in e for e in witnessed)
    assert any('"status_code":"OK"' in e for e in witnessed)


def _directory_events(db: str) -> list[str]:
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(text("SELECT event_json FROM audit_events"))]
    finally:
        engine.dispose()


def test_a_checkpoint_every_n_events(db_url: str, pki_dir: Path) -> None:
    metadata = new_metadata()
    events, checkpoints = audit_tables(metadata)
    engine = make_engine(db_url)
    metadata.create_all(engine)
    node11 = load_credentials(pki_dir, "node-11")
    log = AuditLog(
        engine,
        events,
        checkpoints,
        source_id=NODE,
        signer=node11,
        checkpoint_interval=3600,
        checkpoint_every=5,
    )
    signed: list[int] = []
    done = threading.Event()

    def on_checkpoint(checkpoint: object) -> None:
        signed.append(checkpoint.tree_size)  # type: ignore[attr-defined]
        done.set()

    log.on_checkpoint.append(on_checkpoint)
    log.start()
    try:
        for i in range(1, 5):
            log.record(_event(i))
        assert not signed
        log.record(_event(5))
        assert done.wait(30)
        assert signed == [5]
        done.clear()
        # Events appended in a writer's own transaction count once it commits.
        with Session(writer(engine)) as session, session.begin():
            log.append_many(session, [_event(i) for i in range(6, 11)])
        assert done.wait(30)
        assert signed == [5, 10]
    finally:
        log.close()
        engine.dispose()


def test_the_checkpoint_signed_at_shutdown_is_witnessed(setup: Setup) -> None:
    with running_node(setup.pki_dir, "11", setup.node_db, directory=setup.address, **QUIET) as node:
        assert node.audit is not None
        for i in range(1, 4):
            node.audit.record(_event(i))
    assert setup.witnessed_sizes() == [3]


def test_dmp_node_serve_refuses_in_one_line(setup: Setup) -> None:
    _stopped_with_30_witnessed(setup)
    _attack_tail(setup)
    serve = ("node", "serve", "--pki", str(setup.pki_dir), "--region", "11")
    process = dmp_process(*serve, "--db", setup.node_db, "--directory", setup.address)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "listening on" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("dmp: refusing to serve: the audit log holds 20 events but")
    assert "events 21..30 are missing" in last and "--accept-missing-audit" in last

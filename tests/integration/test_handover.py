"""A region handed over to a successor host, end to end on real processes: the directory,
the predecessor A and the successor B, over mutual TLS, with writers and readers running
throughout, on SQLite and PostgreSQL (A on one, B on the other)."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from dmp.cli.main import main
from dmp.client import DirectoryClient, NodeClient
from dmp.pki import load_credentials
from dmp.server import error_metadata, error_reason
from tests.fake_consul import FakeConsul
from tests.federation import DOCTOR, draft
from tests.handover_rig import (
    REGION,
    Hosts,
    Reader,
    Server,
    Writer,
    handover_cli,
    read_back,
    until,
)


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _kek(path: Path) -> str:
    assert main(["node", "init-kek", str(path)]) == 0
    return str(path)


@pytest.mark.parametrize(
    ("backends", "discovery"),
    [
        ("sqlite-to-postgresql", "embedded"),
        ("postgresql-to-sqlite", "embedded"),
        ("postgresql-to-sqlite", "consul"),
    ],
)
def test_region_handed_over_while_writers_and_readers_run(
    backends: str, discovery: str, tmp_path: Path, postgres_db_url: str
) -> None:
    with ExitStack() as stack:
        consul = (
            ["--consul", stack.enter_context(FakeConsul()).url] if discovery == "consul" else []
        )
        _handover_end_to_end(backends, consul, tmp_path, postgres_db_url)


def _handover_end_to_end(
    backends: str, consul: list[str], tmp_path: Path, postgres_db_url: str
) -> None:
    hosts = Hosts.make(tmp_path)
    a_url, b_url = f"sqlite:///{tmp_path / 'a.db'}", postgres_db_url
    if backends == "postgresql-to-sqlite":
        a_url, b_url = postgres_db_url, f"sqlite:///{tmp_path / 'b.db'}"
    directory = Server(
        tmp_path / "directory.log",
        "directory", "serve", "--pki", str(hosts.national),
        "--db", f"sqlite:///{tmp_path / 'directory.db'}", *consul,
    )  # fmt: skip
    servers = [directory]
    try:
        d_addr = directory.address()
        a = Server(
            tmp_path / "a.log",
            "node", "serve", "--pki", str(hosts.a), "--region", REGION, "--db", a_url,
            "--directory", d_addr, "--kek-file", _kek(tmp_path / "a.kek"), *consul,
        )  # fmt: skip
        servers.append(a)
        a_addr = a.address()
        writers = [Writer(f"w{i}", hosts.national, a_addr).start() for i in range(3)]
        until(lambda: all(w.acked for w in writers), "the first writes at A")
        reader = Reader(hosts.national, d_addr).start()
        until(lambda: any(reader.outcomes), "a view answered by region 53 through A")

        assert handover_cli("start", hosts.a, a_url, "--to", str(hosts.b / "node-53.pem")) == 0
        b_addr = free_address()
        b = Server(
            tmp_path / "b.log",
            "node", "serve", "--pki", str(hosts.b), "--region", REGION, "--db", b_url,
            "--directory", d_addr, "--kek-file", _kek(tmp_path / "b.kek"),
            "--listen", b_addr, "--successor-of", a_addr, *consul,
        )  # fmt: skip
        servers.append(b)
        b.wait_line("hand-over: changes")  # the snapshot is in; changes follow
        before_complete = len(reader.outcomes)
        acked_before = sum(len(w.acked) for w in writers)
        assert handover_cli("complete", hosts.a, a_url) == 0
        assert b.address() == b_addr
        until(
            lambda: all(w.address == b_addr and len(w.acked) > 2 for w in writers),
            "every writer acknowledged by B",
        )
        after = len(reader.outcomes)
        until(lambda: len(reader.outcomes) > after and reader.outcomes[-1], "a view through B")
        first_ok_after = next(i for i in range(after, len(reader.outcomes)) if reader.outcomes[i])
        until(lambda: len(reader.outcomes) > first_ok_after + 20, "more views through B")
        for w in writers:
            w.stop()
        reader.stop()

        # Views failed only while the region moved: none before `complete`, none after
        # the first one B answered.
        assert all(reader.outcomes[:before_complete])
        assert all(reader.outcomes[first_ok_after:])
        acked = [item for w in writers for item in w.acked]
        assert not [e for w in writers for e in w.errors]
        assert len(acked) > acked_before
        assert {item.at for item in acked} == {a_addr, b_addr}
        assert read_back(hosts.national, b_addr, acked) == []

        # A points every caller to B; once revoked, its certificate opens nothing.
        doctor = load_credentials(hosts.national, f"practitioner-{DOCTOR}")
        with NodeClient(a_addr, doctor) as c, pytest.raises(grpc.RpcError) as refused:
            c.put_record(draft(record_id="late"), b"late")
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert error_reason(refused.value) == "REGION_MOVED"
        assert error_metadata(refused.value)["successor"] == b_addr
        hosts.revoke_predecessor()
        as_a = load_credentials(hosts.a, f"node-{REGION}")

        def a_refused() -> bool:  # the directory re-reads its CRL within a second
            with DirectoryClient(d_addr, as_a) as c:
                try:
                    c.list_nodes()
                except grpc.RpcError as exc:
                    return exc.code() is grpc.StatusCode.UNAUTHENTICATED
            return False

        until(a_refused, "the directory refusing A's revoked certificate")

        with DirectoryClient(d_addr, load_credentials(hosts.national, "directory")) as dc:
            nodes = {n.region: n for n in dc.list_nodes()}
        assert nodes[REGION].address == b_addr
    finally:
        for server in reversed(servers):
            server.stop()
    assert main(["audit", "verify", "--pki", str(hosts.b), "--db", b_url]) == 0

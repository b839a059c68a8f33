"""The files a node and the directory keep: private to their user, and never a damaged one
taken for a new one."""

from __future__ import annotations

import configparser
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmp.demo import start_federation
from dmp.v1 import node_service_pb2 as npb
from tests.federation import DOCTOR, client, draft, wait_for, wait_listening

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _serve(*args: str) -> subprocess.Popen[str]:
    """`dmp ARGS` in its own process, started from a shell whose umask is the usual 022."""
    return subprocess.Popen(
        [sys.executable, "-m", "dmp.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        umask=0o022,
    )


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it has not gone after 30 s (its shutdown is not tested here)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=10)


@pytest.fixture
def served(pki_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A directory and node 11 as operators start them, each with its default data dir."""
    directory_data, node_data = tmp_path / "directory-data", tmp_path / "node-data"
    directory = _serve(
        "directory", "serve", "--pki", str(pki_dir), "--data-dir", str(directory_data)
    )
    processes = [directory]
    try:
        directory_address = wait_listening(directory)
        node = _serve(
            "node", "serve", "--pki", str(pki_dir), "--region", "11",
            "--data-dir", str(node_data), "--directory", directory_address,
        )  # fmt: skip
        processes.append(node)
        port = int(wait_listening(node).rsplit(":", 1)[1])
        c = client(pki_dir, f"practitioner-{DOCTOR}", port)
        try:
            c.node.PutRecord(
                npb.PutRecordRequest(record=draft(record_id="private"), content=b"x"), timeout=10
            )
        finally:
            c.close()
        # The locator outbox has reached the directory: both databases have been written.
        wait_for(
            lambda: (
                (directory_data / "directory.db-wal").is_file()
                and (directory_data / "directory.db-wal").stat().st_size > 0
            ),
            "the directory's write",
        )
        yield directory_data, node_data
    finally:
        for process in reversed(processes):
            _stop(process)


def test_databases_and_their_wal_are_private_to_the_service(served: tuple[Path, Path]) -> None:
    directory_data, node_data = served
    for data, db in ((node_data, "node-11.db"), (directory_data, "directory.db")):
        assert _mode(data) == 0o700, data
        for name in (db, f"{db}-wal", f"{db}-shm"):
            assert (data / name).is_file(), name
            assert _mode(data / name) == 0o600, name
        assert {p.name for p in data.iterdir()} == {db, f"{db}-wal", f"{db}-shm"}


def test_an_existing_world_readable_database_is_made_private(pki_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "data" / "node-11.db"
    first = _serve(
        "node", "serve", "--pki", str(pki_dir), "--region", "11", "--data-dir", str(db.parent)
    )
    wait_listening(first)
    _stop(first)
    # As an earlier version left them.
    for path in (db.parent / "node-11.db", db.parent / "node-11.db-wal"):
        if path.exists():
            path.chmod(0o644)
    again = _serve(
        "node", "serve", "--pki", str(pki_dir), "--region", "11", "--data-dir", str(db.parent)
    )
    try:
        wait_listening(again)
        assert _mode(db) == 0o600
        assert _mode(db.parent / "node-11.db-wal") == 0o600
    finally:
        _stop(again)


def test_demo_logs_are_private(pki_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    start_federation(workdir, pki_dir, ["11"]).stop()
    for directory in (workdir / "logs", workdir / "data"):
        assert _mode(directory) == 0o700, directory
    logs = sorted((workdir / "logs").iterdir())
    assert [p.name for p in logs] == ["directory.log", "node-11.log"]
    for log in logs:
        assert _mode(log) == 0o600, log
    # Its nodes are encrypted at rest: each KEK private, apart from the databases.
    assert _mode(workdir / "keys") == 0o700
    (kek,) = (workdir / "keys").iterdir()
    assert kek.name == "node-11.kek" and _mode(kek) == 0o600 and kek.stat().st_size == 32


def test_systemd_units_keep_files_private() -> None:
    for unit in ("dmp-node@.service", "dmp-directory.service"):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(DEPLOY / unit)
        service = parser["Service"]
        assert service.get("UMask") == "0077", unit
        assert service.get("StateDirectoryMode") == "0700", unit
    node = configparser.ConfigParser(interpolation=None, strict=False)
    node.read(DEPLOY / "dmp-node@.service")
    assert node["Service"]["LoadCredential"].startswith("kek:")
    assert "--kek-file ${CREDENTIALS_DIRECTORY}/kek" in node["Service"]["ExecStart"]


@pytest.mark.parametrize("service", ["node", "directory"])
def test_an_existing_empty_database_file_is_refused_unless_told_to_initialise(
    pki_dir: Path, tmp_path: Path, service: str
) -> None:
    empty = tmp_path / "damaged.db"
    empty.touch()
    serve = ["node", "serve", "--region", "11"] if service == "node" else ["directory", "serve"]
    args = [*serve, "--pki", str(pki_dir), "--db", f"sqlite:///{empty}"]
    process = _serve(*args)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on" not in line, f"the {service} served an empty database file"
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 1
    assert err.count("\n") == 1 and err.startswith("dmp: "), err
    assert str(empty) in err and "empty" in err and "--initialise" in err
    assert empty.stat().st_size == 0
    assert not Path(f"{empty}-wal").exists()

    initialised = _serve(*args, "--initialise")
    try:
        wait_listening(initialised)
        assert empty.stat().st_size > 0
    finally:
        _stop(initialised)

    # Once it holds a schema, the flag is not needed (and --initialise never erases).
    again = _serve(*args)
    try:
        wait_listening(again)
    finally:
        _stop(again)
    assert os.path.getsize(empty) > 0

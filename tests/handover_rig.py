"""A hand-over as the three operators run it, for tests: the national operator's PKI
(the predecessor's certificate, then the successor's, each host with its own directory),
server processes with their output kept, writers that follow REGION_MOVING and
REGION_MOVED as a professional's software would, and readers of the consolidated view."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from dmp.cli.main import main
from dmp.client import DirectoryClient, NodeClient, view_request
from dmp.pki import load_credentials
from dmp.server import error_metadata, error_reason
from dmp.v1 import directory_service_pb2 as dpb
from tests.federation import DOCTOR, PATIENT, draft, identity_of, make_pki, wait_for

REGION = "53"


@dataclass
class Hosts:
    """The national operator's PKI and each host's copy: `a` holds the predecessor's
    node certificate, `b` the successor's (issued after, same region, same CA)."""

    national: Path
    a: Path
    b: Path

    @classmethod
    def make(cls, root: Path) -> Hosts:
        national = root / "national"
        pki = make_pki(national)
        a = root / "host-a"
        shutil.copytree(national, a)
        pki.issue_node(REGION)
        b = root / "host-b"
        shutil.copytree(national, b)
        return cls(national, a, b)

    def revoke_predecessor(self) -> None:
        """The national operator revokes the predecessor's certificate (a kept copy)."""
        assert main(["pki", "revoke", "--cert", str(self.a / f"node-{REGION}.pem"),
                     "--pki", str(self.national)]) == 0  # fmt: skip
        for host in (self.a, self.b):
            shutil.copy(self.national / "crl.pem", host / "crl.pem")


class Server:
    """`dmp ARGS` as its own process: stdout lines collected, stderr into a file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self._err = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmp.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(
            f"no line with {text!r} from {self.log.stem}: {self.lines}"
            f" {self.log.read_text()[-3000:]}"
        )

    def address(self) -> str:
        return self.wait_line("listening on").rsplit(" ", 1)[1]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._err.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._err.close()
        return self.process.returncode


def handover_cli(step: str, pki: Path, db: str, *extra: str) -> int:
    return main(["node", "handover", step, "--pki", str(pki), "--region", REGION, "--db", db,
                 *extra])  # fmt: skip


@dataclass
class Acked:
    record_id: str
    sha256: str
    content: bytes
    at: str


@dataclass
class Writer:
    """A professional's software writing records one by one: on REGION_MOVING it waits the
    retry delay and sends the same record again; on REGION_MOVED it calls the successor."""

    name: str
    pki: Path
    address: str
    acked: list[Acked] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    moving: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Writer:
        self._thread = threading.Thread(target=self._run, name=f"writer-{self.name}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def _client(self, address: str) -> NodeClient:
        return NodeClient(address, load_credentials(self.pki, f"practitioner-{DOCTOR}"))

    def _run(self) -> None:
        client = self._client(self.address)
        number = 0
        try:
            while not self._stop.is_set():
                number += 1
                record_id = f"{self.name}-{number}"
                content = os.urandom(64) + record_id.encode()
                while True:
                    try:
                        stored = client.put_record(
                            draft(record_id=record_id, title=f"note {record_id}"),
                            content,
                            patient=identity_of(PATIENT),
                            timeout=30,
                        )
                    except grpc.RpcError as exc:
                        reason = error_reason(exc)
                        if exc.code() is grpc.StatusCode.UNAVAILABLE and reason == "REGION_MOVED":
                            successor = error_metadata(exc)["successor"]
                            client.close()
                            client = self._client(successor)
                            self.address = successor
                            continue
                        if exc.code() is grpc.StatusCode.UNAVAILABLE:
                            self.moving += reason == "REGION_MOVING"
                            time.sleep(0.2)
                            continue
                        self.errors.append(f"{record_id}: {exc.code().name} {exc.details()}")
                        break
                    self.acked.append(Acked(record_id, stored.sha256, content, self.address))
                    break
                time.sleep(0.01)
        finally:
            client.close()


@dataclass
class Reader:
    """Consolidated views through the directory, each noted as answered by region 53 or
    not, in order."""

    pki: Path
    directory: str
    outcomes: list[bool] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, name="reader")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        client = DirectoryClient(
            self.directory, load_credentials(self.pki, f"practitioner-{DOCTOR}")
        )
        try:
            while not self._stop.is_set():
                try:
                    view = client.view(view_request(PATIENT), limit=1)
                    status = view.regions.get(REGION)
                    self.outcomes.append(
                        status is not None and status.state == dpb.REGION_STATE_ANSWERED
                    )
                except grpc.RpcError:
                    self.outcomes.append(False)
                time.sleep(0.05)
        finally:
            client.close()


def read_back(pki: Path, address: str, acked: list[Acked]) -> list[str]:
    """What differs at `address` from what the writers were acknowledged: [] when every
    record is there with the same SHA-256 and the same content bytes."""
    problems = []
    with NodeClient(address, load_credentials(pki, f"practitioner-{DOCTOR}")) as client:
        for item in acked:
            try:
                record = client.get_record(item.record_id, PATIENT)
                content = b"".join(part.chunk for part in client.content(item.record_id, PATIENT))
            except grpc.RpcError as exc:
                problems.append(f"{item.record_id}: {exc.code().name} {exc.details()}")
                continue
            if record.sha256 != item.sha256 or content != item.content:
                problems.append(f"{item.record_id}: differs")
            elif hashlib.sha256(content).hexdigest() != record.sha256:
                problems.append(f"{item.record_id}: content does not match its hash")
    return problems


def until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """`wait_for` with room for a loaded machine: hand-overs run several processes."""
    wait_for(condition, what, timeout)

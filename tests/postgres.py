"""A throwaway PostgreSQL cluster for tests and benchmarks (no pytest dependency).

    cluster = PostgresCluster()
    cluster.start()                      # initdb in a temp dir, pg_ctl start on a free port
    url = cluster.url()                  # postgresql+psycopg://USER@127.0.0.1:PORT/postgres
    cluster.create_database("test_x")    # then cluster.url("test_x")
    cluster.drop_database("test_x")
    cluster.stop()                       # pg_ctl -m immediate stop, directory removed

PostgreSQL refuses to run as root: when the current user is root the cluster runs as the
`postgres` system user (created if missing) through `runuser`, in a directory it owns.

A crashed process must not leave a server behind: `stop` is registered with atexit, and a
small watchdog process (which outlives a kill -9 or an os._exit of its parent) stops the
server and removes its directory as soon as its parent is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

SYSTEM_USER = "postgres"
"""The system user the cluster runs as when the current user is root."""

MISSING_BINARIES = "PostgreSQL binaries (initdb/pg_ctl) not found: PostgreSQL-backed tests skipped"

_START_ATTEMPTS = 5

# Runs in its own session: blocks on a pipe whose write end only the parent holds, so it
# wakes up when the parent exits however it exits, then stops the server if still there.
_WATCHDOG = """
import os, shutil, subprocess, sys, json
fd, base, stop = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
while True:
    try:
        if not os.read(fd, 64):
            break
    except InterruptedError:
        continue
if os.path.isdir(base):
    subprocess.run(stop, cwd=base, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=60)
    shutil.rmtree(base, ignore_errors=True)
"""


@dataclass(frozen=True)
class PostgresBinaries:
    """Where initdb, pg_ctl and postgres live."""

    initdb: Path
    pg_ctl: Path
    postgres: Path


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_binaries() -> PostgresBinaries | None:
    """initdb, pg_ctl and postgres from PATH, else from the newest /usr/lib/postgresql/*/bin."""
    found = [shutil.which(name) for name in ("initdb", "pg_ctl", "postgres")]
    if all(found):
        initdb, pg_ctl, postgres = (Path(p) for p in found if p is not None)
        return PostgresBinaries(initdb, pg_ctl, postgres)
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        paths = [Path(bindir) / name for name in ("initdb", "pg_ctl", "postgres")]
        if all(os.access(p, os.X_OK) for p in paths):
            return PostgresBinaries(*paths)
    return None


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _traversable_by_others(path: Path) -> bool:
    """Whether every directory from / down to path can be crossed by another user."""
    for directory in (path, *path.parents):
        try:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


class PostgresError(RuntimeError):
    """The cluster could not be created, started or used."""


class PostgresCluster:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only.

    Trust authentication, fsync off: for tests and benchmarks, never for data.
    """

    def __init__(
        self,
        binaries: PostgresBinaries | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        found = binaries or find_binaries()
        if found is None:
            raise PostgresError(MISSING_BINARIES)
        self.binaries = found
        self.settings = dict(settings or {})
        self._base_dir = base_dir
        self.as_root = os.geteuid() == 0
        self.user = SYSTEM_USER if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        self.host = "127.0.0.1"
        self.port = 0
        self.base: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_fd: int | None = None

    # -- paths -------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base() / "sock"

    @property
    def log_file(self) -> Path:
        return self._base() / "postgres.log"

    @property
    def running(self) -> bool:
        return self.base is not None and self.port != 0

    def _base(self) -> Path:
        if self.base is None:
            raise PostgresError("the cluster is not started")
        return self.base

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> PostgresCluster:
        """initdb, then start the server on a free port (a few ports are tried)."""
        if self.base is not None:
            raise PostgresError("the cluster is already started")
        self.base = self._make_base()
        atexit.register(self.stop)
        try:
            self._start_watchdog()
            self.socket_dir.mkdir()
            if self.as_root:
                owner = _ensure_system_user(SYSTEM_USER)
                for path in (self.base, self.socket_dir):
                    os.chown(path, owner.pw_uid, owner.pw_gid)
            self._run(
                [
                    str(self.binaries.initdb),
                    "-D",
                    str(self.data_dir),
                    "-A",
                    "trust",
                    "-U",
                    self.user,
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ],
                "initdb",
            )
            self._start_server()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server at once (no checkpoint) and remove its directory. Idempotent."""
        atexit.unregister(self.stop)
        base, self.base = self.base, None
        self.port = 0
        if base is not None:
            if (base / "data" / "postmaster.pid").exists():
                subprocess.run(
                    self._stop_command(base),
                    cwd=base,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    check=False,
                    timeout=60,
                )
            shutil.rmtree(base, ignore_errors=True)
        if self._watchdog_fd is not None:
            os.close(self._watchdog_fd)
            self._watchdog_fd = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

    def __enter__(self) -> PostgresCluster:
        return self.start() if self.base is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of a database of this cluster (psycopg 3 driver)."""
        if not self.running:
            raise PostgresError("the cluster is not started")
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        """The libpq connection string of a database of this cluster."""
        if not self.running:
            raise PostgresError("the cluster is not started")
        return f"host={self.host} port={self.port} user={self.user} dbname={database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; return its SQLAlchemy URL."""
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE name, closing the connections still open on it."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def _admin(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.conninfo(), autocommit=True) as connection:
            connection.execute(statement)

    # -- internals ---------------------------------------------------------------------

    def _make_base(self) -> Path:
        parent = self._base_dir
        if parent is None and self.as_root:
            # The postgres user must be able to reach the directory.
            default = Path(tempfile.gettempdir())
            parent = default if _traversable_by_others(default) else Path("/tmp")
        return Path(tempfile.mkdtemp(prefix="dmp-pg-", dir=parent))

    def _as_user(self, command: Sequence[str]) -> list[str]:
        if self.as_root:
            return ["runuser", "-u", SYSTEM_USER, "--", *command]
        return list(command)

    def _stop_command(self, base: Path) -> list[str]:
        return self._as_user(
            [str(self.binaries.pg_ctl), "-D", str(base / "data"), "-m", "immediate", "-w", "stop"]
        )

    def _run(self, command: Sequence[str], what: str) -> None:
        result = subprocess.run(
            self._as_user(command),
            cwd=self._base(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{what} failed (exit {result.returncode}): {result.stderr.strip()}"
                f" {result.stdout.strip()}".strip()
            )

    def _server_options(self, port: int) -> str:
        options = {
            "listen_addresses": self.host,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **self.settings,
        }
        parts = ["-p", str(port), "-k", shlex.quote(str(self.socket_dir))]
        for key, value in options.items():
            parts += ["-c", shlex.quote(f"{key}={value}")]
        return " ".join(parts)

    def _start_server(self) -> None:
        errors: list[str] = []
        for _ in range(_START_ATTEMPTS):
            port = free_port()
            try:
                self._run(
                    [
                        str(self.binaries.pg_ctl),
                        "-D",
                        str(self.data_dir),
                        "-l",
                        str(self.log_file),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        self._server_options(port),
                        "start",
                    ],
                    "pg_ctl start",
                )
            except PostgresError as error:
                errors.append(f"port {port}: {error}")
                continue
            self.port = port
            return
        log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
        raise PostgresError(
            "PostgreSQL did not start: "
            + "; ".join(errors)
            + (f"\nserver log:\n{log}" if log else "")
        )

    def _start_watchdog(self) -> None:
        base = self._base()
        read_fd, write_fd = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WATCHDOG,
                    str(read_fd),
                    str(base),
                    json.dumps(self._stop_command(base)),
                ],
                pass_fds=(read_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._watchdog_fd = write_fd


def main() -> None:
    """Start a cluster, print its URL and wait for Ctrl-C (handy for manual checks)."""
    with PostgresCluster() as cluster:
        print(cluster.url(), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()

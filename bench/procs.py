"""Processes of the benchmark: servers in fresh processes, their memory from /proc.

Servers are never forked from the benchmark process (it holds gRPC channels): federation
servers start as `python -m dmp.cli.main ... serve` through dmp.demo.Service, the
benchmark's own helpers (trivial servers, delaying proxy, load clients) as
`python -m bench.<module>`, both through subprocess (fork + exec at once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Protocol

MiB = 1024 * 1024


class Startable(Protocol):
    name: str

    def start(self, timeout: float = 30.0) -> str: ...

    def stop(self, timeout: float = 15.0) -> None: ...


class BenchError(Exception):
    """A benchmark step failed: one line saying which."""


def status_kib(pid: int, field: str) -> int | None:
    """A `VmXxx` field of /proc/<pid>/status in KiB (None if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss_mib(pid: int) -> float | None:
    kib = status_kib(pid, "VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM: the peak resident set size of the process so far."""
    kib = status_kib(pid, "VmHWM")
    return None if kib is None else kib / 1024


class RssSampler:
    """Samples a process's VmRSS in a thread while something runs; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[float] = []
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mib(self._pid)
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def maximum(self) -> float | None:
        return max(self.samples) if self.samples else None


class BenchProcess:
    """`python -m bench.<module> ARGS` in a fresh process that prints 'listening on ADDR'
    first (or 'ready'); stdin stays open for commands when `commands` is set."""

    def __init__(
        self, name: str, module: str, args: Sequence[str], log_path: Path, *, commands: bool = False
    ) -> None:
        self.name = name
        self.module = module
        self.args = list(args)
        self.log_path = log_path
        self.commands = commands
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self._log: IO[str] | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def start(self, timeout: float = 30.0) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.PIPE if self.commands else subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        line = self.read_line()
        if "listening on" in line:
            self.address = line.rsplit(" ", 1)[1].strip()
        elif line.strip() != "ready":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
            raise BenchError(f"{self.name} did not start ({line.strip()!r}): see {self.log_path}")
        return self.address

    def read_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        return self.process.stdout.readline()

    def command(self, line: str) -> str:
        """Send one command line, return the one-line answer."""
        with self._lock:
            assert self.process is not None and self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            answer = self.read_line().strip()
        if not answer or answer.startswith("error"):
            raise BenchError(f"{self.name}: {line!r} answered {answer!r}: see {self.log_path}")
        return answer

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def start_all(services: Iterable[Startable], workers: int = 4) -> None:
    """Start services in parallel (each start waits for its 'listening on' line); if one
    fails, stop those that started and raise."""
    items = list(services)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(_try_start, items))
    failures = [error for error in outcomes if error is not None]
    if failures:
        stop_all(items)
        raise failures[0]


def _try_start(service: Startable) -> BaseException | None:
    try:
        service.start()
    except BaseException as exc:  # reported by start_all
        return exc
    return None


def stop_all(services: Iterable[Startable], workers: int = 8) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_stop_quietly, list(services)))


def _stop_quietly(service: Startable) -> None:
    with contextlib.suppress(Exception):
        service.stop()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (/proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class CpuMeter:
    """CPU time (user + system) that groups of processes use over a stretch of work,
    per operation: counted work, independent of how the cores were shared."""

    def __init__(self, groups: dict[str, Sequence[int]], *, include_self: bool = True) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._include_self = include_self
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        totals = {
            name: sum(cpu_seconds(pid) or 0.0 for pid in pids)
            for name, pids in self._groups.items()
        }
        if self._include_self:
            times = os.times()
            totals["client"] = times.user + times.system
        return totals

    def start(self) -> None:
        self._start = self._now()

    def per_operation_ms(self, operations: int) -> dict[str, float]:
        end = self._now()
        return {
            name: round(1000.0 * (end[name] - self._start[name]) / max(operations, 1), 3)
            for name in end
        }

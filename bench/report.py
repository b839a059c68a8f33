"""What the benchmark prints and writes: progress, the machine, the table, the JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.stats import Figure, Results

_STARTED = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent

SECTION_TITLES = {
    "a": "a. consolidated view",
    "b": "b. transport floor",
    "c": "c. views under network delay",
    "d": "d. node ingest",
    "e": "e. directory at scale",
    "f": "f. peak memory during a",
    "g": "g. e-prescription dispensing",
    "h": "h. encryption at rest",
    "i": "i. backup and verify",
    "j": "j. hand-over to a successor host",
}


def say(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mib() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def postgres_version() -> str | None:
    from tests.postgres import find_binaries

    binaries = find_binaries()
    if binaries is None:
        return None
    try:
        result = subprocess.run(
            [str(binaries.postgres), "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def git_state() -> tuple[str | None, bool | None]:
    """The commit checked out and whether tracked files differ from it."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def machine() -> dict[str, Any]:
    """The machine and the versions the figures were measured with."""
    import grpc

    commit, dirty = git_state()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mib": _memory_mib(),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": _version("protobuf"),
        "sqlalchemy": _version("sqlalchemy"),
        "psycopg": _version("psycopg"),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": postgres_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    magnitude = abs(value)
    if magnitude >= 10_000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _status(figure: Figure) -> str:
    if figure.goal is None:
        return ""
    outcome = figure.goal.evaluate(figure.median)
    if outcome["met"] is None:
        return "?"
    if outcome["met"]:
        return "met"
    return f"MISSED by {_fmt(outcome['miss_by'])} {figure.unit} ({outcome['miss_by_pct']:.0f}%)"


def table(results: Results) -> str:
    """The figures as an aligned text table, by section."""
    header = ("figure", "median", "min .. max", "unit", "goal", "")
    lines: list[str] = []
    rows: list[tuple[str, ...]] = [header]
    sections: dict[str, list[Figure]] = {}
    for figure in results.figures:
        sections.setdefault(figure.section, []).append(figure)
    order = [s for s in SECTION_TITLES if s in sections] + [
        s for s in sections if s not in SECTION_TITLES
    ]
    section_rows: list[tuple[str, list[tuple[str, ...]]]] = []
    for section in order:
        body: list[tuple[str, ...]] = []
        for figure in sections[section]:
            spread = f"{_fmt(figure.low)} .. {_fmt(figure.high)}" if len(figure.values) > 1 else ""
            goal = figure.goal.text("").strip() if figure.goal else ""
            body.append(
                (
                    ("* " if figure.headline else "  ") + figure.label,
                    _fmt(figure.median),
                    spread,
                    figure.unit,
                    goal,
                    _status(figure),
                )
            )
        section_rows.append((SECTION_TITLES.get(section, section), body))
        rows.extend(body)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def render(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if i in (1, 2) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines.append(render(header))
    lines.append("-" * len(lines[0]))
    for title, body in section_rows:
        lines.append(title)
        lines.extend(render(row) for row in body)
    for section, error in results.errors.items():
        lines.append(f"section {section} FAILED: {error}")
    lines.append("(* headline figure; median of the runs, min .. max over the runs)")
    return "\n".join(lines)


def document(
    results: Results, machine_info: dict[str, Any], config: dict[str, Any], duration: float
) -> dict[str, Any]:
    figures = [figure.to_json() for figure in results.figures]
    goals = [f for f in figures if f["goal"] is not None]
    return {
        "schema": 1,
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "machine": machine_info,
        "config": config,
        "summary": {
            "goals": len(goals),
            "met": sum(1 for f in goals if f["met"] is True),
            "missed": [
                {
                    "key": f["key"],
                    "median": f["median"],
                    "goal": f["goal"]["text"],
                    "miss_by": f["miss_by"],
                    "miss_by_pct": f["miss_by_pct"],
                }
                for f in goals
                if f["met"] is False
            ],
        },
        "figures": figures,
        "details": results.details,
        "errors": results.errors,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    temporary.replace(path)

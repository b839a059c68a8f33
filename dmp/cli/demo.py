"""`dmp demo`: the whole federation on this machine, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "demo",
        help="run a demo federation: directory, three regions, synthetic patients",
        description="Create a PKI in a temporary directory, start the directory and three"
        " regional nodes as separate processes on free ports (SQLite), load synthetic"
        " patients spread over the regions, show a doctor's consolidated view, stop one"
        " region and show the partial answer, then shut everything down.",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the federation up (until Ctrl-C) and print the commands to query it",
    )
    parser.add_argument("--patients", type=int, default=20, help="synthetic patients (default 20)")
    parser.add_argument(
        "--per-region", type=int, default=4, help="records per patient and region (default 4)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep PKI, databases and logs here (default: a temp dir)"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from dmp.demo import DemoError, run_demo
    from dmp.prescription_demo import SceneError

    if args.patients < 1 or args.per_region < 1:
        raise SystemExit("dmp: --patients and --per-region must be at least 1")
    try:
        return run_demo(
            keep_running=args.keep_running,
            patients_count=args.patients,
            per_region=args.per_region,
            workdir=args.workdir,
        )
    except (DemoError, SceneError) as exc:
        raise SystemExit(f"dmp demo: {exc}") from None

"""Section h: the consolidated view with the nodes encrypted at rest, as a ratio to the
same view in clear, in the same run.

On the loaded federation (its nodes in clear, as sections a-g measure them): views in
clear, then every node stopped, its database encrypted in place by `dmp node encrypt`
(timed: records/s), restarted on the same address with its --kek-file, and the same views
again. The ratio of the p50s is the cost of opening the sealed metadata at each node.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.federation import BenchFederation
from bench.procs import start_all, stop_all
from bench.report import say
from bench.stats import Goal, Results, p50
from bench.views import Viewer
from dmp.db import sqlite_url
from dmp.demo import Service, node_kek


def _encrypted(service: Service, kek: str) -> Service:
    """The same node process, on the address it had, with its KEK."""
    args = list(service.args)
    args[args.index("--listen") + 1] = service.address
    return Service(service.name, [*args, "--kek-file", kek], service.log_path)


def _announced(service: Service) -> str:
    """The address the directory routes to: the advertised one (section c's proxy)."""
    args = service.args
    return args[args.index("--advertise") + 1] if "--advertise" in args else service.address


def measure_encryption(
    federation: BenchFederation, runs: int, views: int, results: Results
) -> None:
    assert federation.directory is not None
    dataset = federation.dataset
    patients = dataset.wide or dataset.narrow
    viewer = Viewer(federation, seed=federation.plan.seed + 11)
    details = results.detail("h_encryption")
    clear: list[float] = []
    try:
        viewer.run(patients, min(20, views))  # warm
        for run in range(runs):
            say(f"h: clear run {run + 1}/{runs}")
            clear.append(p50(viewer.run(patients, views).latencies_ms))
        say(f"h: encrypting {len(federation.nodes)} nodes in place")
        stop_all(federation.nodes.values())
        records = 0
        started = time.perf_counter()
        restarted = {}
        for region, service in federation.nodes.items():
            kek = str(node_kek(federation.workdir, region))
            db = sqlite_url(federation.workdir / "data" / f"node-{region}.db")
            done = subprocess.run(
                [sys.executable, "-m", "dmp.cli.main", "node", "encrypt", "--db", db,
                 "--kek-file", kek, "--batch", "1000"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            records += int(done.stdout.split("encrypted ", 1)[1].split(" ", 1)[0])
            restarted[region] = _encrypted(service, kek)
        elapsed = time.perf_counter() - started
        start_all(restarted.values())
        federation.nodes = restarted
        federation.wait_routed({r: _announced(s) for r, s in restarted.items()})
        viewer.close()
        viewer = Viewer(federation, seed=federation.plan.seed + 11)
        viewer.run(patients, min(20, views))  # warm the new channels and key caches
        sealed: list[float] = []
        for run in range(runs):
            say(f"h: encrypted run {run + 1}/{runs}")
            sealed.append(p50(viewer.run(patients, views).latencies_ms))
    finally:
        viewer.close()
    for clear_p50, sealed_p50 in zip(clear, sealed, strict=True):
        results.figure(
            "h.view.encrypted_ratio",
            "h",
            "view p50 with the nodes encrypted at rest / the same view in clear",
            "x",
            goal=Goal("<=", 1.1, "issue 13"),
            headline=True,
            note="run i encrypted over run i in clear, same patients, same run",
        ).values.append(sealed_p50 / clear_p50)
    results.figure(
        "h.encrypt.records_per_s", "h", "in-place encryption (dmp node encrypt)", "/s"
    ).values.append(records / elapsed)
    details.update(
        {
            "clear_p50_ms": [round(v, 3) for v in clear],
            "encrypted_p50_ms": [round(v, 3) for v in sealed],
            "records_encrypted": records,
            "encrypt_seconds": round(elapsed, 3),
        }
    )

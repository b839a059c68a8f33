"""The view figures of `make bench`: latency against the floor, CPU, saturation, memory and
added network delay, measured on a running BenchFederation (bench/federation.py)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import floor_server
from bench.clients import channel, patient_call_metadata, wait_ready
from bench.federation import (
    ANSWERED,
    HOLD_WATCH,
    MB_PER_MIB,
    REGION_DEADLINE,
    BenchFederation,
    ViewPlan,
)
from bench.floor_server import fixed_response
from bench.procs import (
    BenchProcess,
    CpuMeter,
    peak_rss_mib,
    rss_mib,
    start_all,
    stop_all,
)
from bench.report import say
from bench.stats import Goal, Results, p50, p99
from dmp.demo import Service, node_service
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import (
    directory_service_pb2_grpc,
    node_service_pb2,
    node_service_pb2_grpc,
    record_pb2,
)


@dataclass
class ViewRun:
    latencies_ms: list[float]
    incomplete: int = 0
    errors: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)


class Viewer:
    """Views one at a time (one request in flight) from the benchmark process."""

    def __init__(self, federation: BenchFederation, seed: int) -> None:
        self._federation = federation
        self._channel = federation.directory_channel()
        self._stub = directory_service_pb2_grpc.DirectoryServiceStub(self._channel)
        self._rng = random.Random(seed)

    def run(self, patients: Sequence[str], count: int) -> ViewRun:
        fed = self._federation
        result = ViewRun([])
        for _ in range(count):
            ins = self._rng.choice(patients)
            metadata = patient_call_metadata(fed.pki_dir, fed.doctor, ins, "VIEW")
            request = dpb.GetConsolidatedViewRequest(patient_ins=ins)
            start = time.perf_counter()
            try:
                answer = self._stub.GetConsolidatedView(request, timeout=10, metadata=metadata)
            except grpc.RpcError:
                result.errors += 1
                continue
            result.latencies_ms.append((time.perf_counter() - start) * 1000.0)
            if not all(region.state == ANSWERED for region in answer.regions):
                result.incomplete += 1
        return result

    def close(self) -> None:
        self._channel.close()


class Floor:
    """One trivial server per region and the same 13-way fan-out the directory makes."""

    def __init__(self, federation: BenchFederation, records: int) -> None:
        self._federation = federation
        logs = federation.workdir / "logs"
        self.servers = [
            BenchProcess(
                f"floor {region}",
                "bench.floor_server",
                ["--pki", str(federation.pki_dir), "--region", region, "--records", str(records)],
                logs / f"floor-{region}.log",
            )
            for region in federation.plan.regions
        ]
        self._channels: list[grpc.Channel] = []
        self._stubs: list[node_service_pb2_grpc.NodeServiceStub] = []
        self._watches: list[Any] = []

    def start(self) -> None:
        start_all(self.servers)
        fed = self._federation
        # The directory's own identity and channels, as in directory/channels.py, each with
        # a health Watch held open, as the directory holds one on every node channel.
        self._channels = [channel(s.address, fed.pki_dir, "directory") for s in self.servers]
        for conn in self._channels:
            wait_ready(conn)
        self._stubs = [node_service_pb2_grpc.NodeServiceStub(c) for c in self._channels]
        if HOLD_WATCH:
            request = health_pb2.HealthCheckRequest(service=floor_server.SERVICE)
            self._watches = [health_pb2_grpc.HealthStub(c).Watch(request) for c in self._channels]

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]

    def run(self, patients: Sequence[str], count: int, seed: int) -> ViewRun:
        fed = self._federation
        rng = random.Random(seed)
        result = ViewRun([])
        for _ in range(count):
            ins = rng.choice(patients)
            metadata = patient_call_metadata(fed.pki_dir, fed.doctor, ins, "VIEW")
            request = node_service_pb2.ListRecordsRequest(
                patient_ins=ins, page_size=50, statuses=[record_pb2.RECORD_STATUS_CURRENT]
            )
            start = time.perf_counter()
            calls = [
                stub.ListRecords.future(request, timeout=REGION_DEADLINE, metadata=metadata)
                for stub in self._stubs
            ]
            try:
                for call in calls:
                    call.result()
            except grpc.RpcError:
                result.errors += 1
                continue
            result.latencies_ms.append((time.perf_counter() - start) * 1000.0)
        return result

    def stop(self) -> None:
        for watch in self._watches:
            watch.cancel()
        for conn in self._channels:
            conn.close()
        stop_all(self.servers)


def _record(results: Results, key: str, run: ViewRun, section: str) -> None:
    details = results.detail(section).setdefault("runs", {}).setdefault(key, [])
    details.append(
        {
            "views": len(run.latencies_ms),
            "p50_ms": round(p50(run.latencies_ms), 3),
            "p99_ms": round(p99(run.latencies_ms), 3),
            "incomplete": run.incomplete,
            "errors": run.errors,
            "cpu_ms_per_view": run.cpu_ms,
        }
    )


def measure_views(
    federation: BenchFederation,
    views: ViewPlan,
    results: Results,
    *,
    view: bool = True,
    floor: Floor | None = None,
) -> None:
    """Sections a and b, interleaved run by run so that the ratio compares like with like
    (the federation must be running for `view`)."""
    dataset = federation.dataset
    n = len(federation.plan.regions)
    viewer = Viewer(federation, seed=federation.plan.seed) if view else None
    wide = dataset.wide or dataset.narrow
    warm = min(20, views.views)
    try:
        if viewer is not None:
            viewer.run(wide, warm)  # channels to every node, caches
            if dataset.narrow:
                viewer.run(dataset.narrow, warm)
        if floor is not None:
            floor.run(wide, warm, seed=1)
        view_cpu = CpuMeter({"directory": federation.pids("directory"), "nodes": federation.pids()})
        floor_cpu = CpuMeter({"servers": floor.pids if floor is not None else []})
        for run in range(views.runs):
            say(f"a/b: run {run + 1}/{views.runs}")
            floor_run = None
            if floor is not None:
                floor_cpu.start()
                floor_run = floor.run(wide, views.views, seed=100 + run)
                floor_run.cpu_ms = floor_cpu.per_operation_ms(views.views)
                _cpu_figures(results, "b", "floor fan-out", floor_run.cpu_ms)
                _record(results, "floor", floor_run, "b_floor")
                results.figure(
                    "b.floor.p50_ms", "b", f"floor: {n}-way fan-out to trivial servers, p50", "ms"
                ).values.append(p50(floor_run.latencies_ms))
                results.figure(
                    "b.floor.p99_ms", "b", f"floor: {n}-way fan-out to trivial servers, p99", "ms"
                ).values.append(p99(floor_run.latencies_ms))
            if viewer is None:
                continue
            view_cpu.start()
            wide_run = viewer.run(wide, views.views)
            wide_run.cpu_ms = view_cpu.per_operation_ms(views.views)
            _cpu_figures(results, "a", f"view of a patient in all {n} regions", wide_run.cpu_ms)
            _record(results, f"view_{n}_regions", wide_run, "a_view")
            results.figure(
                "a.view_all.p50_ms",
                "a",
                f"view, patients in all {n} regions, 1 in flight, p50",
                "ms",
                goal=Goal("<=", 8.0),
                headline=True,
            ).values.append(p50(wide_run.latencies_ms))
            results.figure(
                "a.view_all.p99_ms",
                "a",
                f"view, patients in all {n} regions, 1 in flight, p99",
                "ms",
                goal=Goal("<=", 25.0),
                headline=True,
            ).values.append(p99(wide_run.latencies_ms))
            if dataset.narrow:
                homes = min(federation.plan.home_regions, n)
                narrow_run = viewer.run(dataset.narrow, views.views)
                _record(results, f"view_{homes}_regions", narrow_run, "a_view")
                results.figure(
                    "a.view_few.p50_ms",
                    "a",
                    f"view, patients in {homes} regions, 1 in flight, p50",
                    "ms",
                ).values.append(p50(narrow_run.latencies_ms))
                results.figure(
                    "a.view_few.p99_ms",
                    "a",
                    f"view, patients in {homes} regions, 1 in flight, p99",
                    "ms",
                ).values.append(p99(narrow_run.latencies_ms))
            if floor_run is not None and floor_run.latencies_ms:
                results.figure(
                    "b.ratio",
                    "b",
                    f"view p50 / floor p50 (patients in all {n} regions)",
                    "x",
                    goal=Goal("<=", 2.0),
                    headline=True,
                    note="per run, the view and the floor measured back to back",
                ).values.append(p50(wide_run.latencies_ms) / p50(floor_run.latencies_ms))
    finally:
        if viewer is not None:
            viewer.close()
    if floor is not None:
        details = results.detail("b_floor")
        details["floor_answer_bytes"] = len(
            fixed_response(
                federation.plan.regions[0], federation.plan.per_region
            ).SerializeToString()
        )
        if view:
            details["node_answer_bytes"] = federation.node_answer_bytes(wide[0])


def _cpu_figures(results: Results, section: str, what: str, cpu_ms: dict[str, float]) -> None:
    """Counted work: CPU milliseconds each group of processes spent per operation."""
    for group, value in cpu_ms.items():
        if not value and group != "client":
            continue
        results.figure(
            f"{section}.cpu.{group}_ms",
            section,
            f"CPU per {what}: {group}",
            "ms CPU",
            note="user+system CPU of the processes over the run, divided by the operations",
        ).values.append(value)


def measure_saturation(federation: BenchFederation, views: ViewPlan, results: Results) -> None:
    """Views/s and p99 with several client processes keeping views in flight."""
    dataset = federation.dataset
    assert federation.directory is not None
    n = len(federation.plan.regions)
    logs = federation.workdir / "logs"
    ins_file = federation.workdir / "wide.txt"
    ins_file.write_text("\n".join(dataset.wide or dataset.narrow))
    clients = [
        BenchProcess(
            f"load client {k}",
            "bench.load_client",
            [
                "--pki",
                str(federation.pki_dir),
                "--identity",
                federation.doctor,
                "--directory",
                federation.directory.address,
                "--ins-file",
                str(ins_file),
                "--threads",
                str(views.saturation_threads),
                "--seed",
                str(k),
            ],
            logs / f"load-client-{k}.log",
            commands=True,
        )
        for k in range(views.saturation_processes)
    ]
    in_flight = views.saturation_processes * views.saturation_threads
    details = results.detail("a_view")
    details["saturation"] = {
        "client_processes": views.saturation_processes,
        "threads_per_process": views.saturation_threads,
        "views_in_flight": in_flight,
        "seconds_per_run": views.saturation_seconds,
        "runs": [],
    }
    try:
        start_all(clients)
        for run in range(views.runs):
            say(f"a: saturation run {run + 1}/{views.runs} ({in_flight} in flight)")
            for client in clients:
                assert client.process is not None and client.process.stdin is not None
                client.process.stdin.write(f"go {views.saturation_seconds}\n")
                client.process.stdin.flush()
            answers = [json.loads(client.read_line()) for client in clients]
            latencies = [v for answer in answers for v in answer["latencies_ms"]]
            elapsed = max(answer["elapsed_s"] for answer in answers)
            rate = len(latencies) / elapsed if elapsed else 0.0
            details["saturation"]["runs"].append(
                {
                    "views": len(latencies),
                    "views_per_s": round(rate, 1),
                    "p50_ms": round(p50(latencies), 3),
                    "p99_ms": round(p99(latencies), 3),
                    "errors": sum(a["errors"] for a in answers),
                    "incomplete": sum(a["incomplete"] for a in answers),
                }
            )
            results.figure(
                "a.saturation.views_per_s",
                "a",
                f"views/s at saturation (all {n} regions, {in_flight} in flight)",
                "views/s",
                goal=Goal(">=", 150.0),
                headline=True,
            ).values.append(rate)
            results.figure(
                "a.saturation.p99_ms",
                "a",
                f"view p99 at saturation ({in_flight} in flight)",
                "ms",
                goal=Goal("<=", 60.0),
                headline=True,
            ).values.append(p99(latencies))
    finally:
        stop_all(clients)


def measure_rss(federation: BenchFederation, results: Results) -> None:
    """Section f: peak RSS (VmHWM) of the directory and of the nodes during section a."""
    assert federation.directory is not None
    peaks = {region: peak_rss_mib(node.pid) for region, node in federation.nodes.items()}
    known = [v for v in peaks.values() if v is not None]
    directory_peak = peak_rss_mib(federation.directory.pid)
    details = results.detail("f_rss")
    now = rss_mib(federation.directory.pid)
    details["directory_rss_after_a_mb"] = round(now * MB_PER_MIB, 1) if now else None
    details["node_peak_rss_mb"] = {
        r: round(v * MB_PER_MIB, 1) if v else None for r, v in peaks.items()
    }
    if directory_peak is not None:
        results.figure(
            "f.directory.peak_rss_mb",
            "f",
            "directory peak RSS during a (VmHWM)",
            "MB",
            note="one value: the peak over all of section a",
        ).values.append(directory_peak * MB_PER_MIB)
    if known:
        results.figure(
            "f.node.peak_rss_mb",
            "f",
            "largest node peak RSS during a (VmHWM)",
            "MB",
            note="one value: the largest of the nodes' peaks over all of section a",
        ).values.append(max(known) * MB_PER_MIB)


# -- views under delay ---------------------------------------------------------------------


class _ProxiedNode:
    """A node restarted to announce its proxy's address; the proxy targets it once up."""

    def __init__(self, service: Service, proxy: BenchProcess, region: str) -> None:
        self.name = service.name
        self.service = service
        self.proxy = proxy
        self.region = region

    def start(self, timeout: float = 30.0) -> str:
        address = self.service.start(timeout)
        self.proxy.command(f"target {self.region} {address}")
        return address

    def stop(self, timeout: float = 15.0) -> None:
        self.service.stop(timeout)


def measure_delay(federation: BenchFederation, views: ViewPlan, results: Results) -> None:
    """Section c: every node behind a delaying proxy; the same views with no delay, with
    one region delayed, and with all of them delayed, run after run."""
    assert federation.directory is not None
    regions = federation.plan.regions
    n = len(regions)
    logs = federation.workdir / "logs"
    proxy = BenchProcess("delay proxy", "bench.delay_proxy", [], logs / "proxy.log", commands=True)
    federation.extra.append(proxy)
    proxy.start()
    addresses = {r: proxy.command(f"add {r}").rsplit(" ", 1)[1] for r in regions}
    say(f"c: restarting {n} nodes behind the delaying proxy")
    stop_all(federation.nodes.values())
    proxied = []
    for region in regions:
        service = node_service(
            federation.pki_dir,
            federation.workdir,
            region,
            federation.directory.address,
            encrypted=False,
        )
        service.args += ["--advertise", addresses[region]]
        proxied.append(_ProxiedNode(service, proxy, region))
    start_all(proxied)
    federation.nodes = {p.region: p.service for p in proxied}
    federation.wait_routed(addresses)
    delayed_region = regions[0]
    delay = views.delay_ms
    patients = federation.dataset.wide or federation.dataset.narrow
    viewer = Viewer(federation, seed=federation.plan.seed + 7)
    details = results.detail("c_delay")
    details.update(
        {
            "delay_ms": delay,
            "applied": "client->node direction, once per round trip, by bench/delay_proxy.py",
            "one_region_delayed": delayed_region,
            "patients": f"patients in all {n} regions",
            "sum_of_delays_all_ms": delay * n,
        }
    )
    try:
        viewer.run(patients, min(20, views.delay_views))  # new channels through the proxy
        for run in range(views.runs):
            say(f"c: run {run + 1}/{views.runs}")
            p50s: dict[str, float] = {}
            for mode, setting in (("undelayed", None), ("one", delayed_region), ("all", "*")):
                proxy.command("delay * 0")
                if setting is not None:
                    proxy.command(f"delay {setting} {delay:g}")
                measured = viewer.run(patients, views.delay_views)
                _record(results, mode, measured, "c_delay")
                p50s[mode] = p50(measured.latencies_ms)
            proxy.command("delay * 0")
            results.figure(
                "c.undelayed.p50_ms", "c", "view p50 through the proxies, no delay", "ms"
            ).values.append(p50s["undelayed"])
            results.figure(
                "c.one.p50_ms",
                "c",
                f"view p50, 1 region {delay:g} ms away",
                "ms",
                note=f"single delay {delay:g} ms = sum of delays",
            ).values.append(p50s["one"])
            results.figure(
                "c.all.p50_ms",
                "c",
                f"view p50, all {n} regions {delay:g} ms away",
                "ms",
                note=f"single delay {delay:g} ms, sum of delays {delay * n:g} ms",
            ).values.append(p50s["all"])
            results.figure(
                "c.one.added_ms",
                "c",
                "delayed - undelayed p50, 1 region delayed",
                "ms",
                goal=Goal("<=", delay + 3.0, "issue 6 §3, BENCHMARKS.md"),
                headline=True,
            ).values.append(p50s["one"] - p50s["undelayed"])
            results.figure(
                "c.all.added_ms",
                "c",
                f"delayed - undelayed p50, all {n} delayed",
                "ms",
                goal=Goal("<=", delay + 3.0, "issue 6 §3, BENCHMARKS.md"),
                headline=True,
                note=f"the sum of the delays would be {delay * n:g} ms",
            ).values.append(p50s["all"] - p50s["undelayed"])
    finally:
        viewer.close()

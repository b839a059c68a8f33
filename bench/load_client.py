"""A load-generating client process for views at saturation (issue 6 §2a).

    python -m bench.load_client --pki DIR --identity ID --directory ADDR --ins-file F \
        --threads 4

Opens one mutual-TLS channel to the directory, warms it up and prints "ready". Then, for
each line "go SECONDS" on stdin, runs `--threads` closed loops (one view in flight per
thread, random patients of the file) for that long and prints one JSON line: the
latencies in milliseconds, the errors, and the views whose regions did not all answer.
It exits at the end of its input.

A separate process (not threads of the benchmark) so that the client's own Python work
does not share one GIL with the benchmark; it still shares the machine's cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.clients import channel, patient_call_metadata, wait_ready
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import directory_service_pb2_grpc

ANSWERED = dpb.REGION_STATE_ANSWERED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--ins-file", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    patients = args.ins_file.read_text().split()
    conn = channel(args.directory, args.pki, args.identity)
    wait_ready(conn)
    stub = directory_service_pb2_grpc.DirectoryServiceStub(conn)

    def view(ins: str) -> tuple[float, bool]:
        metadata = patient_call_metadata(args.pki, args.identity, ins, "VIEW")
        request = dpb.GetConsolidatedViewRequest(patient_ins=ins)
        start = time.perf_counter()
        answer = stub.GetConsolidatedView(request, timeout=args.timeout, metadata=metadata)
        elapsed = time.perf_counter() - start
        return elapsed, all(r.state == ANSWERED for r in answer.regions)

    for ins in patients[: min(len(patients), 10)]:
        view(ins)
    print("ready", flush=True)
    for round_number, line in enumerate(sys.stdin):
        words = line.split()
        if len(words) != 2 or words[0] != "go":
            print(json.dumps({"error": f"cannot do {line.strip()!r}"}), flush=True)
            continue
        print(
            json.dumps(
                run_round(view, patients, args.threads, float(words[1]), args.seed + round_number)
            ),
            flush=True,
        )
    conn.close()


def run_round(
    view: Callable[[str], tuple[float, bool]],
    patients: list[str],
    threads_count: int,
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(threads_count)]
    errors = [0] * threads_count
    incomplete = [0] * threads_count
    begin = time.perf_counter()
    end = begin + seconds

    def loop(slot: int) -> None:
        rng = random.Random(seed * 1000 + slot)
        while time.perf_counter() < end:
            try:
                elapsed, complete = view(rng.choice(patients))
            except grpc.RpcError:
                errors[slot] += 1
                continue
            latencies[slot].append(elapsed * 1000.0)
            if not complete:
                incomplete[slot] += 1

    threads = [threading.Thread(target=loop, args=(slot,)) for slot in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "latencies_ms": [round(v, 3) for slot in latencies for v in slot],
        "errors": sum(errors),
        "incomplete": sum(incomplete),
        "elapsed_s": time.perf_counter() - begin,
    }


if __name__ == "__main__":
    main()

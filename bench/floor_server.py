"""A trivial NodeService for the floor of the fan-out (issue 6 §2b).

    python -m bench.floor_server --pki DIR --region 11 [--records 10]

Serves ListRecords over the same mutual TLS as a node (the node's own certificate, the same
server options and thread pool) and answers every call with one fixed, prebuilt and
pre-serialized ListRecordsResponse of `--records` synthetic records, as a node holding
that many records of the patient would. Nothing is parsed, checked, looked up or logged:
what is left of a call is the transport, which is what the floor measures.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import threading
import uuid
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dmp import synth
from dmp.clock import from_us, now_us
from dmp.pki import load_credentials
from dmp.tls import server_credentials, server_options
from dmp.v1 import node_service_pb2, record_pb2

SERVICE = "dmp.v1.NodeService"


def fixed_response(
    region: str, records: int, *, seed: int = 0
) -> node_service_pb2.ListRecordsResponse:
    """A ListRecordsResponse like a node's for a patient holding `records` records there:
    synthetic records with the output-only fields a node fills in."""
    patient = synth.patient_at(0, seed=seed)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    drafts = synth.records_for(patient, regions=[region], per_region=records, seed=seed, now=now)
    response = node_service_pb2.ListRecordsResponse()
    created = now_us()
    for draft in reversed(drafts):
        record = draft.to_proto(str(uuid.uuid4()))
        record.author.CopyFrom(
            record_pb2.Author(
                identity="urn:dmp:practitioner:10000000001",
                name="Dr Claire MARTIN",
                profession="doctor",
            )
        )
        record.created_time.CopyFrom(from_us(created))
        record.status = record_pb2.RECORD_STATUS_CURRENT
        record.version = 1
        record.size = len(draft.content)
        record.sha256 = hashlib.sha256(draft.content).hexdigest()
        record.region = region
        if not record.confidentiality:
            record.confidentiality = record_pb2.CONFIDENTIALITY_NORMAL
        response.records.append(record)
    return response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--workers", type=int, default=32)
    args = parser.parse_args()

    credentials = load_credentials(args.pki, f"node-{args.region}")
    answer = fixed_response(args.region, args.records).SerializeToString()

    def list_records(_request: bytes, _context: Any) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ListRecords": grpc.unary_unary_rpc_method_handler(
                list_records, request_deserializer=None, response_serializer=None
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="rpc"),
        options=server_options(),
        maximum_concurrent_rpcs=args.workers * 8,
    )
    server.add_generic_rpc_handlers((handler,))
    # Health, as a node has it (the directory checks it; a client may watch it).
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(args.listen, server_credentials(credentials))
    if port == 0:
        raise SystemExit(f"floor server: cannot listen on {args.listen}")
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    print(f"floor {args.region} listening on {host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    server.stop(None).wait()


if __name__ == "__main__":
    main()

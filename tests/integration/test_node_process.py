"""The node as an operator runs it: its own process, health, reflection, signals, durability."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dmp.cli.main import main
from dmp.errors import FailedPrecondition
from dmp.pki import load_credentials
from dmp.tls import secure_channel
from node.app import NodeConfig, start_node
from tests.federation import DOCTOR, PATIENT, dmp_process, running_node, wait_listening


def _put(pki_dir: Path, node: str, path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(
        [
            "record", "put", "--pki", str(pki_dir), "--as", f"practitioner-{DOCTOR}",
            "--node", node, "--patient", PATIENT, "--kind", "document",
            "--type-code", "11488-4", "--title", "Compte rendu", "--file", str(path),
        ]
    )  # fmt: skip
    assert code == 0
    return capsys.readouterr().out.strip()


def _get(pki_dir: Path, node: str, record_id: str, out: Path) -> int:
    return main(
        [
            "record", "get", "--pki", str(pki_dir), "--as", f"practitioner-{DOCTOR}",
            "--node", node, "--record", record_id, "--out", str(out), "--patient", PATIENT,
        ]
    )  # fmt: skip


def test_record_survives_kill_9_and_cli_round_trip_is_byte_identical(
    pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'node.db'}"
    args = ["node", "serve", "--pki", str(pki_dir), "--region", "11", "--db", db]
    process = dmp_process(*args)
    try:
        address = wait_listening(process)
        source = tmp_path / "report.pdf"
        source.write_bytes(bytes(range(256)) * 4096 + b"%%EOF")
        ids = [_put(pki_dir, address, source, capsys) for _ in range(5)]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    again = dmp_process(*args)
    try:
        address = wait_listening(again)
        for record_id in ids:
            out = tmp_path / f"{record_id}.out"
            assert _get(pki_dir, address, record_id, out) == 0
            assert out.read_bytes() == source.read_bytes()
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=30)
    assert again.returncode == 0


def test_sigterm_exits_zero_and_each_call_logs_one_line(pki_dir: Path, tmp_path: Path) -> None:
    process = dmp_process(
        "node", "serve", "--pki", str(pki_dir), "--region", "53",
        "--db", f"sqlite:///{tmp_path / 'n.db'}",
    )  # fmt: skip
    address = wait_listening(process)
    channel = secure_channel(address, load_credentials(pki_dir, f"practitioner-{DOCTOR}"))
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service="dmp.v1.NodeService"), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0
    calls = [
        json.loads(line.split("dmp.rpc ", 1)[1]) for line in err.splitlines() if "dmp.rpc " in line
    ]
    assert calls == [
        {
            "method": "/grpc.health.v1.Health/Check",
            "caller": f"urn:dmp:practitioner:{DOCTOR}",
            "code": "OK",
            "ms": calls[0]["ms"],
        }
    ]


def test_reflection_lists_the_node_service(pki_dir: Path, tmp_path: Path) -> None:
    with running_node(pki_dir, "11", f"sqlite:///{tmp_path / 'n.db'}") as node:
        channel = secure_channel(
            f"127.0.0.1:{node.port}", load_credentials(pki_dir, f"practitioner-{DOCTOR}")
        )
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in answer.list_services_response.service}
        assert {"dmp.v1.NodeService", "grpc.health.v1.Health"} <= names
        channel.close()


def test_second_node_on_the_same_port_fails_loudly(pki_dir: Path, tmp_path: Path) -> None:
    with running_node(pki_dir, "11", f"sqlite:///{tmp_path / 'a.db'}") as node:
        second = NodeConfig(
            pki_dir=pki_dir,
            region="11",
            listen=f"127.0.0.1:{node.port}",
            db_url=f"sqlite:///{tmp_path / 'b.db'}",
        )
        with pytest.raises(OSError):
            start_node(second)


def test_node_refuses_a_region_its_certificate_does_not_name(pki_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pki"
    bad.mkdir()
    for name in ("ca.pem", "crl.pem"):
        (bad / name).write_bytes((pki_dir / name).read_bytes())
    (bad / "node-24.pem").write_bytes((pki_dir / "node-11.pem").read_bytes())
    (bad / "node-24.key").write_bytes((pki_dir / "node-11.key").read_bytes())
    with pytest.raises(FailedPrecondition, match="urn:dmp:node:11"):
        start_node(NodeConfig(pki_dir=bad, region="24", db_url=f"sqlite:///{tmp_path / 'c.db'}"))


def test_serve_with_missing_certificate_is_one_line_error(
    pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["node", "serve", "--pki", str(pki_dir), "--region", "94", "--data-dir", str(tmp_path)]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node-94" in err[0]


def test_unreachable_node_is_one_line_error(
    pki_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["record", "list", "--pki", str(pki_dir), "--as", f"practitioner-{DOCTOR}",
         "--node", "127.0.0.1:1", "--patient", PATIENT]
    )  # fmt: skip
    assert code == 1
    assert capsys.readouterr().err.startswith("dmp: UNAVAILABLE")

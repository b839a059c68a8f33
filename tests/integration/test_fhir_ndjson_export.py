"""The reversibility package: a node encrypted at rest, with several patients, every record
kind, a superseded and a hidden record and a dispensed prescription, exported with
`dmp node export --format fhir-ndjson`; every line of every NDJSON file validated by an
independent FHIR library (fhir.resources, its R4B models: R4's resources as R4 shapes
them); the manifest's signature and the files' SHA-256 checked with nothing but the
certificate it carries; then imported with `dmp node import` into an empty node of the
other database engine under another KEK, and every stored field, content byte, identity
trait, signed prescription and dispensing compared. A tampered file, a tampered manifest
and a non-empty target are refused, each by name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import select
from sqlalchemy.orm import Session

from dmp.cli.main import main
from dmp.db import make_engine
from dmp.envelope import init_kek_file, load_kek_file
from dmp.ins import make_ins
from dmp.pki import Pki
from dmp.prescriptions import verify_prescription
from dmp.server import error_reason
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import record_pb2
from node import fhir_export, fhir_import, integrity
from node.key_admin import shred_patient
from node.keys import Sealer, open_traits
from node.models import (
    DispensationRow,
    PatientRow,
    PrescriptionRow,
    RecordContentRow,
    RecordRow,
    audit_events,
)
from node.prescription_store import PrescriptionStore
from tests.federation import (
    OTHER_PATIENT,
    PATIENT,
    PHARMACIST,
    READ_CONTENT,
    client,
    draft,
    identity_of,
)
from tests.integration.prescription_helpers import (
    DOCTOR,
    actor_pool,
    make_rx_pki,
    patient,
    practitioner,
    rx_id,
    rx_node,
)
from tests.integration.test_prescriptions_node import verifier

K = record_pb2
#: A patient the node knows only from a record (no identity traits given).
THIRD_PATIENT = make_ins("2750599123414")
KINDS = (
    (K.RECORD_KIND_DOCUMENT, "11488-4"),
    (K.RECORD_KIND_ALLERGY, "48765-2"),
    (K.RECORD_KIND_CONDITION, "11450-4"),
    (K.RECORD_KIND_IMMUNIZATION, "11369-6"),
    (K.RECORD_KIND_OBSERVATION, "2339-0"),
)

RESOURCE_TYPES = (
    "DocumentReference",
    "AllergyIntolerance",
    "Condition",
    "Immunization",
    "Observation",
    "MedicationRequest",
    "MedicationDispense",
    "AuditEvent",
)


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ndjson-pki")
    make_rx_pki(directory)
    return directory


@dataclass
class Filled:
    superseded: str
    hidden: str
    revealed: str
    prescription: str


def _put(c: Any, record: record_pb2.Record, content: bytes, who: str = "") -> str:
    ins = record.patient_ins
    identity = identity_of(ins, who) if who else None
    request = pb.PutRecordRequest(record=record, content=content, patient=identity)
    return str(c.PutRecord(request, timeout=30).record.id)


def fill(pki: Path, url: str, kek: Path) -> Filled:
    """A node of region 11 sealing at rest, written to over mutual TLS."""
    with rx_node(pki, url, kek_file=kek) as (node, _), actor_pool(pki, node.port) as actor:
        doctor = actor(practitioner(DOCTOR)).records
        for ins, family in ((PATIENT, "DUPONT"), (OTHER_PATIENT, "LEROY")):
            for n, (kind, code) in enumerate(KINDS):
                record = draft(ins, kind=kind, code=code, title=f"Élément {n} de {family}")
                if n == 2:
                    record.confidentiality = K.CONFIDENTIALITY_RESTRICTED
                _put(doctor, record, f"contenu {n} {family} ".encode() * (n + 1), family)
        _put(doctor, draft(THIRD_PATIENT, title="Sans traits"), bytes(range(256)))
        first = _put(doctor, draft(title="Compte rendu, version 1"), b"version 1")
        second = draft(title="Compte rendu, version 2")
        second.supersedes = first
        _put(doctor, second, b"version 2")
        hidden = draft(title="Annonce diagnostique")
        hidden.hidden_from_patient = True
        hidden_id = _put(doctor, hidden, b"a annoncer en consultation")
        revealed = draft(title="Résultat annoncé")
        revealed.hidden_from_patient = True
        revealed_id = _put(doctor, revealed, b"annonce faite")
        doctor.RevealRecord(pb.RevealRecordRequest(record_id=revealed_id), timeout=30)
        note = draft(kind=K.RECORD_KIND_PATIENT_NOTE, code="51855-5", title="Ma note")
        _put(actor(patient(PATIENT)).records, note, b"")  # an empty content too
        prescriber = actor(practitioner(DOCTOR))
        stored = prescriber.prescribe(renewals=1)
        actor(practitioner(PHARMACIST)).dispense(rx_id(stored))
    return Filled(first, hidden_id, revealed_id, rx_id(stored))


def stored_node(url: str, kek: Path) -> dict[str, Any]:
    """Everything the node stores, opened with its KEK: what an import must give back."""
    sealer = Sealer(load_kek_file(kek))
    engine = make_engine(url, pool_size=2)
    out: dict[str, Any] = {}
    try:
        with Session(engine) as session:
            conn = session.connection()
            rows = list(session.scalars(select(RecordRow).order_by(RecordRow.seq)))
            integrity.check(rows, "11")
            assert all(row.sealed is not None for row in rows)  # sealed at rest
            ins = {row.patient_ins for row in rows}
            keys = sealer.keys_for_read(conn, ins)
            records = {}
            for row in rows:
                key = keys[row.patient_ins].key
                assert key is not None
                values = {name: getattr(row, name) for name in integrity.HASHED_COLUMNS}
                values.update(Sealer.open_metadata(key, row))
                values["prescription_id"] = row.prescription_id
                blob = session.get(RecordContentRow, row.id)
                assert blob is not None
                values["content"] = Sealer.open_content(key, row, blob.content)
                records[row.id] = values
            out["records"] = records
            out["patients"] = {
                row.ins: open_traits(keys[row.ins].key, row)
                for row in session.scalars(select(PatientRow))
            }
            store = PrescriptionStore(engine, "11", sealer)
            prescriptions = {}
            for rx in session.scalars(select(PrescriptionRow)):
                values = {
                    c.key: getattr(rx, c.key)
                    for c in PrescriptionRow.__table__.columns
                    if c.key not in ("signed", "sealed", "cancel_reason", "holder_pharmacy")
                }
                values["signed"] = store.signed_of(rx)
                values["free_text"] = store.free_text_of(rx)
                values["dispensations"] = [
                    d.SerializeToString(deterministic=True)
                    for d in store.dispensations(session, rx.id)
                ]
                prescriptions[rx.id] = values
            out["prescriptions"] = prescriptions
            out["dispensations"] = {
                row.id: (row.prescription_id, row.dispensing, row.idempotency_key,
                         row.pharmacist_identity, row.created_us)
                for row in session.scalars(select(DispensationRow))
            }  # fmt: skip
            out["kek_ids"] = sealer.kek_ids
    finally:
        engine.dispose()
    return out


def check_package(directory: Path, pki: Path) -> dict[str, Any]:
    """Check the package as someone without our software would: modes, the manifest's
    signature by the certificate it carries (issued by the federation CA), every file's
    SHA-256 and count, and every NDJSON line against the FHIR models."""
    assert directory.stat().st_mode & 0o777 == 0o700
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    data = (directory / "manifest.json").read_bytes()
    signature = json.loads((directory / "manifest.json.sig").read_bytes())
    cert = x509.load_pem_x509_certificate(signature["certificate"].encode())
    cert.verify_directly_issued_by(Pki.load(pki).ca_certificate)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(base64.b64decode(signature["signature"]), data, ec.ECDSA(hashes.SHA256()))
    manifest = json.loads(data)
    ours = manifest["extension"]["urn:dmp:fhir:reversibility-package"]
    assert ours["region"] == "11" and ours["node"] == "urn:dmp:node:11"
    for name, described in ours["files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == described["sha256"]
    listed = {entry["url"] for entry in manifest["output"]}
    assert listed == {p.name for p in directory.glob("*.ndjson")}
    for entry in manifest["output"]:
        model = get_fhir_model_class(entry["type"])
        lines = (directory / entry["url"]).read_bytes().splitlines()
        assert len(lines) == entry["count"] > 0
        for line in lines:
            resource = model.model_validate_json(line)  # raises on any invalid line
            assert resource.get_resource_type() == entry["type"]
    return manifest


def served_content(pki: Path, url: str, kek: Path, record_id: str) -> bytes:
    """A record's content as a node started on the database serves it to its author."""
    with rx_node(pki, url, kek_file=kek) as (node, _):
        doctor = client(pki, practitioner(DOCTOR), node.port)
        try:
            chunks = doctor.node.GetRecordContent(
                pb.GetRecordContentRequest(record_id=record_id),
                timeout=30,
                metadata=doctor.md(op=READ_CONTENT, record_id=record_id),
            )
            return b"".join(c.chunk for c in chunks)
        finally:
            doctor.close()


def resources(directory: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / f"{name}.ndjson").read_bytes().splitlines()]


@pytest.mark.parametrize(("source", "target"), [("sqlite", "postgresql"), ("postgresql", "sqlite")])
def test_export_validates_as_fhir_and_imports_back_every_record(
    rx_pki: Path,
    databases: Callable[[str, str], str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
    target: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pages and batches of 2: every page boundary of the export and the import is crossed.
    monkeypatch.setattr(fhir_export, "PAGE", 2)
    monkeypatch.setattr(fhir_import, "BATCH", 2)
    kek, other_kek = tmp_path / "node-11.kek", tmp_path / "new-host.kek"
    init_kek_file(kek)
    init_kek_file(other_kek)
    origin, copy = databases(source, "origin"), databases(target, "copy")
    filled = fill(rx_pki, origin, kek)
    before = stored_node(origin, kek)
    out = tmp_path / "package"
    common = ["--pki", str(rx_pki), "--region", "11"]
    assert main(["node", "export", "--format", "fhir-ndjson", "--out", str(out), "--db", origin,
                 "--kek-file", str(kek), *common]) == 0  # fmt: skip
    assert "exported node 11" in capsys.readouterr().out

    manifest = check_package(out, rx_pki)
    counts = {entry["type"]: entry["count"] for entry in manifest["output"]}
    assert counts["Patient"] == 3 and counts["Binary"] == len(before["records"])
    for kind in RESOURCE_TYPES:
        assert counts[kind] > 0, kind
    ours = manifest["extension"]["urn:dmp:fhir:reversibility-package"]
    assert ours["records"] == len(before["records"])
    assert ours["audit"]["events"] == len((out / "audit.jsonl").read_bytes().splitlines()) > 0
    documents = {r["identifier"][0]["value"]: r for r in resources(out, "DocumentReference")}
    assert documents[filled.superseded]["status"] == "superseded"
    binaries = {r["id"]: r for r in resources(out, "Binary")}
    for record_id, values in before["records"].items():  # the contents, readable as they are
        binary = binaries[f"11.{values['patient_ins']}.{record_id}"]
        assert base64.b64decode(binary.get("data", "")) == values["content"]
    request = resources(out, "MedicationRequest")[0]
    signed = next(e for e in request["extension"] if e["url"].endswith("signed-prescription"))
    assert signed["valueBase64Binary"]  # the prescriber's act as signed, for anyone to check
    assert b"contenu 0 DUPONT" not in (out / "audit.jsonl").read_bytes()

    assert main(["node", "import", str(out), "--db", copy, "--kek-file", str(other_kek),
                 *common]) == 0  # fmt: skip
    assert "imported node 11's package" in capsys.readouterr().out
    after = stored_node(copy, other_kek)
    assert after["kek_ids"] != before["kek_ids"]  # sealed again, with the new host's KEK
    assert after["records"].keys() == before["records"].keys()
    for record_id, values in before["records"].items():
        assert after["records"][record_id] == values, record_id
    assert after["records"][filled.hidden]["hidden_from_patient"] is True
    assert after["records"][filled.hidden]["revealed_us"] is None
    assert after["records"][filled.revealed]["revealed_us"] is not None
    assert after["patients"] == before["patients"] and len(after["patients"]) == 2
    assert after["prescriptions"] == before["prescriptions"]
    assert after["dispensations"] == before["dispensations"] and after["dispensations"]
    from dmp.v1 import prescription_pb2

    signed_act = prescription_pb2.SignedPrescription.FromString(
        after["prescriptions"][filled.prescription]["signed"]
    )
    prescription, signer = verify_prescription(signed_act, verifier(rx_pki))
    assert signer.key == DOCTOR and prescription.id == filled.prescription

    engine = make_engine(copy, pool_size=2)
    try:
        with engine.connect() as conn:
            events = [json.loads(e) for e in conn.execute(select(audit_events.c.event_json))
                      .scalars()]  # fmt: skip
    finally:
        engine.dispose()
    manifest_sha = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert len(events) == 1 and events[0]["event_type"] == "import"
    assert manifest_sha in events[0]["detail"]
    assert f"{len(before['records'])} records" in events[0]["detail"]

    # The imported node serves the records, content included.
    assert served_content(rx_pki, copy, other_kek, filled.superseded) == b"version 1"


@pytest.fixture(scope="module")
def package(rx_pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One node's package (SQLite), for the refusals."""
    where = tmp_path_factory.mktemp("ndjson-refusals")
    kek = where / "node-11.kek"
    init_kek_file(kek)
    url = f"sqlite:///{where / 'origin.db'}"
    fill(rx_pki, url, kek)
    out = where / "package"
    assert main(["node", "export", "--format", "fhir-ndjson", "--out", str(out), "--db", url,
                 "--kek-file", str(kek), "--pki", str(rx_pki), "--region", "11"]) == 0  # fmt: skip
    return out


def test_an_export_needs_the_kek_and_a_new_directory_and_an_import_the_region(
    rx_pki: Path, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    origin = f"sqlite:///{package.parent / 'origin.db'}"
    common = ["--pki", str(rx_pki), "--region", "11", "--db", origin]
    out = tmp_path / "again"
    assert main(["node", "export", "--format", "fhir-ndjson", "--out", str(out), *common]) == 1
    assert capsys.readouterr().err.strip() == (
        "dmp: node 11's records are sealed at rest: give its --kek-file"
    )
    assert not list(out.iterdir())  # nothing half written
    kek = str(package.parent / "node-11.kek")
    assert main(["node", "export", "--format", "fhir-ndjson", "--out", str(package),
                 "--kek-file", kek, *common]) == 1  # fmt: skip
    assert "is not an empty directory" in capsys.readouterr().err
    target = f"sqlite:///{tmp_path / 'target.db'}"
    assert main(["node", "import", str(package), "--db", target, "--pki", str(rx_pki),
                 "--region", "53"]) == 1  # fmt: skip
    assert capsys.readouterr().err.strip() == "dmp: the package is node 11's, not node 53's"


def _import(pki: Path, directory: Path, url: str) -> int:
    return main(["node", "import", str(directory), "--db", url, "--pki", str(pki),
                 "--region", "11"])  # fmt: skip


def _tampered(package: Path, tmp_path: Path, name: str, change: Callable[[bytes], bytes]) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(package, copy)
    path = copy / name
    path.write_bytes(change(path.read_bytes()))
    return copy


def test_a_tampered_file_is_refused_by_name(
    rx_pki: Path, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def flip(data: bytes) -> bytes:
        at = data.index(b'"data":"') + 12
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]

    tampered = _tampered(package, tmp_path, "Binary.ndjson", flip)
    url = f"sqlite:///{tmp_path / 'target.db'}"
    assert _import(rx_pki, tampered, url) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dmp: Binary.ndjson does not match its SHA-256 in the signed manifest"]
    assert not (tmp_path / "target.db").exists() or _count(url) == 0


def test_a_tampered_manifest_is_refused(
    rx_pki: Path, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def more(data: bytes) -> bytes:
        manifest = json.loads(data)
        manifest["extension"]["urn:dmp:fhir:reversibility-package"]["records"] += 1
        return json.dumps(manifest).encode()

    tampered = _tampered(package, tmp_path, "manifest.json", more)
    assert _import(rx_pki, tampered, f"sqlite:///{tmp_path / 'target.db'}") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmp: manifest.json: its signature does not check")
    assert "\n" not in err


def test_import_into_a_non_empty_node_is_refused(
    rx_pki: Path, package: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _import(rx_pki, package, db_url) == 0
    before = _count(db_url)
    capsys.readouterr()
    assert _import(rx_pki, package, db_url) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmp: refusing to import into a database that is not empty")
    assert "\n" not in err
    assert _count(db_url) == before


def _count(url: str) -> int:
    engine = make_engine(url, pool_size=2)
    try:
        with Session(engine) as session:
            return len(list(session.scalars(select(RecordRow.id))))
    finally:
        engine.dispose()


def _rows(url: str) -> dict[str, dict[str, Any]]:
    """Every stored row of the patient tables, as stored (ciphertext too), but seq."""
    engine = make_engine(url, pool_size=2)
    tables = (RecordRow, PatientRow, PrescriptionRow, DispensationRow)
    out: dict[str, dict[str, Any]] = {}
    try:
        with Session(engine) as session:
            for table in tables:
                columns = [c.key for c in table.__table__.columns if c.key != "seq"]
                for row in session.scalars(select(table)):
                    values = {name: getattr(row, name) for name in columns}
                    out[f"{table.__tablename__}/{values.get('id') or values['ins']}"] = values
            return out
    finally:
        engine.dispose()


def test_a_shredded_patient_leaves_as_metadata_only_and_stays_shredded(
    rx_pki: Path, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kek, other_kek = tmp_path / "node-11.kek", tmp_path / "new-host.kek"
    init_kek_file(kek)
    init_kek_file(other_kek)
    origin = f"sqlite:///{tmp_path / 'origin.db'}"
    filled = fill(rx_pki, origin, kek)
    engine = make_engine(origin, pool_size=2)
    try:
        shred_patient(engine, load_kek_file(kek), "11", PATIENT, operator="dpo")
    finally:
        engine.dispose()
    stored = _rows(origin)
    out = tmp_path / "package"
    common = ["--pki", str(rx_pki), "--region", "11"]
    assert main(["node", "export", "--format", "fhir-ndjson", "--out", str(out), "--db", origin,
                 "--kek-file", str(kek), *common]) == 0  # fmt: skip
    manifest = check_package(out, rx_pki)
    shredded = manifest["extension"]["urn:dmp:fhir:reversibility-package"]["shredded"]
    shredded_ids = {
        key.partition("/")[2]
        for key, row in stored.items()
        if key.startswith("records/") and row["patient_ins"] == PATIENT
    }
    assert shredded["patients"] == 1 and shredded["records"] == len(shredded_ids) > 0
    assert "metadata only" in shredded["note"]
    binaries = {r["id"].rpartition(".")[2] for r in resources(out, "Binary")}
    assert binaries and not binaries & shredded_ids  # no content of theirs leaves
    marked = {
        r["identifier"][0]["value"]
        for name in RESOURCE_TYPES[:5]
        for r in resources(out, name)
        if any(e["url"] == "urn:dmp:fhir:crypto-shredded" for e in r.get("extension", []))
    }
    assert marked == shredded_ids
    capsys.readouterr()
    assert main(["node", "import", str(out), "--db", db_url, *common]) == 1  # no KEK
    assert "import it into a node with a KEK" in capsys.readouterr().err
    assert main(["node", "import", str(out), "--db", db_url, "--kek-file", str(other_kek),
                 *common]) == 0  # fmt: skip
    imported = _rows(db_url)
    assert imported.keys() == stored.keys()
    for key, row in stored.items():
        if row.get("patient_ins", row.get("ins")) == PATIENT or key.startswith("dispensations/"):
            assert imported[key] == row, key  # kept as stored: it opens no more
    with pytest.raises(grpc.RpcError) as refused:
        served_content(rx_pki, db_url, other_kek, filled.superseded)
    assert error_reason(refused.value) == "RECORD_SHREDDED"

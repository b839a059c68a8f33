"""The reversibility package's format: what `dmp node export --format fhir-ndjson` writes
and `dmp node import` reads back.

A directory (0700) of files (0600): one FHIR R4 NDJSON file per resource type (one
resource a line, FHIR Bulk Data), the node's audit log as JSON lines (its rows verbatim),
and `manifest.json`, a Bulk Data export manifest whose `extension` names the region, the
node, the SHA-256 of every file and the counts. `manifest.json.sig` signs the manifest's
exact bytes with the node's key (ECDSA P-256, SHA-256, DER) and carries the node's
certificate PEM: anyone holding the federation CA checks the package without our software.

What FHIR has no element for travels in extensions (their URLs below), so that an import
gives back every record as it was stored: a record's metadata as the node keeps it, the
prescriber's signed act as received (its signature stays verifiable), a dispensing's
message, and the opaque sealed bytes of what a crypto-shredded patient's data key no
longer opens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from dmp.audit.events import iso_instant
from dmp.errors import DmpError
from dmp.fhir.systems import FHIR_VERSION
from dmp.revocation import RevocationList
from dmp.signing import SignatureVerifier, Signer
from node.integrity import HASHED_COLUMNS

FORMAT: Final = "dmp-fhir-ndjson-v1"
MANIFEST: Final = "manifest.json"
SIGNATURE: Final = "manifest.json.sig"
AUDIT: Final = "audit.jsonl"
CHECKPOINTS: Final = "audit-checkpoints.jsonl"
#: The manifest's extension of ours (Bulk Data lets a manifest carry an `extension` object).
MANIFEST_EXTENSION: Final = "urn:dmp:fhir:reversibility-package"
SIGNATURE_ALGORITHM: Final = "ECDSA-P256-SHA256-DER"

#: A record's stored metadata (JSON, node/integrity.py's column names), on its resource.
NODE_RECORD: Final = "urn:dmp:fhir:node-record"
#: On a crypto-shredded patient's resources (JSON: when, which KEK wrapped the key).
SHREDDED: Final = "urn:dmp:fhir:crypto-shredded"
#: The prescription's SignedPrescription as received (base64), on its first line's request.
SIGNED_PRESCRIPTION: Final = "urn:dmp:fhir:signed-prescription"
#: The prescription's progress as the node keeps it (JSON).
PRESCRIPTION_STATE: Final = "urn:dmp:fhir:prescription-state"
#: A dispensing's Dispensation message (base64) and its row (JSON), on its first line.
DISPENSATION: Final = "urn:dmp:fhir:dispensation"
DISPENSATION_ROW: Final = "urn:dmp:fhir:dispensation-row"

#: The resource types of records, by the mapping of dmp/fhir/mapping.py.
RECORD_TYPES: Final = (
    "DocumentReference",
    "AllergyIntolerance",
    "Condition",
    "Immunization",
    "Observation",
)
FILE_MODE: Final = 0o600


#: A record's stored metadata as the package carries it (the hashed columns and the link
#: to its prescription).
RECORD_FIELDS = (*HASHED_COLUMNS, "prescription_id")
#: A prescription's row as the package carries it (its progress and free text opened).
PRESCRIPTION_FIELDS = (
    "id",
    "patient_ins",
    "prescriber_rpps",
    "authored_us",
    "payload_sha256",
    "created_us",
    "version",
    "dispensed",
    "last_dispensed_us",
    "cancelled_us",
    "cancel_reason",
    "holder",
    "holder_pharmacy",
    "held_until_us",
)
DISPENSATION_FIELDS = (
    "id",
    "prescription_id",
    "dispensing",
    "idempotency_key",
    "pharmacist_identity",
    "created_us",
)


@dataclass
class PackageSummary:
    """What a package holds: counted by the export that writes it, the import that reads it."""

    region: str
    manifest_sha256: str = ""
    patients: int = 0
    records: int = 0
    shredded_patients: int = 0
    shredded_records: int = 0
    prescriptions: int = 0
    dispensations: int = 0
    audit_events: int = 0
    #: The lines of each file written (an export's).
    counts: dict[str, int] = field(default_factory=dict)


class PackageError(DmpError):
    """A package that cannot be written or read back: one line naming the file."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise PackageError(f"{where}: not base64") from None


def extension_value(resource: dict[str, Any], url: str) -> Any:
    """The value of the resource's extension `url` (whatever its type), or None."""
    for extension in resource.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == url:
            for key, value in extension.items():
                if key.startswith("value"):
                    return value
    return None


def add_extension(resource: dict[str, Any], url: str, kind: str, value: Any) -> None:
    resource.setdefault("extension", []).append({"url": url, f"value{kind}": value})


def json_extension(resource: dict[str, Any], url: str, where: str) -> dict[str, Any] | None:
    """The JSON object carried as a string by extension `url`, or None."""
    text = extension_value(resource, url)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        raise PackageError(f"{where}: extension {url} is not JSON") from None
    if not isinstance(value, dict):
        raise PackageError(f"{where}: extension {url} is not a JSON object")
    return value


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def create_private(path: Path) -> BinaryIO:
    """A new file for the package, mode 0600 whatever the umask; never an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "wb")


class LineFile:
    """One file of the package written a line at a time: counted and hashed as written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.size = 0
        self._digest = hashlib.sha256()
        self._file = create_private(path)

    def write(self, value: Any) -> None:
        line = (compact(value) + "\n").encode("utf-8")
        self._file.write(line)
        self._digest.update(line)
        self.count += 1
        self.size += len(line)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._file.close()


def write_signed_manifest(directory: Path, manifest: dict[str, Any], signer: Signer) -> bytes:
    """Write `manifest.json` and its detached signature; the manifest's bytes."""
    data = (json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode()
    with create_private(directory / MANIFEST) as out:
        out.write(data)
    signature = {
        "format": FORMAT,
        "signed": MANIFEST,
        "algorithm": SIGNATURE_ALGORITHM,
        "signer": signer.principal.uri,
        "certificate": signer.credentials.cert_pem.decode("ascii"),
        "signature": b64(signer.sign(data)),
    }
    with create_private(directory / SIGNATURE) as out:
        out.write((json.dumps(signature, indent=1) + "\n").encode())
    return data


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_package(
    directory: Path, ca: x509.Certificate, crl_path: Path
) -> tuple[dict[str, Any], bytes]:
    """The manifest and its bytes, once its signature is checked (by a node's certificate
    the federation CA issued, valid and not revoked when it signed) and every file it
    lists matches its SHA-256; PackageError naming the file otherwise."""
    try:
        data = (directory / MANIFEST).read_bytes()
        signature = json.loads((directory / SIGNATURE).read_bytes())
    except OSError as exc:
        raise PackageError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except ValueError:
        raise PackageError(f"{SIGNATURE} is not JSON") from None
    try:
        manifest = json.loads(data)
        ours = manifest["extension"][MANIFEST_EXTENSION]
        region = str(ours["region"])
        when = datetime.fromisoformat(manifest["transactionTime"])
        cert = x509.load_pem_x509_certificate(signature["certificate"].encode())
        raw = unb64(signature["signature"], SIGNATURE)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PackageError(f"{MANIFEST} or {SIGNATURE} is not a package manifest") from None
    verifier = SignatureVerifier(ca, RevocationList(crl_path, ca, check_interval=0))
    der = cert.public_bytes(serialization.Encoding.DER)
    try:
        signer = verifier.verify(data, raw, der, signed_at=when)
    except DmpError as exc:
        raise PackageError(f"{MANIFEST}: its signature does not check: {exc}") from None
    if signer.uri != f"urn:dmp:node:{region}":
        raise PackageError(f"{MANIFEST} is signed by {signer.uri}, not by node {region}")
    files = ours.get("files")
    if not isinstance(files, dict) or not files:
        raise PackageError(f"{MANIFEST} lists no file")
    for name, described in files.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise PackageError(f"{name}: listed in the signed manifest but missing")
        if file_sha256(path) != described.get("sha256"):
            raise PackageError(f"{name} does not match its SHA-256 in the signed manifest")
    return manifest, data


def lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The resources of an NDJSON file of the package, with their line numbers."""
    if not path.exists():
        return
    with path.open("rb") as source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                raise PackageError(f"{path.name} line {number} is not JSON") from None
            if not isinstance(value, dict):
                raise PackageError(f"{path.name} line {number} is not a JSON object")
            yield number, value


def build_manifest(
    node: str, transaction_us: int, files: dict[str, LineFile], summary: PackageSummary
) -> dict[str, Any]:
    """The Bulk Data export manifest of the files written, with our extension."""
    resources = sorted(name for name in files if name.endswith(".ndjson"))
    output = [
        {
            "type": name.removesuffix(".ndjson"),
            "url": name,
            "count": files[name].count,
        }
        for name in resources
    ]
    ours: dict[str, Any] = {
        "format": FORMAT,
        "fhirVersion": FHIR_VERSION,
        "region": summary.region,
        "node": node,
        "records": summary.records,
        "patients": summary.patients,
        "prescriptions": summary.prescriptions,
        "dispensations": summary.dispensations,
        "audit": {
            "events": summary.audit_events,
            "checkpoints": files[CHECKPOINTS].count,
            "log": AUDIT,
            "checkpoints_file": CHECKPOINTS,
        },
        "shredded": {
            "patients": summary.shredded_patients,
            "records": summary.shredded_records,
            "note": "records of crypto-shredded patients are exported as metadata only,"
            f" marked by extension {SHREDDED}, with no Binary: their data key was destroyed"
            " after the legal retention and their content and free text can no longer be read",
        }
        if summary.shredded_patients
        else {"patients": 0, "records": 0},
        "files": {
            name: {"sha256": f.sha256, "bytes": f.size, "lines": f.count}
            for name, f in sorted(files.items())
        },
    }
    return {
        "transactionTime": iso_instant(transaction_us),
        "request": f"{node}/$export?_outputFormat=application/fhir+ndjson",
        "requiresAccessToken": False,
        "output": output,
        "error": [],
        "extension": {MANIFEST_EXTENSION: ours},
    }

"""`dmp fhir import` and `dmp fhir export`: transaction Bundles from hospital software into
a node, and a patient's whole record out as one FHIR file.

Import checks and stores each Bundle file as the gateway's ``POST /`` does
(``dmp.fhir.transaction``): all or nothing per Bundle, idempotent (importing the same files
again stores nothing), one summary of what was stored, already there, or refused and why.
Export is the patient's ``$everything`` with every content inline as a Binary
(``dmp.fhir.everything``), written to a file only its owner reads (0600).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dmp.client import NodeClient
from dmp.fhir.bundles import regions_outcome
from dmp.fhir.errors import FhirError
from dmp.fhir.everything import export_bundle
from dmp.fhir.federation import Federation, Location
from dmp.fhir.transaction import load, parse, register_patient, store
from dmp.pki import Credentials
from dmp.tls import DEFAULT_MAX_CONTENT
from dmp.v1 import patient_pb2


@dataclass
class Summary:
    files: int = 0
    stored: int = 0
    skipped: int = 0
    not_records: int = 0
    #: (file, reason) of each Bundle refused.
    refused: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"{self.files} file(s): {self.stored} record(s) stored, {self.skipped} already"
            f" stored (skipped), {len(self.refused)} Bundle(s) refused; {self.not_records}"
            " entries are not records (Patient, Binary, List, Practitioner...)"
        ]
        out.extend(f"refused {name}: {reason}" for name, reason in self.refused)
        return out


def bundle_files(path: Path) -> list[Path]:
    """The file, or every ``*.json`` under the directory (sorted, so runs are repeatable)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*.json") if p.is_file())
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such file or directory")


class Progress:
    """A one-line progress bar on a terminal (nothing when the output is not one)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.shown = total > 1 and stream.isatty()

    def step(self, done: int, name: str) -> None:
        if not self.shown:
            return
        width = 30
        filled = width * done // self.total
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] {done}/{self.total} {name[-40:]:<40}")
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def import_bundles(
    paths: list[Path],
    node: NodeClient,
    *,
    register: Callable[[patient_pb2.PatientIdentity], object] | None = None,
    max_content: int = DEFAULT_MAX_CONTENT,
    progress: Progress | None = None,
) -> Summary:
    """Check and store each Bundle file at ``node``; never stops at a refused one."""
    summary = Summary(files=len(paths))
    for done, path in enumerate(paths, start=1):
        try:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FhirError(400, "invalid", f"cannot read the file: {exc}") from None
            body = load(data)
            submission = parse(body, max_content=max_content, writer=node.signer.principal.uri)
            if register is not None:
                register_patient(register, submission)
            stored = store(node, submission)
        except FhirError as exc:
            summary.refused.append((str(path), f"{exc.diagnostics} (HTTP {exc.status})"))
        else:
            summary.stored += stored.new_count
            summary.skipped += stored.known_count
            summary.not_records += len(submission.skipped)
        if progress is not None:
            progress.step(done, path.name)
    if progress is not None:
        progress.close()
    return summary


@dataclass
class Exported:
    records: int
    resources: int
    content_bytes: int
    missing: list[str]


def export_patient(credentials: Credentials, directory: str, ins: str, out: Path) -> Exported:
    """Write the patient's $everything, content inline, to ``out`` (mode 0600)."""
    federation = Federation(directory, credentials, timeout=30)
    try:
        identity = federation.patient(ins)
        view = federation.records(ins, [])
        contents: dict[str, bytes] = {}
        for record in view.records:
            location = Location(record.id, record.region, record.patient_ins)
            contents[record.id] = b"".join(federation.content(location).chunks)
        outcome = regions_outcome(view.regions.values())
        bundle = export_bundle(identity, view.records, lambda r: contents[r.id], outcome=outcome)
    finally:
        federation.close()
    data = json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode()
    try:  # never through a link planted at --out: it would clobber the file it names
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        why = "a symbolic link: give the path of the file itself"
        raise FhirError(
            400, "invalid", f"{out}: {why if exc.errno == errno.ELOOP else exc.strerror}"
        ) from None
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)
    missing = [issue["diagnostics"] for issue in (outcome or {}).get("issue", [])]
    return Exported(
        records=len(view.records),
        resources=len(bundle.get("entry", [])),
        content_bytes=sum(len(c) for c in contents.values()),
        missing=missing,
    )

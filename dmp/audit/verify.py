"""Verification of a log against its events' hashes and its signed checkpoints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from cryptography import x509
from sqlalchemy import (
    Engine,
    Table,
    select,
)
from sqlalchemy.engine import Connection

from dmp.audit.checkpoints import CertificateCheck, Checkpoint, verify_with
from dmp.audit.events import iso_instant, summarize_fields
from dmp.audit.merkle import EMPTY_ROOT, MerkleFrontier, event_leaf_hash
from dmp.errors import DmpError, FailedPrecondition
from dmp.pki import principal_from_certificate

ProblemKind = Literal[
    "changed",
    "deleted",
    "moved",
    "truncated",
    "bad-checkpoint-signature",
    "checkpoint-root-mismatch",
]


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`verify_log`; ``seq`` is the event's (or the checkpoint's tree
    size for checkpoint problems)."""

    kind: ProblemKind
    seq: int
    message: str

    def __str__(self) -> str:
        return f"{self.kind} at seq {self.seq}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    source_id: str
    events: int
    checkpoints: int
    checkpoints_verified: int
    last_checkpoint_size: int
    problems: tuple[Problem, ...]
    problems_omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_events(self) -> int:
        """Events after the last verified checkpoint, not yet covered by a signature."""
        return max(0, self.events - self.last_checkpoint_size)


_MAX_LOCATED: Final = 500  # changed rows (and gaps) kept for the moved/changed diagnosis


def _json_string(value: str) -> str:
    """``value`` as canonical_bytes writes it (fast path for the usual plain values)."""
    if '"' not in value and "\\" not in value and value.isprintable():
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def _describe(event_json: str) -> str:
    try:
        parsed = json.loads(event_json)
    except ValueError:
        return "an event that is no longer valid JSON"
    if not isinstance(parsed, dict):
        return "an event that is no longer a JSON object"
    return summarize_fields(parsed)


def _first_source(conn: Connection, events: Table) -> str:
    for (event_json,) in conn.execute(select(events.c.event_json).order_by(events.c.seq).limit(10)):
        try:
            parsed = json.loads(event_json)
        except ValueError:
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("audit_source_id"), str):
            return str(parsed["audit_source_id"])
    return ""


# tree_size, root_hash, signed_at_us, signature, signer_cert_pem
_StoredCheckpoint = tuple[int, bytes, int, bytes, str]


def log_owner(engine: Engine, events_table: Table) -> str:
    """Whose log this is, as its first events say (``audit_source_id``); "" when empty."""
    with engine.connect() as conn:
        return _first_source(conn, events_table)


class _Checkpoints:
    """The stored checkpoints in tree-size order, read in pages in the verifier's snapshot."""

    def __init__(self, conn: Connection, table: Table, page: int = 1000) -> None:
        self._conn = conn
        self._table = table
        self._page = page
        self._buffer: list[_StoredCheckpoint] = []
        self._after = -1
        self._done = False

    def __iter__(self) -> Iterator[_StoredCheckpoint]:
        t = self._table
        while True:
            if not self._buffer:
                if self._done:
                    return
                page = [
                    (int(size), bytes(root), int(at), bytes(sig), str(pem))
                    for size, root, at, sig, pem in self._conn.execute(
                        select(
                            t.c.tree_size,
                            t.c.root_hash,
                            t.c.signed_at_us,
                            t.c.signature,
                            t.c.signer_cert_pem,
                        )
                        .where(t.c.tree_size > self._after)
                        .order_by(t.c.tree_size)
                        .limit(self._page)
                    )
                ]
                if len(page) < self._page:
                    self._done = True
                if not page:
                    return
                self._after = page[-1][0]
                self._buffer = page[::-1]
            yield self._buffer.pop()


def verify_log(
    engine: Engine,
    events_table: Table,
    checkpoints_table: Table,
    ca_pem: bytes,
    *,
    source_id: str | None = None,
    max_problems: int = 1000,
) -> VerifyReport:
    """Check a whole audit log in one pass, in one database snapshot.

    Every event's hash (content and position), the seqs (no gap from 1), the query columns
    against the JSON, every checkpoint's signature (by a certificate of the CA naming the
    log's owner: ``source_id``, by default the ``audit_source_id`` of the first events)
    and root, and that no validly signed checkpoint covers more events than the log holds.
    Problems come sorted by seq: the first is the earliest damage.
    """
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise FailedPrecondition("the CA certificate is not a PEM certificate") from None
    connection = engine.connect()
    if engine.dialect.name == "postgresql":
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
    with connection as conn, conn.begin():
        source = source_id or _first_source(conn, events_table)
        if not source:
            source = _first_signer(conn, checkpoints_table)
        verifier = _Verifier(source, ca_cert, _Checkpoints(conn, checkpoints_table))
        verifier.run(conn, events_table)
    problems = verifier.problems + _diagnose(verifier.mismatched, verifier.gaps)
    rank = {kind: index for index, kind in enumerate(get_args(ProblemKind))}
    problems.sort(key=lambda p: (p.seq, rank[p.kind]))
    return VerifyReport(
        source_id=source,
        events=verifier.events,
        checkpoints=verifier.checkpoints_seen,
        checkpoints_verified=verifier.checkpoints_verified,
        last_checkpoint_size=verifier.last_verified,
        problems=tuple(problems[:max_problems]),
        problems_omitted=max(0, len(problems) - max_problems),
    )


def _first_signer(conn: Connection, checkpoints: Table) -> str:
    pem = conn.execute(
        select(checkpoints.c.signer_cert_pem).order_by(checkpoints.c.tree_size).limit(1)
    ).scalar()
    if pem is None:
        return ""
    try:
        return principal_from_certificate(x509.load_pem_x509_certificate(pem.encode())).uri
    except (ValueError, DmpError):
        return ""


class _Verifier:
    """The state of one pass of :func:`verify_log` over the events and the checkpoints."""

    def __init__(
        self, source: str, ca_cert: x509.Certificate, checkpoints: Iterable[_StoredCheckpoint]
    ) -> None:
        self.source = source
        self.certs = CertificateCheck(ca_cert, source)
        self.checkpoints = iter(checkpoints)
        self.pending = next(self.checkpoints, None)
        self.problems: list[Problem] = []
        self.mismatched: dict[int, tuple[str, bytes]] = {}
        self.gaps: list[int] = []
        self.events = 0
        self.checkpoints_seen = 0
        self.checkpoints_verified = 0
        self.last_verified = 0

    def settle(self, position: int, root: bytes | None) -> None:
        """Judge the checkpoints up to tree size ``position``; ``root`` is the recomputed
        root at ``position`` (None behind a gap, where it cannot be recomputed)."""
        while self.pending is not None and self.pending[0] <= position:
            size, cp_root, at, signature, pem = self.pending
            self.pending = next(self.checkpoints, None)
            self.checkpoints_seen += 1
            why = verify_with(
                Checkpoint(self.source, size, cp_root, at, signature, pem.encode("ascii")),
                self.certs,
            )
            signed = f"the checkpoint of {size} events signed at {iso_instant(at)}"
            if why:
                self.problems.append(Problem("bad-checkpoint-signature", size, f"{signed}: {why}"))
            elif root is not None and size == position:
                if root == cp_root:
                    self.checkpoints_verified += 1
                    self.last_verified = size
                else:
                    self.problems.append(
                        Problem(
                            "checkpoint-root-mismatch",
                            size,
                            f"events {self.last_verified + 1}..{size} do not hash to the root of"
                            f" {signed}: one of them was altered with its hash recomputed, or"
                            " they were reordered",
                        )
                    )

    def run(self, conn: Connection, t: Table) -> None:
        # The hot loop: locals only.
        tree = MerkleFrontier()
        append = tree.append
        intact = True  # no gap so far: positions are tree indices
        expected = 1
        previous_time = 0
        source_key = '"audit_source_id":' + _json_string(self.source) if self.source else ""
        sha256 = hashlib.sha256
        json_string = _json_string
        no_more = 1 << 63
        if self.pending is not None and self.pending[0] <= 0:
            self.settle(0, EMPTY_ROOT)
        next_checkpoint = self.pending[0] if self.pending is not None else no_more
        result = conn.execution_options(yield_per=20_000).execute(
            select(
                t.c.seq,
                t.c.event_json,
                t.c.leaf_hash,
                t.c.event_date_time,
                t.c.participant_object_patient_ins,
                t.c.request_id,
            ).order_by(t.c.seq)
        )
        for rows in result.partitions():
            self.events += len(rows)
            for seq, event_json, stored, when, ins, request_id in rows:
                if seq != expected:
                    if seq < expected:
                        self.problems.append(Problem("changed", seq, f"{seq} is not a valid seq"))
                        continue
                    self._deleted(expected, seq, previous_time, when)
                    if intact:
                        self.settle(expected - 1, tree.root())
                        intact = False
                    expected = seq
                expected += 1
                previous_time = when
                leaf = bytes(stored)
                if sha256(b"\x00" + seq.to_bytes(8, "big") + event_json.encode()).digest() != leaf:
                    self._mismatch(seq, event_json, leaf)
                elif (
                    f'"event_date_time":{when},' not in event_json
                    or '"participant_object_patient_ins":' + json_string(ins) not in event_json
                    or '"request_id":' + json_string(request_id) not in event_json
                ):
                    self.problems.append(
                        Problem(
                            "changed",
                            seq,
                            "its query columns (time, patient, request id) were changed and no"
                            f" longer match the event: {_describe(event_json)}",
                        )
                    )
                elif source_key and source_key not in event_json:
                    self.problems.append(
                        Problem(
                            "changed",
                            seq,
                            f"an event of another source in the log of {self.source}:"
                            f" {_describe(event_json)}",
                        )
                    )
                if intact:  # no gap: the tree holds events 1..seq - 1
                    append(leaf)
                if seq >= next_checkpoint:
                    self.settle(seq, tree.root() if intact else None)
                    next_checkpoint = self.pending[0] if self.pending is not None else no_more
        self.finish(expected - 1)

    def _mismatch(self, seq: int, event_json: str, leaf: bytes) -> None:
        if len(self.mismatched) < _MAX_LOCATED:
            self.mismatched[seq] = (event_json, leaf)
        else:
            self.problems.append(
                Problem("changed", seq, f"event changed; it now reads {_describe(event_json)}")
            )

    def finish(self, held: int) -> None:
        """Judge the checkpoints beyond the last event (``held``): a validly signed one
        means the log was truncated."""
        while self.pending is not None:
            size, _, at, _, _ = self.pending
            before = len(self.problems)
            self.settle(size, None)
            if len(self.problems) == before:  # validly signed: the log was cut behind it
                self.problems.append(
                    Problem(
                        "truncated",
                        held + 1,
                        f"the log ends at seq {held} but the checkpoint signed at {iso_instant(at)}"
                        f" covers {size} events: events {held + 1}..{size} were removed",
                    )
                )

    def _deleted(self, expected: int, seq: int, previous_time: int, when: int) -> None:
        missing = f"event {expected}" if seq == expected + 1 else f"events {expected}..{seq - 1}"
        after = (
            f"seq {expected - 1} ({iso_instant(previous_time)})" if expected > 1 else "its start"
        )
        self.problems.append(
            Problem(
                "deleted",
                expected,
                f"{missing} deleted: the log jumps from {after} to seq {seq} ({iso_instant(when)})",
            )
        )
        room = _MAX_LOCATED - len(self.gaps)
        self.gaps.extend(range(expected, min(seq, expected + max(0, room))))


def _diagnose(mismatched: Mapping[int, tuple[str, bytes]], gaps: Sequence[int]) -> list[Problem]:
    """Tell moved events from changed ones: an event whose content hashes correctly at
    another position (a changed row or a gap) is that position's event, moved."""
    candidates = [*mismatched, *gaps]
    problems: list[Problem] = []
    for seq, (event_json, stored) in mismatched.items():
        data = event_json.encode("utf-8")
        origin = 0
        for other in candidates:
            if other == seq:
                continue
            h = event_leaf_hash(other, data)
            if h == stored or (other in mismatched and h == mismatched[other][1]):
                origin = other
                break
        if origin:
            problems.append(
                Problem(
                    "moved",
                    seq,
                    f"the event of seq {origin} was moved to seq {seq}: {_describe(event_json)}",
                )
            )
        else:
            problems.append(
                Problem("changed", seq, f"event changed; it now reads {_describe(event_json)}")
            )
    return problems

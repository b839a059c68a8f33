"""Issue 4 §6: the access policy over real mutual TLS, a directory and four nodes.

One federation serves the whole module; each test works on patients of its own (distinct
NIRs, certificates issued in this module's own PKI), so the tests do not interfere. Nodes
11, 53 and 84 run the default profession matrix; node 93 runs an operator's matrix without
physiotherapists and a clock the tests move (records hidden from the patient for 30 days).

Directives are changed the way `dmp patient ...` does it: `changed()` on the current set,
signed by the patient, sent with the patient's own certificate. A call through the
directory carries the new set to the nodes; a direct call to a node sees it within the
staleness bound (5 s), so direct checks poll with `wait_for` and never assert timings.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from directory.app import RunningDirectory
from dmp.assertion import (
    ASSERTION_KEY,
    AUDIENCE,
    MAX_LIFETIME_US,
    AssertionVerifier,
    Metadata,
    sign_assertion,
)
from dmp.cli.patient import changed
from dmp.clock import from_us, now_us
from dmp.directives import PatientDirectives, from_proto, sign_directives
from dmp.errors import InvalidArgument
from dmp.identity import Principal, Role
from dmp.ins import make_ins
from dmp.pki import CRL_FILE, Pki, RevocationList, certificate_from_pem, load_credentials
from dmp.policy import HIDDEN_FROM_PATIENT_US
from dmp.signing import SignatureVerifier, Signer
from dmp.tls import secure_channel
from dmp.v1 import access_pb2, directory_service_pb2_grpc, node_service_pb2_grpc, record_pb2
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from node.access_matrix import DEFAULT_MATRIX_PATH
from node.app import RunningNode
from tests.access_rules import (
    DENIED,
    DENTIST,
    LAYOUT,
    MIDWIFE,
    PHYSIO,
    PROFESSION_SEES,
    RULES,
    TABLE,
    THE_PATIENT,
    TREATING,
    Rule,
)
from tests.federation import (
    DOCTOR,
    LOOKUP,
    OTHER_DOCTOR,
    PATIENT,
    PHARMACIST,
    READ_CONTENT,
    READ_RECORD,
    REGIONS,
    VIEW,
    draft,
    make_pki,
    running_directory,
    running_node,
    wait_for,
)

S = dpb.RegionState
K = record_pb2
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

REVOKED = "10000000009"
EXPIRED = "10000000010"
#: Node 93 runs an operator's matrix (no physiotherapist) and the tests' clock.
SPECIAL = "93"
ALL_REGIONS = (*REGIONS, SPECIAL)
#: Enough for a node to notice a directive change made at the directory (bound: 5 s).
DIRECTIVES_WAIT = 15.0
REASON = "unconscious patient, admitted to the emergency room"

DOC = f"practitioner-{DOCTOR}"
OTHER = f"practitioner-{OTHER_DOCTOR}"
DIRECTORY = "directory"


def practitioner(rpps: str) -> str:
    return f"practitioner-{rpps}"


def patient_identity(ins: str) -> str:
    return f"patient-{ins}"


class MutableClock:
    """The node's clock: real time plus an offset the tests move."""

    def __init__(self) -> None:
        self.offset_us = 0

    def __call__(self) -> int:
        return now_us() + self.offset_us


# -- the federation -------------------------------------------------------------------------


@dataclass
class Fed:
    pki_dir: Path
    pki: Pki
    foreign: Signer
    directory: RunningDirectory
    nodes: dict[str, RunningNode]
    clock: MutableClock
    _channels: dict[tuple[str, int], grpc.Channel] = field(default_factory=dict)
    _signers: dict[str, Signer] = field(default_factory=dict)
    _patients: int = 0

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # identities and stubs

    def new_patient(self, *, not_after: datetime | None = None) -> str:
        """A patient of the test's own, with a certificate in this module's PKI."""
        self._patients += 1
        ins = make_ins(f"1800175{self._patients:06d}")
        principal = Principal(Role.PATIENT, ins, name=f"Patient {self._patients}")
        self.pki.issue(principal, not_after=not_after)
        return ins

    def unknown_patient(self) -> str:
        """An INS nobody registered, wrote for or issued a certificate to."""
        self._patients += 1
        return make_ins(f"2800175{self._patients:06d}")

    def signer(self, identity: str) -> Signer:
        if identity not in self._signers:
            self._signers[identity] = Signer(load_credentials(self.pki_dir, identity))
        return self._signers[identity]

    def _channel(self, identity: str, port: int) -> grpc.Channel:
        key = (identity, port)
        if key not in self._channels:
            creds = load_credentials(self.pki_dir, identity)
            self._channels[key] = secure_channel(f"127.0.0.1:{port}", creds)
        return self._channels[key]

    def node(self, identity: str, region: str) -> node_service_pb2_grpc.NodeServiceStub:
        return node_service_pb2_grpc.NodeServiceStub(
            self._channel(identity, self.nodes[region].port)
        )

    def dir(self, identity: str) -> directory_service_pb2_grpc.DirectoryServiceStub:
        return directory_service_pb2_grpc.DirectoryServiceStub(
            self._channel(identity, self.directory.port)
        )

    def md(
        self,
        identity: str,
        ins: str,
        emergency: str | None = None,
        *,
        op: access_pb2.Operation.ValueType = VIEW,
        record_id: str = "",
    ) -> Metadata:
        """A fresh assertion signed by `identity` (CARE, SELF or EMERGENCY with a reason)
        for operation `op` (a view or list by default), on `record_id` for a record read."""
        if emergency is not None:
            return sign_assertion(
                self.signer(identity),
                ins,
                access_pb2.PURPOSE_EMERGENCY,
                emergency,
                operation=op,
                record_id=record_id,
            )
        return sign_assertion(self.signer(identity), ins, operation=op, record_id=record_id)

    # records

    def put(
        self,
        region: str,
        record: record_pb2.Record,
        author: str = DOC,
        content: bytes = b"content",
    ) -> record_pb2.Record:
        request = npb.PutRecordRequest(record=record, content=content)
        return self.node(author, region).PutRecord(request, timeout=10).record

    def wait_fragments(self, ins: str, counts: dict[str, int]) -> None:
        def located() -> bool:
            found = {f.region: f.record_count for f in self.directory.index.fragments(ins)}
            return found == counts

        wait_for(located, f"the directory to locate {counts} for {ins}")

    # reads

    def view(
        self, identity: str, ins: str, emergency: str | None = None, page_size: int = 1000
    ) -> dpb.GetConsolidatedViewResponse:
        request = dpb.GetConsolidatedViewRequest(patient_ins=ins, page_size=page_size)
        return self.dir(identity).GetConsolidatedView(
            request, metadata=self.md(identity, ins, emergency), timeout=10
        )

    def get_patient(
        self, identity: str, ins: str, emergency: str | None = None
    ) -> dpb.GetPatientResponse:
        return self.dir(identity).GetPatient(
            dpb.GetPatientRequest(ins=ins),
            metadata=self.md(identity, ins, emergency, op=LOOKUP),
            timeout=10,
        )

    def listed(
        self, identity: str, region: str, ins: str, emergency: str | None = None
    ) -> list[record_pb2.Record]:
        request = npb.ListRecordsRequest(patient_ins=ins, page_size=1000)
        return list(
            self.node(identity, region)
            .ListRecords(request, metadata=self.md(identity, ins, emergency), timeout=10)
            .records
        )

    def listed_ids(
        self, identity: str, region: str, ins: str, emergency: str | None = None
    ) -> set[str] | None:
        """The ids a direct ListRecords returns, or None when it is refused."""
        try:
            return {r.id for r in self.listed(identity, region, ins, emergency)}
        except grpc.RpcError:
            return None

    def get_record(self, identity: str, region: str, ins: str, record_id: str) -> None:
        self.node(identity, region).GetRecord(
            npb.GetRecordRequest(record_id=record_id),
            metadata=self.md(identity, ins, op=READ_RECORD, record_id=record_id),
            timeout=10,
        )

    def fetch(self, identity: str, ins: str, record: record_pb2.Record) -> bytes:
        chunks = self.dir(identity).FetchRecordContent(
            dpb.FetchRecordContentRequest(record_id=record.id, region=record.region),
            metadata=self.md(identity, ins, op=READ_CONTENT, record_id=record.id),
            timeout=10,
        )
        return b"".join(c.chunk for c in chunks)

    # directives, as `dmp patient ...` sets them

    def set_directives(self, ins: str, change: str, target: str = "") -> PatientDirectives:
        identity = patient_identity(ins)
        stub = self.dir(identity)
        answer = stub.GetDirectives(dpb.GetDirectivesRequest(patient_ins=ins), timeout=10)
        current = (
            from_proto(access_pb2.Directives.FromString(answer.directives.directives))
            if answer.HasField("directives")
            else PatientDirectives(ins)
        )
        new = changed(current, change, target)
        signed = sign_directives(self.signer(identity), new)
        stub.SetDirectives(dpb.SetDirectivesRequest(directives=signed), timeout=10)
        return new


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    root = tmp_path_factory.mktemp("access-policy")
    pki_dir = root / "pki"
    pki = make_pki(pki_dir)
    pki.issue_node(SPECIAL)
    for rpps, profession, name in (
        (MIDWIFE, "midwife", "Anne SAGE"),
        (DENTIST, "dentist", "Dr Luc DENT"),
        (PHYSIO, "physiotherapist", "Eric KINE"),
        (TREATING, "doctor", "Dr Alice TRAITANT"),
        (REVOKED, "doctor", "Dr Rene REVOQUE"),
    ):
        pki.issue_practitioner(rpps, profession, name)
    now = datetime.now(UTC)
    pki.issue(
        Principal(Role.PRACTITIONER, EXPIRED, name="Dr Old EXPIRE", profession="doctor"),
        not_before=now - timedelta(days=400),
        not_after=now - timedelta(days=1),
    )
    # Another CA (same names as ours) issuing a certificate to our doctor's identity.
    foreign = Pki.init(root / "foreign")
    foreign.issue_practitioner(DOCTOR, "doctor", "Dr Claire MARTIN")
    matrix = json.loads(DEFAULT_MATRIX_PATH.read_text())
    del matrix["professions"]["physiotherapist"]
    matrix_path = root / "matrix-without-physiotherapists.json"
    matrix_path.write_text(json.dumps(matrix))
    clock = MutableClock()
    with ExitStack() as stack:
        directory = stack.enter_context(
            running_directory(pki_dir, f"sqlite:///{root / 'directory.db'}", health_interval=0.2)
        )
        nodes: dict[str, RunningNode] = {}
        for region in ALL_REGIONS:
            special: dict[str, Any] = (
                {"access_matrix": matrix_path, "clock": clock} if region == SPECIAL else {}
            )
            nodes[region] = stack.enter_context(
                running_node(
                    pki_dir,
                    region,
                    f"sqlite:///{root / f'node-{region}.db'}",
                    directory=f"127.0.0.1:{directory.port}",
                    **special,
                )
            )
        federation = Fed(
            pki_dir,
            pki,
            Signer(load_credentials(root / "foreign", practitioner(DOCTOR))),
            directory,
            nodes,
            clock,
        )
        stack.callback(federation.close)
        wait_for(
            lambda: len([r for r in directory.discovery.routes().values() if r.healthy]) == 4,
            "4 healthy nodes",
        )
        yield federation


# -- helpers --------------------------------------------------------------------------------


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def answer_of(call: Callable[[], object]) -> str:
    """The status and message of a call, for polling on the reason of a refusal."""
    try:
        call()
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def eventually(call: Callable[[], object], code: grpc.StatusCode, what: str) -> None:
    wait_for(lambda: code_of(call) == code, what, timeout=DIRECTIVES_WAIT)


def check_view(view: dpb.GetConsolidatedViewResponse, expected: set[str]) -> None:
    """Exactly the expected records; every region answered and counted only what it gave."""
    assert sorted(r.id for r in view.records) == sorted(expected)
    given = Counter(r.region for r in view.records)
    for status in view.regions:
        assert status.state == S.REGION_STATE_ANSWERED, status.message
        assert status.record_count == given[status.region], status.region


def record(
    ins: str,
    record_id: str,
    kind: record_pb2.RecordKind.ValueType = K.RECORD_KIND_DOCUMENT,
    code: str = "11488-4",
    title: str = "Compte rendu de consultation",
    *,
    hidden: bool = False,
) -> record_pb2.Record:
    r = draft(ins, kind=kind, code=code, title=title, record_id=record_id)
    r.hidden_from_patient = hidden
    return r


@dataclass(frozen=True)
class Use:
    """What an assertion is signed for: an operation, and the record of a record read."""

    operation: access_pb2.Operation.ValueType = VIEW
    record_id: str = ""


def forge(
    signer: Signer,
    ins: str,
    *,
    subject: str | None = None,
    purpose: access_pb2.Purpose.ValueType = access_pb2.PURPOSE_CARE,
    reason: str = "",
    issued_us: int | None = None,
    lifetime_us: int = 60_000_000,
    audience: str = AUDIENCE,
    nonce: bytes | None = None,
    use: Use | None = None,
) -> Metadata:
    """An assertion built by hand, signed by `signer` with its own certificate."""
    issued = now_us() if issued_us is None else issued_us
    assertion = access_pb2.AccessAssertion(
        subject=signer.principal.uri if subject is None else subject,
        patient_ins=ins,
        purpose=purpose,
        reason=reason,
        issued_at=from_us(issued),
        expires_at=from_us(issued + lifetime_us),
        nonce=os.urandom(16) if nonce is None else nonce,
        audience=audience,
        operation=(use or Use()).operation,
        record_id=(use or Use()).record_id,
    )
    payload = assertion.SerializeToString()
    signed = access_pb2.SignedAssertion(
        assertion=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )
    return ((ASSERTION_KEY, signed.SerializeToString()),)


def signed_of(md: Metadata) -> access_pb2.SignedAssertion:
    [(key, value)] = md
    assert key == ASSERTION_KEY and isinstance(value, bytes)
    return access_pb2.SignedAssertion.FromString(value)


def resigned(md: Metadata, key: Signer) -> Metadata:
    """The same assertion and certificate, the signature made by another key."""
    signed = signed_of(md)
    signed.signature = key.sign(signed.assertion)
    return ((ASSERTION_KEY, signed.SerializeToString()),)


def altered(md: Metadata) -> Metadata:
    """The assertion changed after it was signed (signature and certificate kept)."""
    signed = signed_of(md)
    assertion = access_pb2.AccessAssertion.FromString(signed.assertion)
    assertion.purpose = access_pb2.PURPOSE_EMERGENCY
    assertion.reason = "added after signing"
    signed.assertion = assertion.SerializeToString()
    return ((ASSERTION_KEY, signed.SerializeToString()),)


# -- 1. the profession matrix: each profession against each kind ------------------------------


@dataclass(frozen=True)
class Table:
    ins: str
    records: dict[str, record_pb2.Record]


@pytest.fixture(scope="module")
def table(fed: Fed) -> Table:
    ins = fed.new_patient()
    records = {}
    for name, (kind, code, region) in TABLE.items():
        author = patient_identity(ins) if kind == K.RECORD_KIND_PATIENT_NOTE else DOC
        records[name] = fed.put(region, record(ins, f"t-{name}", kind, code, name), author)
    fed.wait_fragments(ins, {"11": 6, "53": 5})
    return Table(ins, records)


@pytest.mark.parametrize(
    ("who", "sees"), [pytest.param(who, sees, id=who[0]) for who, sees in PROFESSION_SEES.items()]
)
def test_each_profession_reads_the_kinds_of_the_default_matrix(
    fed: Fed, table: Table, who: tuple[str, str], sees: set[str]
) -> None:
    profession, rpps = who
    if rpps == THE_PATIENT:
        identity = patient_identity(table.ins)
    else:
        identity = practitioner(rpps)
        assert fed.signer(identity).principal.profession == profession
    expected = {table.records[name].id for name in sees}
    check_view(fed.view(identity, table.ins), expected)
    at_nodes = fed.listed_ids(identity, "11", table.ins) or set()
    at_nodes |= fed.listed_ids(identity, "53", table.ins) or set()
    assert at_nodes == expected
    for name, stored in table.records.items():
        wanted = OK if name in sees else NOT_FOUND
        got = code_of(partial(fed.get_record, identity, stored.region, table.ins, stored.id))
        assert got == wanted, f"GetRecord {name}"
        got = code_of(partial(fed.fetch, identity, table.ins, stored))
        assert got == wanted, f"FetchRecordContent {name}"


def test_a_view_counts_only_what_it_returns_page_after_page(fed: Fed, table: Table) -> None:
    identity = practitioner(PHARMACIST)
    request = dpb.GetConsolidatedViewRequest(patient_ins=table.ins, page_size=1)
    seen: list[str] = []
    while True:
        page = fed.dir(identity).GetConsolidatedView(
            request, metadata=fed.md(identity, table.ins), timeout=10
        )
        assert len(page.records) <= 1
        assert sum(s.record_count for s in page.regions) == len(page.records)
        for status in page.regions:
            assert status.state == S.REGION_STATE_ANSWERED
            assert status.record_count == sum(1 for r in page.records if r.region == status.region)
        seen += [r.id for r in page.records]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    readable = PROFESSION_SEES["pharmacist", PHARMACIST]
    assert sorted(seen) == sorted(table.records[name].id for name in readable)


# -- 1. the patient's directives, emergency, each rule as a row -----------------------------


@pytest.mark.parametrize("rule", [pytest.param(r, id=r.name) for r in RULES])
def test_directive_rules(fed: Fed, rule: Rule) -> None:
    ins = fed.new_patient()
    ids = {}
    for name, (region, kind, code) in LAYOUT.items():
        ids[name] = fed.put(region, record(ins, f"{name}-{ins}", kind, code, name)).id
    fed.wait_fragments(ins, {"11": 1, "53": 1, "84": 1})
    directives = PatientDirectives(ins)
    for change, target in rule.changes:
        directives = fed.set_directives(ins, change, ids.get(target, target))
    me = patient_identity(ins)
    # The patient reads everything whatever the directives (and the view carries them).
    check_view(fed.view(me, ins), set(ids.values()))

    caller = me if rule.caller == THE_PATIENT else practitioner(rule.caller)
    emergency = REASON if rule.emergency else None
    if rule.sees is None:
        for call in (
            lambda: fed.view(caller, ins, emergency),
            lambda: fed.get_patient(caller, ins, emergency),
        ):
            assert code_of(call) == PERMISSION_DENIED
        for region in ALL_REGIONS:
            eventually(
                partial(fed.listed, caller, region, ins, emergency),
                PERMISSION_DENIED,
                f"node {region} to refuse {rule.caller}",
            )
    else:
        expected = {ids[name] for name in rule.sees}
        view = fed.view(caller, ins, emergency)
        check_view(view, expected)
        masked = {ids[name] for name in LAYOUT if ids[name] in directives.masked_record_ids}
        assert {r.id for r in view.records if r.masked} == masked & expected

        def node_gives(region: str, wanted: set[str]) -> bool:
            return fed.listed_ids(caller, region, ins, emergency) == wanted

        for name, (region, _, _) in LAYOUT.items():
            wanted = {ids[name]} & expected
            wait_for(
                partial(node_gives, region, wanted),
                f"node {region} to give {rule.caller} {wanted or 'nothing'}",
                timeout=DIRECTIVES_WAIT,
            )
    # Writing: the caller's own write, with an id already taken, so that nothing is stored.
    kind = K.RECORD_KIND_PATIENT_NOTE if caller == me else K.RECORD_KIND_DOCUMENT
    attempt = record(ins, ids["doc"], kind, "51855-5", "a new entry")
    eventually(lambda: fed.put("11", attempt, caller), rule.write, f"the write to be {rule.write}")


def test_a_node_fetches_a_change_itself_within_the_staleness_bound(fed: Fed) -> None:
    """No call through the directory carries the new directives: the node asks for them."""
    ins = fed.new_patient()
    doc = fed.put("84", record(ins, f"fetched-{ins}"))
    assert fed.listed_ids(DOC, "84", ins) == {doc.id}  # the node holds the current set
    fed.set_directives(ins, "block", DOCTOR)
    eventually(partial(fed.listed, DOC, "84", ins), DENIED, "node 84 to fetch the new set")
    assert fed.listed_ids(OTHER, "84", ins) == {doc.id}


def test_only_the_patient_reads_and_sets_their_directives(fed: Fed) -> None:
    ins, neighbour = fed.new_patient(), fed.new_patient()
    me, them = patient_identity(ins), patient_identity(neighbour)
    fed.set_directives(ins, "block", OTHER_DOCTOR)
    request = dpb.GetDirectivesRequest(patient_ins=ins)
    signed = fed.dir(me).GetDirectives(request, timeout=10).directives
    current = from_proto(access_pb2.Directives.FromString(signed.directives))
    assert (current.version, current.blocked_rpps) == (1, frozenset({OTHER_DOCTOR}))
    for identity in (DOC, OTHER, them, DIRECTORY):
        err = refusal(partial(fed.dir(identity).GetDirectives, request, timeout=10))
        assert err.code() == DENIED, identity

    def send(identity: str, directives: access_pb2.SignedDirectives) -> grpc.StatusCode:
        change = dpb.SetDirectivesRequest(directives=directives)
        return code_of(partial(fed.dir(identity).SetDirectives, change, timeout=10))

    unblock = changed(current, "unblock", OTHER_DOCTOR)
    # Signed by the patient but sent by someone else; signed by someone else.
    assert send(OTHER, sign_directives(fed.signer(me), unblock)) == DENIED
    assert send(them, sign_directives(fed.signer(me), unblock)) == INVALID_ARGUMENT
    assert send(me, sign_directives(fed.signer(OTHER), unblock)) == UNAUTHENTICATED
    assert send(me, sign_directives(fed.signer(them), unblock)) == UNAUTHENTICATED
    assert code_of(partial(fed.view, OTHER, ins)) == DENIED  # still blocked


# -- closed record: nothing new is written ----------------------------------------------------


def test_a_closed_record_is_read_but_takes_no_new_record(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    doc = fed.put("11", record(ins, f"closed-doc-{ins}"))
    rx = fed.put("53", record(ins, f"closed-rx-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    note = fed.put("53", record(ins, f"closed-note-{ins}", K.RECORD_KIND_PATIENT_NOTE), me)
    fed.wait_fragments(ins, {"11": 1, "53": 2})
    # Polled with a write the store refuses anyway (it supersedes no record of this node):
    # nothing is stored while a node still holds the previous directives.
    orphan = record(ins, f"orphan-{ins}")
    orphan.supersedes = f"nothing-{ins}"
    assert "no such record" in answer_of(lambda: fed.put("11", orphan))  # the check lets it by
    fed.set_directives(ins, "close")
    check_view(fed.view(me, ins), {doc.id, rx.id, note.id})  # carries the new set along

    def closed_at(region: str) -> bool:
        return "record is closed" in answer_of(partial(fed.put, region, orphan))

    for region in ALL_REGIONS:
        wait_for(
            partial(closed_at, region),
            f"node {region} to know the record is closed",
            timeout=DIRECTIVES_WAIT,
        )
    for region in ALL_REGIONS:
        err = refusal(partial(fed.put, region, record(ins, f"late-{region}-{ins}")))
        assert err.code() == FAILED_PRECONDITION
        assert "closed" in (err.details() or "")
    new_note = record(ins, f"late-note-{ins}", K.RECORD_KIND_PATIENT_NOTE)
    assert code_of(lambda: fed.put("53", new_note, me)) == FAILED_PRECONDITION
    newer = record(ins, f"closed-doc-v2-{ins}")
    newer.supersedes = doc.id
    assert code_of(lambda: fed.put("11", newer)) == FAILED_PRECONDITION
    # Everything stays readable, and nothing was added.
    everything = {doc.id, rx.id, note.id}
    check_view(fed.view(DOC, ins), everything)
    check_view(fed.view(me, ins), everything)
    listed = (fed.listed_ids(DOC, "11", ins) or set()) | (fed.listed_ids(DOC, "53", ins) or set())
    assert listed == everything
    counts = {f.region: f.record_count for f in fed.directory.index.fragments(ins)}
    assert counts == {"11": 1, "53": 2}
    # Reopened, the record takes new records again.
    fed.set_directives(ins, "reopen")
    check_view(fed.view(me, ins), everything)
    wait_for(
        lambda: "no such record" in answer_of(lambda: fed.put("11", orphan)),
        "node 11 to know the record is reopened",
        timeout=DIRECTIVES_WAIT,
    )
    assert fed.put("11", record(ins, f"reopened-{ins}")).id == f"reopened-{ins}"


# -- masked documents, by every path ----------------------------------------------------------


def test_a_masked_document_is_found_by_no_path_of_another_doctor(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    masked = fed.put("53", record(ins, f"masked-{ins}", title="Compte rendu psychiatrique"), DOC)
    plain = fed.put("53", record(ins, f"plain-{ins}"), OTHER)
    fed.wait_fragments(ins, {"53": 2})
    # Before the mask, the other doctor sees it: the refusals below come from the mask.
    assert fed.fetch(OTHER, ins, masked) == b"content"
    fed.set_directives(ins, "set-treating", TREATING)
    fed.set_directives(ins, "mask", masked.id)
    view = fed.view(OTHER, ins)
    check_view(view, {plain.id})
    assert "psychiatrique" not in str(view)
    assert code_of(lambda: fed.fetch(OTHER, ins, masked)) == NOT_FOUND
    wait_for(
        lambda: fed.listed_ids(OTHER, "53", ins) == {plain.id},
        "node 53 to apply the mask",
        timeout=DIRECTIVES_WAIT,
    )
    assert code_of(lambda: fed.get_record(OTHER, "53", ins, masked.id)) == NOT_FOUND
    for identity in (DOC, practitioner(TREATING), me):  # author, treating physician, patient
        check_view(fed.view(identity, ins), {masked.id, plain.id})
        assert fed.fetch(identity, ins, masked) == b"content"
        shown = {r.id: r.masked for r in fed.listed(identity, "53", ins)}
        assert shown == {masked.id: True, plain.id: False}


def test_a_mask_covers_every_version_of_the_record(fed: Fed) -> None:
    ins = fed.new_patient()
    first = fed.put("11", record(ins, f"mv1-{ins}", title="Compte rendu v1"), DOC)
    fed.set_directives(ins, "mask", first.id)
    second = record(ins, f"mv2-{ins}", title="Compte rendu v2")
    second.supersedes = first.id
    fed.put("11", second, DOC)
    plain = fed.put("11", record(ins, f"mvp-{ins}"), DOC)
    fed.wait_fragments(ins, {"11": 3})
    include = dpb.GetConsolidatedViewRequest(patient_ins=ins, include_superseded=True)
    view = fed.dir(OTHER).GetConsolidatedView(include, metadata=fed.md(OTHER, ins), timeout=10)
    check_view(view, {plain.id})  # neither version of the masked record
    mine = fed.dir(patient_identity(ins)).GetConsolidatedView(
        include, metadata=fed.md(patient_identity(ins), ins), timeout=10
    )
    assert {r.id: r.masked for r in mine.records} == {
        first.id: True,
        f"mv2-{ins}": True,
        plain.id: False,
    }


# -- hidden from the patient until revealed, or 30 days -----------------------------------


def test_hidden_from_the_patient_until_its_author_reveals_it(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    result = fed.put("11", record(ins, f"result-{ins}", code="11502-2", hidden=True))
    other = fed.put("11", record(ins, f"visible-{ins}"))
    fed.wait_fragments(ins, {"11": 2})
    check_view(fed.view(me, ins), {other.id})
    assert fed.listed_ids(me, "11", ins) == {other.id}
    assert code_of(lambda: fed.get_record(me, "11", ins, result.id)) == NOT_FOUND
    assert code_of(lambda: fed.fetch(me, ins, result)) == NOT_FOUND
    for identity in (DOC, OTHER):  # hidden from the patient only
        check_view(fed.view(identity, ins), {result.id, other.id})
    # Only its author reveals it.
    for identity in (OTHER, me, DIRECTORY):
        reveal = fed.node(identity, "11").RevealRecord
        err = refusal(partial(reveal, npb.RevealRecordRequest(record_id=result.id), timeout=10))
        assert err.code() == NOT_FOUND, identity
    check_view(fed.view(me, ins), {other.id})
    revealed = (
        fed.node(DOC, "11")
        .RevealRecord(npb.RevealRecordRequest(record_id=result.id), timeout=10)
        .record
    )
    assert revealed.HasField("revealed_time")
    check_view(fed.view(me, ins), {result.id, other.id})
    assert fed.listed_ids(me, "11", ins) == {result.id, other.id}
    assert fed.fetch(me, ins, result) == b"content"


def test_hidden_from_the_patient_shows_after_30_days(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    result = fed.put(SPECIAL, record(ins, f"result30-{ins}", code="11502-2", hidden=True))
    other = fed.put(SPECIAL, record(ins, f"other30-{ins}"))
    fed.wait_fragments(ins, {SPECIAL: 2})
    try:
        check_view(fed.view(me, ins), {other.id})
        fed.clock.offset_us = HIDDEN_FROM_PATIENT_US - 3600 * 1_000_000  # an hour short
        check_view(fed.view(me, ins), {other.id})
        assert fed.listed_ids(me, SPECIAL, ins) == {other.id}
        fed.clock.offset_us = HIDDEN_FROM_PATIENT_US + 60 * 1_000_000
        check_view(fed.view(me, ins), {result.id, other.id})
        assert fed.listed_ids(me, SPECIAL, ins) == {result.id, other.id}
        assert fed.fetch(me, ins, result) == b"content"
    finally:
        fed.clock.offset_us = 0


# -- emergency --------------------------------------------------------------------------------


def test_an_emergency_access_is_granted_and_carried_as_such(fed: Fed) -> None:
    ins = fed.new_patient()
    doc = fed.put("84", record(ins, f"er-{ins}"))
    fed.wait_fragments(ins, {"84": 1})
    md = fed.md(OTHER, ins, REASON)
    ca = certificate_from_pem(load_credentials(fed.pki_dir, OTHER).ca_pem)
    verifier = AssertionVerifier(SignatureVerifier(ca, RevocationList(fed.pki_dir / CRL_FILE, ca)))
    verified = verifier.verify(md, VIEW)  # what the servers see
    assert verified.emergency and verified.purpose_name == "EMERGENCY"
    assert verified.reason == REASON
    view = fed.dir(OTHER).GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=ins), metadata=md, timeout=10
    )
    check_view(view, {doc.id})
    # The helper sign_assertion itself refuses an emergency without a reason.
    with pytest.raises(InvalidArgument, match="reason"):
        sign_assertion(fed.signer(OTHER), ins, access_pb2.PURPOSE_EMERGENCY, " ", operation=VIEW)


# -- the patient's own access -----------------------------------------------------------------


def test_a_patient_reads_their_own_record_and_no_one_elses(fed: Fed) -> None:
    ins, neighbour, unknown = fed.new_patient(), fed.new_patient(), fed.unknown_patient()
    me = patient_identity(ins)
    mine = fed.put("11", record(ins, f"mine-{ins}"))
    theirs = fed.put("11", record(neighbour, f"theirs-{neighbour}"))
    fed.wait_fragments(ins, {"11": 1})
    fed.wait_fragments(neighbour, {"11": 1})
    check_view(fed.view(me, ins), {mine.id})
    assert fed.listed_ids(me, "11", ins) == {mine.id}
    details: dict[str, set[str]] = {}
    for target in (neighbour, unknown):  # a patient who exists, one who does not
        for signed_for in (target, ins):  # an assertion for them, or for myself
            md = partial(fed.md, me, signed_for)  # a fresh one for each call
            calls: dict[str, Callable[[], object]] = {
                "view": partial(
                    fed.dir(me).GetConsolidatedView,
                    dpb.GetConsolidatedViewRequest(patient_ins=target),
                    metadata=md(),
                    timeout=10,
                ),
                "patient": partial(
                    fed.dir(me).GetPatient,
                    dpb.GetPatientRequest(ins=target),
                    metadata=md(),
                    timeout=10,
                ),
                "node": partial(
                    fed.node(me, "11").ListRecords,
                    npb.ListRecordsRequest(patient_ins=target),
                    metadata=md(),
                    timeout=10,
                ),
            }
            for name, call in calls.items():
                err = refusal(call)
                assert err.code() == PERMISSION_DENIED, (name, target, signed_for)
                details.setdefault(f"{name}-{signed_for == ins}", set()).add(err.details() or "")
    # Same answer whether the other patient exists or not.
    assert all(len(answers) == 1 for answers in details.values()), details
    # Someone else's record by id, with my own assertion: not among what I may see.
    assert code_of(lambda: fed.get_record(me, "11", ins, theirs.id)) == NOT_FOUND
    assert code_of(lambda: fed.fetch(me, ins, theirs)) == NOT_FOUND


def test_patient_notes_are_written_by_the_patient_in_their_own_record(fed: Fed) -> None:
    ins, neighbour = fed.new_patient(), fed.new_patient()
    me = patient_identity(ins)
    note = fed.put("53", record(ins, f"note-{ins}", K.RECORD_KIND_PATIENT_NOTE, "51855-5"), me)
    assert note.author.identity == f"urn:dmp:patient:{ins}"
    fed.wait_fragments(ins, {"53": 1})
    check_view(fed.view(DOC, ins), {note.id})
    check_view(fed.view(practitioner(PHARMACIST), ins), set())
    refused_writes: list[tuple[str, record_pb2.Record]] = [
        (me, record(neighbour, f"note-{neighbour}", K.RECORD_KIND_PATIENT_NOTE, "51855-5")),
        (me, record(ins, f"doc-by-patient-{ins}")),
        (me, record(ins, f"rx-by-patient-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6")),
        (DOC, record(ins, f"note-by-doctor-{ins}", K.RECORD_KIND_PATIENT_NOTE, "51855-5")),
        (DIRECTORY, record(ins, f"by-directory-{ins}")),
        ("node-11", record(ins, f"by-node-{ins}")),
    ]
    for writer, attempt in refused_writes:
        err = refusal(partial(fed.put, "53", attempt, writer))
        assert err.code() == PERMISSION_DENIED, (writer, attempt.id)

    def ingest() -> object:
        stream = iter([npb.IngestRecordsRequest(put=npb.PutRecordRequest(
            record=record(ins, f"ingested-by-patient-{ins}"), content=b"x"))])  # fmt: skip
        return fed.node(me, "53").IngestRecords(stream, timeout=10)

    assert code_of(ingest) == PERMISSION_DENIED
    check_view(fed.view(me, ins), {note.id})


# -- 2. each way an assertion can be wrong -------------------------------------------------

Build = Callable[[Fed, str, Use], Metadata]


def _valid(fed: Fed, ins: str, use: Use) -> Metadata:
    return fed.md(DOC, ins, op=use.operation, record_id=use.record_id)


def _exactly_five_minutes(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, lifetime_us=MAX_LIFETIME_US)


def _emergency(fed: Fed, ins: str, use: Use) -> Metadata:
    return fed.md(DOC, ins, REASON, op=use.operation, record_id=use.record_id)


def _another_key(fed: Fed, ins: str, use: Use) -> Metadata:
    return resigned(fed.md(DOC, ins, op=use.operation, record_id=use.record_id), fed.signer(OTHER))


def _altered(fed: Fed, ins: str, use: Use) -> Metadata:
    return altered(fed.md(DOC, ins, op=use.operation, record_id=use.record_id))


def _subject_not_signer(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, subject=f"urn:dmp:practitioner:{OTHER_DOCTOR}")


def _expired(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(
        fed.signer(DOC), ins, use=use, issued_us=now_us() - 400_000_000, lifetime_us=120_000_000
    )


def _slow_clock(fed: Fed, ins: str, use: Use) -> Metadata:
    """Signed "now" by a client whose clock is 2 minutes behind, for 60 s."""
    return forge(fed.signer(DOC), ins, use=use, issued_us=now_us() - 120_000_000)


def _too_long(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, lifetime_us=MAX_LIFETIME_US + 1_000_000)


def _future(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, issued_us=now_us() + 300_000_000)


def _another_patient(fed: Fed, ins: str, use: Use) -> Metadata:
    return fed.md(DOC, PATIENT, op=use.operation, record_id=use.record_id)


def _audience(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, audience="urn:dmp:elsewhere")


def _emergency_without_reason(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, purpose=access_pb2.PURPOSE_EMERGENCY, reason="  ")


def _no_purpose(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, purpose=access_pb2.PURPOSE_UNSPECIFIED)


def _patient_care(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(patient_identity(ins)), ins, use=use, purpose=access_pb2.PURPOSE_CARE)


def _professional_self(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, purpose=access_pb2.PURPOSE_SELF)


def _short_nonce(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, nonce=os.urandom(8))


def _malformed(fed: Fed, ins: str, use: Use) -> Metadata:
    return ((ASSERTION_KEY, b"\xff\x00 not a SignedAssertion"),)


def _missing(fed: Fed, ins: str, use: Use) -> Metadata:
    return ()


def _foreign(fed: Fed, ins: str, use: Use) -> Metadata:
    return sign_assertion(fed.foreign, ins, operation=use.operation, record_id=use.record_id)


def _expired_certificate(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(practitioner(EXPIRED)), ins, use=use)


def _directory_signs(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DIRECTORY), ins, use=use)


def _node_signs(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer("node-53"), ins, use=use)


@dataclass(frozen=True)
class Wrong:
    name: str
    build: Build
    #: Who carries it to node 11 and to the directory (THE_PATIENT: the test's patient).
    to_node: str
    to_directory: str | None
    code: grpc.StatusCode
    #: A word of the refusal that says why.
    why: str = ""


UA = UNAUTHENTICATED
WRONG = [
    # Right ones first: the path works, so the refusals below come from the assertion.
    Wrong("valid", _valid, DOC, DOC, OK),
    Wrong("valid-relayed-by-the-directory", _valid, DIRECTORY, None, OK),
    Wrong("lifetime-exactly-5-minutes", _exactly_five_minutes, DOC, DOC, OK),
    Wrong("emergency-with-a-reason", _emergency, DOC, DOC, OK),
    Wrong("signed-by-another-key", _another_key, DOC, DOC, UA, "signature"),
    Wrong("changed-after-signing", _altered, DOC, DOC, UA, "signature"),
    Wrong("subject-is-not-the-signer", _subject_not_signer, DOC, DOC, UA, "someone else"),
    Wrong("client-clock-2-minutes-slow", _slow_clock, DOC, DOC, OK),
    Wrong("expired", _expired, DOC, DOC, UA, "check your clock"),
    Wrong("lives-over-5-minutes", _too_long, DOC, DOC, UA, "5 minutes"),
    Wrong("issued-in-the-future", _future, DOC, DOC, UA, "future"),
    Wrong("for-another-patient", _another_patient, DOC, DOC, DENIED, "another patient"),
    Wrong("audience-wrong", _audience, DOC, DOC, UA, "elsewhere"),
    Wrong("emergency-without-reason", _emergency_without_reason, DOC, DOC, UA, "reason"),
    Wrong("no-purpose", _no_purpose, DOC, DOC, UA, "purpose"),
    Wrong("patient-signs-care", _patient_care, THE_PATIENT, THE_PATIENT, UA, "SELF"),
    Wrong("professional-signs-self", _professional_self, DOC, DOC, UA, "SELF"),
    Wrong("nonce-too-short", _short_nonce, DOC, DOC, UA, "malformed"),
    Wrong("malformed", _malformed, DOC, DOC, UA, "malformed"),
    Wrong("missing", _missing, DOC, DOC, UA, "no access assertion"),
    Wrong("certificate-of-another-ca", _foreign, DOC, DOC, UA, "federation CA"),
    Wrong("certificate-expired", _expired_certificate, DIRECTORY, DOC, UA, "valid now"),
    Wrong("someone-elses-assertion", _valid, OTHER, OTHER, DENIED, "its signer"),
    Wrong("relayed-by-a-node", _valid, "node-53", "node-53", DENIED, "its signer"),
    Wrong("directory-identity-alone", _missing, DIRECTORY, DIRECTORY, UA, "no access"),
    Wrong("signed-by-the-directory", _directory_signs, DIRECTORY, DIRECTORY, UA, "only"),
    Wrong("signed-by-a-node", _node_signs, "node-53", "node-53", UA, "only"),
]


@dataclass(frozen=True)
class Target:
    ins: str
    doc: record_pb2.Record
    rx: record_pb2.Record


@pytest.fixture(scope="module")
def target(fed: Fed) -> Target:
    ins = fed.new_patient()
    doc = fed.put("11", record(ins, f"target-doc-{ins}"))
    rx = fed.put("53", record(ins, f"target-rx-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    fed.wait_fragments(ins, {"11": 1, "53": 1})
    return Target(ins, doc, rx)


def _carrier(who: str, ins: str) -> str:
    return patient_identity(ins) if who == THE_PATIENT else who


@pytest.mark.parametrize("wrong", [pytest.param(w, id=w.name) for w in WRONG])
def test_assertion_checked_by_the_node(fed: Fed, target: Target, wrong: Wrong) -> None:
    stub = fed.node(_carrier(wrong.to_node, target.ins), "11")
    request = npb.ListRecordsRequest(patient_ins=target.ins)

    def list_records() -> npb.ListRecordsResponse:
        return stub.ListRecords(request, metadata=wrong.build(fed, target.ins, Use()), timeout=10)

    def get_record() -> npb.GetRecordResponse:
        return stub.GetRecord(
            npb.GetRecordRequest(record_id=target.doc.id),
            metadata=wrong.build(fed, target.ins, Use(READ_RECORD, target.doc.id)),
            timeout=10,
        )

    if wrong.code == OK:
        assert [r.id for r in list_records().records] == [target.doc.id]
        assert get_record().record.id == target.doc.id
        return
    err = refusal(list_records)
    assert err.code() == wrong.code, err.details()
    assert wrong.why in (err.details() or "")
    # By id, a refused assertion gives nothing either (for another patient: not among theirs).
    expected = NOT_FOUND if wrong.name == "for-another-patient" else wrong.code
    assert code_of(get_record) == expected


@pytest.mark.parametrize(
    "wrong", [pytest.param(w, id=w.name) for w in WRONG if w.to_directory is not None]
)
def test_assertion_checked_by_the_directory(fed: Fed, target: Target, wrong: Wrong) -> None:
    assert wrong.to_directory is not None
    stub = fed.dir(_carrier(wrong.to_directory, target.ins))
    calls: dict[str, Callable[[], object]] = {
        "view": lambda: stub.GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=target.ins),
            metadata=wrong.build(fed, target.ins, Use()),
            timeout=10,
        ),
        "patient": lambda: stub.GetPatient(
            dpb.GetPatientRequest(ins=target.ins),
            metadata=wrong.build(fed, target.ins, Use(LOOKUP)),
            timeout=10,
        ),
    }
    if wrong.code == OK:
        view = calls["view"]()
        assert isinstance(view, dpb.GetConsolidatedViewResponse)
        check_view(view, {target.doc.id, target.rx.id})
        assert code_of(calls["patient"]) == OK
        return
    for name, call in calls.items():
        err = refusal(call)
        assert err.code() == wrong.code, (name, err.details())
        assert wrong.why in (err.details() or ""), name


def test_the_directory_identity_alone_reads_nothing_at_any_node(fed: Fed, target: Target) -> None:
    def content(stub: node_service_pb2_grpc.NodeServiceStub, metadata: Metadata) -> object:
        request = npb.GetRecordContentRequest(record_id=target.doc.id)
        return list(stub.GetRecordContent(request, metadata=metadata, timeout=10))

    for region in ALL_REGIONS:
        stub = fed.node(DIRECTORY, region)
        for forged in (False, True):

            def metadata(use: Use, forged: bool = forged) -> Metadata:
                return forge(fed.signer(DIRECTORY), target.ins, use=use) if forged else ()

            calls: list[Callable[[], object]] = [
                partial(
                    stub.ListRecords,
                    npb.ListRecordsRequest(patient_ins=target.ins),
                    metadata=metadata(Use()),
                    timeout=10,
                ),
                partial(
                    stub.GetRecord,
                    npb.GetRecordRequest(record_id=target.doc.id),
                    metadata=metadata(Use(READ_RECORD, target.doc.id)),
                    timeout=10,
                ),
                partial(content, stub, metadata(Use(READ_CONTENT, target.doc.id))),
            ]
            for call in calls:
                assert code_of(call) == UNAUTHENTICATED, region


def test_a_replayed_assertion_is_refused_by_the_node(fed: Fed, target: Target) -> None:
    md = fed.md(DOC, target.ins)
    request = npb.ListRecordsRequest(patient_ins=target.ins)
    stub = fed.node(DOC, "11")
    assert [r.id for r in stub.ListRecords(request, metadata=md, timeout=10).records] == [
        target.doc.id
    ]
    err = refusal(lambda: stub.ListRecords(request, metadata=md, timeout=10))
    assert err.code() == UNAUTHENTICATED
    assert "already used" in (err.details() or "")


def test_a_replayed_assertion_is_refused_by_the_directory(fed: Fed, target: Target) -> None:
    md = fed.md(DOC, target.ins)
    request = dpb.GetConsolidatedViewRequest(patient_ins=target.ins)
    stub = fed.dir(DOC)
    check_view(
        stub.GetConsolidatedView(request, metadata=md, timeout=10), {target.doc.id, target.rx.id}
    )
    err = refusal(lambda: stub.GetConsolidatedView(request, metadata=md, timeout=10))
    assert err.code() == UNAUTHENTICATED
    assert "already used" in (err.details() or "")


def test_an_assertion_relayed_by_the_directory_cannot_be_replayed_at_a_node(
    fed: Fed, target: Target
) -> None:
    md = fed.md(DOC, target.ins)
    check_view(
        fed.dir(DOC).GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=target.ins), metadata=md, timeout=10
        ),
        {target.doc.id, target.rx.id},
    )
    for region in ("11", "53"):  # both saw it, relayed
        list_records = fed.node(DOC, region).ListRecords
        request = npb.ListRecordsRequest(patient_ins=target.ins)
        err = refusal(partial(list_records, request, metadata=md, timeout=10))
        assert err.code() == UNAUTHENTICATED


def test_a_node_refusal_shows_in_the_view_as_a_refused_region(fed: Fed, target: Target) -> None:
    """The assertion is valid for the directory, but node 53 has already seen it."""
    md = fed.md(DOC, target.ins)
    used = fed.node(DOC, "53").ListRecords(
        npb.ListRecordsRequest(patient_ins=target.ins), metadata=md, timeout=10
    )
    assert [r.id for r in used.records] == [target.rx.id]
    view = fed.dir(DOC).GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=target.ins), metadata=md, timeout=10
    )
    assert [r.id for r in view.records] == [target.doc.id]
    states = {s.region: (s.state, s.record_count) for s in view.regions}
    assert states == {"11": (S.REGION_STATE_ANSWERED, 1), "53": (S.REGION_STATE_REFUSED, 0)}
    message = next(s.message for s in view.regions if s.region == "53")
    assert "already used" in message
    assert target.rx.title not in message


def test_a_region_whose_matrix_refuses_a_profession_is_reported_refused(fed: Fed) -> None:
    ins = fed.new_patient()
    physio = practitioner(PHYSIO)
    here = fed.put("11", record(ins, f"rx11-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    there = fed.put(SPECIAL, record(ins, f"rx93-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    fed.wait_fragments(ins, {"11": 1, SPECIAL: 1})
    check_view(fed.view(DOC, ins), {here.id, there.id})  # the doctor reads both regions
    view = fed.view(physio, ins)
    assert [r.id for r in view.records] == [here.id]
    states = {s.region: (s.state, s.record_count) for s in view.regions}
    assert states == {"11": (S.REGION_STATE_ANSWERED, 1), SPECIAL: (S.REGION_STATE_REFUSED, 0)}
    err = refusal(lambda: fed.listed(physio, SPECIAL, ins))
    assert err.code() == PERMISSION_DENIED
    assert "physiotherapist" in (err.details() or "")
    assert code_of(lambda: fed.fetch(physio, ins, there)) == PERMISSION_DENIED


def test_a_revoked_signer_is_refused_once_the_crl_says_so(fed: Fed) -> None:
    ins = fed.new_patient()
    revoked = practitioner(REVOKED)
    doc = fed.put("11", record(ins, f"rev-doc-{ins}"))
    rx = fed.put("53", record(ins, f"rev-rx-{ins}", K.RECORD_KIND_PRESCRIPTION, "57833-6"))
    fed.wait_fragments(ins, {"11": 1, "53": 1})

    def relayed(region: str) -> Callable[[], object]:
        """The revoked doctor's assertion, carried by the directory's certificate."""
        return lambda: fed.node(DIRECTORY, region).ListRecords(
            npb.ListRecordsRequest(patient_ins=ins), metadata=fed.md(revoked, ins), timeout=10
        )

    def with_other_transport() -> object:
        """The revoked doctor's assertion at the directory, over another's connection."""
        return fed.dir(DOC).GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=ins),
            metadata=fed.md(revoked, ins),
            timeout=10,
        )

    assert fed.listed_ids(revoked, "11", ins) == {doc.id}
    assert code_of(relayed("11")) == OK and code_of(relayed("53")) == OK
    check_view(fed.view(revoked, ins), {doc.id, rx.id})
    fed.pki.revoke(revoked)
    for region in ("11", "53"):
        eventually(relayed(region), UNAUTHENTICATED, f"node {region} to read the new CRL")
        assert "revoked" in (refusal(relayed(region)).details() or "")
    eventually(with_other_transport, UNAUTHENTICATED, "the directory to read the new CRL")
    assert "revoked" in (refusal(with_other_transport).details() or "")
    # Its own connections are refused too.
    assert code_of(lambda: fed.listed(revoked, "11", ins)) == UNAUTHENTICATED
    assert code_of(lambda: fed.view(revoked, ins)) == UNAUTHENTICATED


# -- 3. PERMISSION_DENIED before existence ------------------------------------------------


def test_refusals_come_before_any_lookup_of_the_patient(fed: Fed) -> None:
    existing, ghost = fed.new_patient(), fed.new_patient()  # ghost: directives, no record
    doc = fed.put("11", record(existing, f"exists-{existing}"))
    fed.wait_fragments(existing, {"11": 1})
    for ins in (existing, ghost):
        fed.set_directives(ins, "block", DOCTOR)
    fed.set_directives(ghost, "emergency", "refuse")
    check_view(fed.view(patient_identity(existing), existing), {doc.id})  # carries the set
    # The ghost is unknown to the index: an allowed professional learns only that.
    assert code_of(lambda: fed.get_patient(OTHER, ghost)) == NOT_FOUND
    empty = fed.view(OTHER, ghost)
    assert list(empty.records) == [] and list(empty.regions) == []

    def answers(identity: str, ins: str, emergency: str | None = None) -> dict[str, str]:
        calls: dict[str, Callable[[], object]] = {
            "patient": lambda: fed.get_patient(identity, ins, emergency),
            "view": lambda: fed.view(identity, ins, emergency),
        }
        for region in ALL_REGIONS:
            eventually(
                partial(fed.listed, identity, region, ins, emergency),
                PERMISSION_DENIED,
                f"node {region} to refuse",
            )
            calls[region] = partial(fed.listed, identity, region, ins, emergency)
        found = {}
        for name, call in calls.items():
            err = refusal(call)
            assert err.code() == PERMISSION_DENIED, (identity, ins, name)
            found[name] = err.details() or ""
        return found

    # The blocked doctor: the same refusal for a patient with records and one without.
    assert answers(DOC, ghost) == answers(DOC, existing)
    # An emergency refused by a patient who has no record yet.
    answers(OTHER, ghost, REASON)
    # A patient asking about a patient who does not exist, or one who does.
    me = patient_identity(fed.new_patient())
    assert answers(me, fed.unknown_patient()) == answers(me, existing)


# -- bugs found ---------------------------------------------------------------------------


@contextmanager
def setup() -> Iterator[None]:
    """In an xfail test: a failure here is a real failure, not the expected one."""
    try:
        yield
    except (AssertionError, grpc.RpcError) as exc:
        pytest.fail(f"setup failed: {exc}")


def test_the_directory_counts_no_record_the_caller_may_not_see(fed: Fed) -> None:
    ins = fed.new_patient()
    me = patient_identity(ins)
    with setup():
        fed.put("11", record(ins, f"count-visible-{ins}"))
        fed.put("11", record(ins, f"count-hidden-{ins}", code="11502-2", hidden=True))
        fed.wait_fragments(ins, {"11": 2})
        visible = Counter(r.region for r in fed.view(me, ins).records)
        assert visible == {"11": 1}
    for fragment in fed.get_patient(me, ins).fragments:
        assert fragment.record_count <= visible[fragment.region], fragment


def test_directives_outlive_the_certificate_that_signed_them(fed: Fed) -> None:
    expiry = datetime.now(UTC) + timedelta(seconds=3)
    ins = fed.new_patient(not_after=expiry)
    with setup():
        doc = fed.put("11", record(ins, f"outlive-{ins}"))
        fed.wait_fragments(ins, {"11": 1})
        fed.set_directives(ins, "block", OTHER_DOCTOR)  # signed while the certificate is valid
        wait_for(
            lambda: datetime.now(UTC) > expiry + timedelta(seconds=1),
            "the patient's certificate to expire",
        )
    try:
        view = fed.view(DOC, ins)
    except grpc.RpcError as exc:
        raise AssertionError(
            f"the doctor cannot read the record any more: {exc.code()}: {exc.details()}"
        ) from None
    check_view(view, {doc.id})
    assert code_of(lambda: fed.view(OTHER, ins)) == PERMISSION_DENIED  # the block still holds

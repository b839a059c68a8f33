"""The federation as the gateway reaches it: the typed client, as the gateway's identity.

Every method is one or a few calls of :class:`DirectoryClient`, each with a fresh access
assertion signed with the identity's own key (the client does it). The gateway remembers
where each record it listed lives (its region and patient, not its content), so that the
attachment URL of a DocumentReference can be read later as ``Binary/{id}``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from dmp.client import DirectoryClient, NodeClient, View, view_request
from dmp.errors import DmpError
from dmp.fhir.errors import FhirError, from_rpc
from dmp.fhir.mapping import fhir_id, parse_binary_id
from dmp.fhir.params import DateRange
from dmp.fhir.transaction import Stored, parse, register_patient, store
from dmp.identity import Role
from dmp.ins import normalize_ins
from dmp.pki import Credentials
from dmp.prescription_client import Found, PrescriptionClient
from dmp.records import check_record_id
from dmp.regions import check_region
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import patient_pb2, record_pb2

#: How many record locations the gateway remembers (oldest forgotten first).
LOCATIONS = 100_000


@dataclass(frozen=True)
class Location:
    """Where a record lives: what a content read needs besides the caller's assertion."""

    record_id: str
    region: str
    patient_ins: str


class Locations:
    """FHIR id → record location, for the records the gateway has listed (bounded)."""

    def __init__(self, size: int = LOCATIONS) -> None:
        self._size = size
        self._known: OrderedDict[str, Location] = OrderedDict()
        self._lock = threading.Lock()

    def learn(self, record: record_pb2.Record) -> None:
        with self._lock:
            key = fhir_id(record.id)
            self._known[key] = Location(record.id, record.region, record.patient_ins)
            self._known.move_to_end(key)
            while len(self._known) > self._size:
                self._known.popitem(last=False)

    def get(self, key: str) -> Location | None:
        with self._lock:
            return self._known.get(key)


@dataclass
class Content:
    """A record's content as it streams from its region: the record, then its bytes."""

    record: record_pb2.Record
    chunks: Iterator[bytes]


class Federation:
    """The directory, as the gateway's identity, through one channel opened once."""

    def __init__(
        self,
        directory: str,
        credentials: Credentials,
        *,
        node: str | None = None,
        timeout: float = 10,
    ) -> None:
        self.client = DirectoryClient(directory, credentials)
        self.principal = self.client.signer.principal
        #: PrescriptionService at the directory, over the same channel and key.
        self.prescriptions = PrescriptionClient(
            directory, credentials, channel=self.client.channel, signer=self.client.signer
        )
        self.timeout = timeout
        self.locations = Locations()
        #: The node of the identity's region, where transaction Bundles are written.
        self.node = (
            NodeClient(node, credentials, signer=self.client.signer) if node is not None else None
        )
        self._node_address = node
        self._node_region: str | None = None

    def close(self) -> None:
        self.client.close()
        if self.node is not None:
            self.node.close()

    def write(self, body: object, *, max_content: int) -> Stored:
        """Check a transaction Bundle whole, then store it at the node, all or nothing
        (``dmp.fhir.transaction``); the Bundle's patient is registered at the directory."""
        if self.node is None:
            raise FhirError(
                405,
                "not-supported",
                "this gateway was started without --node: it writes nothing (start it with"
                " --node HOST:PORT, the node of your region)",
            )
        submission = parse(body, max_content=max_content, writer=self.principal.uri)
        register_patient(
            lambda identity: self.client.register_patient(identity, timeout=self.timeout),
            submission,
        )
        return store(
            self.node, submission, timeout=max(self.timeout, 60), region=self.node_region()
        )

    def node_region(self) -> str | None:
        """The region of the node Bundles are written to, as the directory lists it (asked
        once), so that a node that is down is named by its region; None if not listed."""
        if self._node_region is None and self._node_address is not None:
            try:
                nodes = self.client.list_nodes(timeout=self.timeout)
            except grpc.RpcError:
                return None
            for info in nodes:
                if info.address == self._node_address:
                    self._node_region = info.region
        return self._node_region

    def patient(self, ins: str) -> patient_pb2.PatientIdentity | None:
        """The patient's identity; None when the directory does not know them (a caller who
        may not look them up is refused whether or not they exist)."""
        try:
            return self.client.get_patient(ins, timeout=self.timeout).patient
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc(exc) from None

    def view_page(
        self,
        ins: str,
        *,
        kinds: list[record_pb2.RecordKind.ValueType],
        type_codes: list[str],
        dates: DateRange,
        include_superseded: bool,
        count: int,
        token: str,
    ) -> dpb.GetConsolidatedViewResponse:
        """One page of the consolidated view; the records' locations are remembered."""
        request = view_request(
            ins,
            kinds=kinds,
            type_codes=type_codes,
            since=dates.since,
            until=dates.until,
            include_superseded=include_superseded,
            page_size=count,
        )
        request.page_token = token
        try:
            page = self.client.view_page(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc(exc) from None
        for record in page.records:
            self.locations.learn(record)
        return page

    def locate(self, key: str) -> Location:
        """Where the content of Binary id ``key`` lives: said by the id itself (REGION.INS.ID,
        :func:`binary_id`), else remembered from a listing; a patient's gateway also finds
        their own records in their view."""
        located = parse_binary_id(key)
        if located is not None:
            region, ins, record_id = located
            try:
                check_region(region)
                ins = normalize_ins(ins)
                check_record_id(record_id)
            except DmpError as exc:
                raise FhirError(
                    400, "invalid", f"Binary id: {exc.message}", expression="id"
                ) from None
            return Location(record_id, region, ins)
        known = self.locations.get(key)
        if known is not None:
            return known
        if self.principal.role is Role.PATIENT:
            request = view_request(self.principal.key, include_superseded=True, page_size=1000)
            try:
                view = self.client.view(request, limit=100_000, timeout=self.timeout)
            except grpc.RpcError as exc:
                raise from_rpc(exc) from None
            for record in view.records:
                self.locations.learn(record)
            known = self.locations.get(key)
            if known is not None:
                return known
        raise FhirError(
            404,
            "not-found",
            f"Binary/{key} is not known to this gateway: search the patient's"
            " DocumentReferences first and read the content at their attachment URL",
        )

    def content(self, location: Location) -> Content:
        """The record and a stream of its content, relayed from its region. Refusals and an
        unreachable region are raised before the first byte."""
        try:
            stream = self.client.fetch_content(
                location.record_id, location.region, location.patient_ins, timeout=120
            )
            first = next(stream)
        except grpc.RpcError as exc:
            raise from_rpc(exc, region=location.region) from None
        except StopIteration:
            raise FhirError(502, "exception", "the region sent no content") from None

        def chunks() -> Iterator[bytes]:
            if first.chunk:
                yield first.chunk
            for message in stream:
                if message.chunk:
                    yield message.chunk

        return Content(first.record, chunks())

    def read_content(self, record: record_pb2.Record, limit: int) -> bytes | None:
        """All of a record's content, when it is at most ``limit`` bytes and the caller may
        read it; None otherwise (the record is then described from its metadata)."""
        if record.size > limit:
            return None
        try:
            content = self.content(Location(record.id, record.region, record.patient_ins))
            data = b"".join(content.chunks)
        except (FhirError, grpc.RpcError):
            return None
        return data if len(data) <= limit else None

    def records(
        self, ins: str, kinds: list[record_pb2.RecordKind.ValueType], *, limit: int = 100_000
    ) -> View:
        """Every record of the view of these kinds (all pages), and each region's status."""
        request = view_request(ins, kinds=kinds, page_size=200)
        try:
            view = self.client.view(request, limit=limit, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc(exc) from None
        for record in view.records:
            self.locations.learn(record)
        return view

    def dispensable(self, ins: str) -> Found:
        """The patient's prescriptions still dispensable, in every region."""
        try:
            return self.prescriptions.find(ins, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc(exc) from None

    def access_history(self, ins: str, limit: int) -> dpb.GetAccessHistoryResponse:
        try:
            return self.client.access_history(ins, limit=limit, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc(exc) from None

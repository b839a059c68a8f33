"""The directory's prescription use cases: an act on one prescription relayed to the node
that holds it, and a patient's prescriptions found across the regions.

A prescription id names the region of its node (dmp/prescriptions.py), so every act on one
(get, claim, release, dispense, cancel) goes straight to that node with the caller's own
signed assertion: the node is authoritative for the prescription's state and applies every
rule itself; its answer, refusals included (status, message and ErrorInfo reason), reaches
the caller unchanged. A prescription itself is written at that node with the prescriber's
own certificate (the node checks its caller is the signer): the directory says where.
FindPrescriptions asks every region holding the patient's records at once, as the
consolidated view does (directory/fanout.py), and answers one status per region.

Each call is audited here as the directory's relayed reads are; the node audits it again
where it happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from directory.access import DirectoryAccess
from directory.channels import NodeChannels
from directory.fanout import FanOut
from directory.index import PatientIndex
from directory.relay import passed_on, routed_address
from dmp.audit.calls import Auditor
from dmp.audit.events import EventType
from dmp.clock import to_us
from dmp.discovery import Discovery
from dmp.errors import FailedPrecondition, InvalidArgument
from dmp.ins import normalize_ins
from dmp.prescriptions import prescription_region
from dmp.regions import REGION_STATE_NAMES
from dmp.server import CallContext
from dmp.v1 import access_pb2
from dmp.v1 import prescription_pb2 as pb
from dmp.v1.prescription_pb2_grpc import PrescriptionServiceStub

Answer = TypeVar("Answer", bound=Message)
#: Why the directory refuses CreatePrescription (ErrorInfo reason).
WRITE_AT_THE_NODE = "WRITE_AT_THE_NODE"

#: How each relayed act is audited at the directory, and how its event names it.
_ACTS: dict[str, tuple[EventType, str]] = {
    "CreatePrescription": (EventType.PRESCRIPTION_CREATE, "prescription stored"),
    "GetPrescription": (EventType.PRESCRIPTION_READ, "prescription read"),
    "ClaimPrescription": (EventType.PRESCRIPTION_CLAIM, "prescription claimed"),
    "ReleasePrescription": (EventType.PRESCRIPTION_RELEASE, "prescription released"),
    "DispensePrescription": (EventType.PRESCRIPTION_DISPENSE, "prescription dispensed"),
    "CancelPrescription": (EventType.PRESCRIPTION_CANCEL, "prescription cancelled"),
}


def _patient_of(stored: pb.StoredPrescription) -> str:
    """The patient of a prescription a node returned ("" if it cannot be read)."""
    try:
        return pb.Prescription.FromString(stored.signed.prescription).patient_ins
    except DecodeError:
        return ""


def _newest_first(stored: pb.StoredPrescription) -> tuple[int, str]:
    try:
        prescription = pb.Prescription.FromString(stored.signed.prescription)
    except DecodeError:
        return 0, ""
    return to_us(prescription.authored_time), prescription.id


class PrescriptionRelay:
    """What the directory does with prescriptions, for the person each call is for."""

    def __init__(
        self,
        index: PatientIndex,
        discovery: Discovery,
        channels: NodeChannels,
        access: DirectoryAccess,
        fanout: FanOut,
        auditor: Auditor,
    ) -> None:
        self._index = index
        self._discovery = discovery
        self._channels = channels
        self._access = access
        self._fanout = fanout
        self._auditor = auditor

    # -- one prescription, at its node ----------------------------------------------------

    def create(
        self, context: CallContext, request: pb.CreatePrescriptionRequest
    ) -> pb.CreatePrescriptionResponse:
        """Not here: a prescription is stored at the node its id names, with the
        prescriber's own certificate (the node checks that its caller is the signer, so a
        copy relayed under the directory's certificate would be refused there). The refusal
        names that node's address, for the prescriber's software to call it directly."""
        event_type, detail = _ACTS["CreatePrescription"]
        with self._auditor.call(context, event_type) as audited:
            try:
                prescription = pb.Prescription.FromString(request.signed.prescription)
            except DecodeError:
                raise InvalidArgument(
                    "signed.prescription is not a serialized Prescription"
                ) from None
            audited.record_ids = (prescription.id,)
            region = prescription_region(prescription.id, "prescription.id")
            audited.detail = f"{detail}: refused, to be written at region {region}'s node"
            route = self._discovery.routes().get(region)
            where = f" at {route.address}" if route is not None else ""
            raise FailedPrecondition(
                f"a prescription is stored at the node of its region ({region}{where}) with"
                " the prescriber's own certificate, not through the directory:"
                " dmp prescription create --node HOST:PORT",
                reason=WRITE_AT_THE_NODE,
            )

    def get(
        self, context: CallContext, request: pb.GetPrescriptionRequest
    ) -> pb.GetPrescriptionResponse:
        answer: pb.GetPrescriptionResponse = self._act(
            context,
            "GetPrescription",
            access_pb2.OPERATION_READ_PRESCRIPTION,
            request.prescription_id,
            request,
        )
        return answer

    def claim(
        self, context: CallContext, request: pb.ClaimPrescriptionRequest
    ) -> pb.ClaimPrescriptionResponse:
        answer: pb.ClaimPrescriptionResponse = self._act(
            context,
            "ClaimPrescription",
            access_pb2.OPERATION_DISPENSE,
            request.prescription_id,
            request,
        )
        return answer

    def release(
        self, context: CallContext, request: pb.ReleasePrescriptionRequest
    ) -> pb.ReleasePrescriptionResponse:
        answer: pb.ReleasePrescriptionResponse = self._act(
            context,
            "ReleasePrescription",
            access_pb2.OPERATION_DISPENSE,
            request.prescription_id,
            request,
        )
        return answer

    def dispense(
        self, context: CallContext, request: pb.DispensePrescriptionRequest
    ) -> pb.DispensePrescriptionResponse:
        answer: pb.DispensePrescriptionResponse = self._act(
            context,
            "DispensePrescription",
            access_pb2.OPERATION_DISPENSE,
            request.dispensation.prescription_id,
            request,
        )
        return answer

    def cancel(
        self, context: CallContext, request: pb.CancelPrescriptionRequest
    ) -> pb.CancelPrescriptionResponse:
        answer: pb.CancelPrescriptionResponse = self._act(
            context,
            "CancelPrescription",
            access_pb2.OPERATION_CANCEL_PRESCRIPTION,
            request.prescription_id,
            request,
        )
        return answer

    def _act(
        self,
        context: CallContext,
        rpc: str,
        operation: access_pb2.Operation.ValueType,
        prescription_id: str,
        request: Message,
    ) -> Any:
        """Check the caller's assertion for `operation` on this prescription, relay the
        call with it to the node the id names, audit, and answer what the node answered."""
        event_type, detail = _ACTS[rpc]
        with self._auditor.call(context, event_type) as audited:
            audited.record_ids = (prescription_id,)
            region = prescription_region(prescription_id)
            audited.detail = f"{detail}, relayed to region {region}"
            metadata = self._access.relay_act(context, audited, operation, prescription_id)
            answer = self._call(
                region,
                lambda stub: getattr(stub, rpc)(
                    request, metadata=metadata, timeout=context.time_remaining()
                ),
            )
            stored = getattr(answer, "prescription", None)
            if not audited.patient_ins and isinstance(stored, pb.StoredPrescription):
                audited.patient_ins = _patient_of(stored)
            audited.commit()
            return answer

    def _call(self, region: str, send: Callable[[PrescriptionServiceStub], Answer]) -> Answer:
        address = routed_address(self._discovery, region)
        stub = PrescriptionServiceStub(self._channels.channel(region, address))
        try:
            return send(stub)
        except grpc.RpcError as exc:
            raise passed_on(region, exc) from None

    # -- a patient's prescriptions, across the regions ------------------------------------

    def find(
        self, context: CallContext, request: pb.FindPrescriptionsRequest
    ) -> pb.FindPrescriptionsResponse:
        """The patient's prescriptions from every region holding their records, asked in
        parallel, newest first, with one status per region (a region down is named, the
        others answer)."""
        event_type = EventType.PRESCRIPTION_FIND
        with self._auditor.call(context, event_type, request.patient_ins) as audited:
            ins = normalize_ins(request.patient_ins, "patient_ins")
            metadata = self._access.relay(
                context, audited, access_pb2.OPERATION_FIND_PRESCRIPTIONS, ins
            )
            node_request = pb.FindPrescriptionsRequest(patient_ins=ins, statuses=request.statuses)

            def call(stub: PrescriptionServiceStub, region: str, deadline: float) -> grpc.Future:
                return stub.FindPrescriptions.future(
                    node_request, timeout=deadline, metadata=metadata
                )

            regions = [f.region for f in self._index.fragments(ins)]
            answers = self._fanout.ask(
                regions, call, context.time_remaining(), stub=PrescriptionServiceStub
            )
            response = pb.FindPrescriptionsResponse()
            found: list[pb.StoredPrescription] = []
            seen: set[str] = set()
            for answer, status in answers.values():
                if answer is not None:
                    for stored in answer.prescriptions:
                        key = _newest_first(stored)[1]
                        if key in seen:
                            continue
                        seen.add(key)
                        found.append(stored)
                        status.record_count += 1
                response.regions.append(status)
            found.sort(key=_newest_first, reverse=True)
            response.prescriptions.extend(found)
            audited.detail = "prescriptions; regions " + ", ".join(
                f"{s.region}:{REGION_STATE_NAMES.get(s.state, '?').replace(' ', '-')}"
                for s in response.regions
            )
            audited.commit([_newest_first(s)[1] for s in found])
            return response

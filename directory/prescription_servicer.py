"""PrescriptionService at the directory over gRPC: unpack the request, call one use case
(directory/prescribing.py), pack the answer."""

from __future__ import annotations

from directory.prescribing import PrescriptionRelay
from dmp.server import CallContext
from dmp.v1 import prescription_pb2 as pb
from dmp.v1 import prescription_pb2_grpc


class DirectoryPrescriptionServicer(prescription_pb2_grpc.PrescriptionServiceServicer):
    def __init__(self, relay: PrescriptionRelay) -> None:
        self._relay = relay

    def CreatePrescription(
        self, request: pb.CreatePrescriptionRequest, context: CallContext
    ) -> pb.CreatePrescriptionResponse:
        return self._relay.create(context, request)

    def GetPrescription(
        self, request: pb.GetPrescriptionRequest, context: CallContext
    ) -> pb.GetPrescriptionResponse:
        return self._relay.get(context, request)

    def ClaimPrescription(
        self, request: pb.ClaimPrescriptionRequest, context: CallContext
    ) -> pb.ClaimPrescriptionResponse:
        return self._relay.claim(context, request)

    def ReleasePrescription(
        self, request: pb.ReleasePrescriptionRequest, context: CallContext
    ) -> pb.ReleasePrescriptionResponse:
        return self._relay.release(context, request)

    def DispensePrescription(
        self, request: pb.DispensePrescriptionRequest, context: CallContext
    ) -> pb.DispensePrescriptionResponse:
        return self._relay.dispense(context, request)

    def CancelPrescription(
        self, request: pb.CancelPrescriptionRequest, context: CallContext
    ) -> pb.CancelPrescriptionResponse:
        return self._relay.cancel(context, request)

    def FindPrescriptions(
        self, request: pb.FindPrescriptionsRequest, context: CallContext
    ) -> pb.FindPrescriptionsResponse:
        return self._relay.find(context, request)

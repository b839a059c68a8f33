"""PrescriptionService over gRPC at a node: unpack the request, call one use case
(node/prescribing.py), pack."""

from __future__ import annotations

from dmp.server import CallContext
from dmp.v1 import prescription_pb2 as pb
from dmp.v1 import prescription_pb2_grpc
from node.prescribing import PrescriptionService


class PrescriptionServicer(prescription_pb2_grpc.PrescriptionServiceServicer):
    def __init__(self, prescriptions: PrescriptionService) -> None:
        self._prescriptions = prescriptions

    def CreatePrescription(
        self, request: pb.CreatePrescriptionRequest, context: CallContext
    ) -> pb.CreatePrescriptionResponse:
        stored = self._prescriptions.create(context, request.signed)
        return pb.CreatePrescriptionResponse(prescription=stored)

    def GetPrescription(
        self, request: pb.GetPrescriptionRequest, context: CallContext
    ) -> pb.GetPrescriptionResponse:
        stored = self._prescriptions.get(context, request.prescription_id)
        return pb.GetPrescriptionResponse(prescription=stored)

    def ClaimPrescription(
        self, request: pb.ClaimPrescriptionRequest, context: CallContext
    ) -> pb.ClaimPrescriptionResponse:
        stored = self._prescriptions.claim(
            context, request.prescription_id, request.pharmacy, request.hold_seconds
        )
        return pb.ClaimPrescriptionResponse(prescription=stored)

    def ReleasePrescription(
        self, request: pb.ReleasePrescriptionRequest, context: CallContext
    ) -> pb.ReleasePrescriptionResponse:
        stored = self._prescriptions.release(context, request.prescription_id)
        return pb.ReleasePrescriptionResponse(prescription=stored)

    def DispensePrescription(
        self, request: pb.DispensePrescriptionRequest, context: CallContext
    ) -> pb.DispensePrescriptionResponse:
        dispensation, stored = self._prescriptions.dispense(context, request.dispensation)
        return pb.DispensePrescriptionResponse(dispensation=dispensation, prescription=stored)

    def CancelPrescription(
        self, request: pb.CancelPrescriptionRequest, context: CallContext
    ) -> pb.CancelPrescriptionResponse:
        stored = self._prescriptions.cancel(context, request.prescription_id, request.reason)
        return pb.CancelPrescriptionResponse(prescription=stored)

    def FindPrescriptions(
        self, request: pb.FindPrescriptionsRequest, context: CallContext
    ) -> pb.FindPrescriptionsResponse:
        found = self._prescriptions.find(context, request.patient_ins, request.statuses)
        return pb.FindPrescriptionsResponse(prescriptions=found)

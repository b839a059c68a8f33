"""WitnessService over gRPC, served by every node and by the directory: unpack, call one use
case (dmp/audit/witness_service.py), pack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import grpc

from dmp.audit.witness import witnessed_to_proto
from dmp.audit.witness_service import Witnessing
from dmp.server import CallContext
from dmp.v1 import witness_pb2 as wpb
from dmp.v1 import witness_pb2_grpc

WITNESS_SERVICE: Final = wpb.DESCRIPTOR.services_by_name["WitnessService"].full_name


class WitnessServicer(witness_pb2_grpc.WitnessServiceServicer):
    def __init__(self, witnessing: Witnessing) -> None:
        self._witnessing = witnessing

    def WitnessTreeHead(
        self, request: wpb.WitnessTreeHeadRequest, context: CallContext
    ) -> wpb.WitnessTreeHeadResponse:
        latest, already = self._witnessing.witness(context, request)
        return wpb.WitnessTreeHeadResponse(
            latest=witnessed_to_proto(latest), already_witnessed=already
        )

    def ListWitnessedTreeHeads(
        self, request: wpb.ListWitnessedTreeHeadsRequest, context: CallContext
    ) -> wpb.ListWitnessedTreeHeadsResponse:
        page = self._witnessing.witnessed(context, request)
        return wpb.ListWitnessedTreeHeadsResponse(
            heads=[witnessed_to_proto(h) for h in page.heads], more=page.more
        )


def add_witness_service(servicer: WitnessServicer) -> Callable[[grpc.Server], None]:
    """What a ServiceSpec adds to a server for this witness."""

    def add(server: grpc.Server) -> None:
        witness_pb2_grpc.add_WitnessServiceServicer_to_server(servicer, server)

    return add

"""Asking several regions at once: one call per region through its reused channel, all in
flight together, each bounded by a deadline; every region ends with a status a person can
read, and a region that fails never blocks the others."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import grpc

from directory.channels import NodeChannels
from dmp.discovery import Discovery
from dmp.v1 import directory_service_pb2 as dpb

S = dpb.RegionState
MISSING = "its records are missing from this answer"
#: Kept from the caller's deadline to merge and answer after the regions.
ANSWER_MARGIN = 0.05

_REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}

NodeCall = Callable[[Any, str, float], grpc.Future]


def answered(region: str) -> dpb.RegionStatus:
    return dpb.RegionStatus(region=region, state=S.REGION_STATE_ANSWERED)


def failed_status(region: str, exc: grpc.RpcError, deadline: float) -> dpb.RegionStatus:
    """What a node's error means for the person who asked."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        state = S.REGION_STATE_DEADLINE_EXCEEDED
        message = f"region {region} did not answer within {deadline:.1f} s; {MISSING}"
    elif code == grpc.StatusCode.UNAVAILABLE:
        state = S.REGION_STATE_UNAVAILABLE
        message = f"region {region} is unavailable: its node cannot be reached; {MISSING}"
    elif code in _REFUSED:
        state, message = S.REGION_STATE_REFUSED, f"region {region} refused: {details}"
    else:
        state, message = S.REGION_STATE_FAILED, f"region {region} failed: {code.name}: {details}"
    return dpb.RegionStatus(region=region, state=state, message=message)


class FanOut:
    def __init__(
        self, discovery: Discovery, channels: NodeChannels, region_deadline: float
    ) -> None:
        self._discovery = discovery
        self._channels = channels
        self.region_deadline = region_deadline

    def deadline(self, time_remaining: float | None) -> float:
        """The per-region deadline, never beyond the caller's own."""
        if time_remaining is None:
            return self.region_deadline
        return max(0.0, min(self.region_deadline, time_remaining - ANSWER_MARGIN))

    def ask(
        self,
        regions: Iterable[str],
        call: NodeCall,
        time_remaining: float | None,
        *,
        stub: Callable[[grpc.Channel], Any] | None = None,
    ) -> dict[str, tuple[Any, dpb.RegionStatus]]:
        """Start `call` on every region's node at once, then collect: answer (or None) and
        status per region, in the order given. `call` gets the node's NodeService stub, or
        `stub` over the node's channel for another of its services."""
        deadline = self.deadline(time_remaining)
        routes = self._discovery.routes()
        pending: dict[str, grpc.Future | dpb.RegionStatus] = {}
        addresses: dict[str, str] = {}
        for region in regions:
            route = routes.get(region)
            if route is None or not route.healthy:
                reason = (
                    route.reason if route is not None else "discovery knows no serving node for it"
                )
                pending[region] = dpb.RegionStatus(
                    region=region,
                    state=S.REGION_STATE_UNAVAILABLE,
                    message=f"region {region} not reachable: {reason}; {MISSING}",
                )
            else:
                target = (
                    self._channels.node(region, route.address)
                    if stub is None
                    else stub(self._channels.channel(region, route.address))
                )
                pending[region] = call(target, region, deadline)
                if stub is None:  # its NodeService: the one its health check speaks for
                    addresses[region] = route.address
        results: dict[str, tuple[Any, dpb.RegionStatus]] = {}
        for region, item in pending.items():
            if isinstance(item, dpb.RegionStatus):
                results[region] = (None, item)
                continue
            try:
                results[region] = (item.result(), answered(region))
                if region in addresses:  # it serves: no health check this round
                    self._channels.answered(region, addresses[region])
            except grpc.RpcError as exc:
                results[region] = (None, failed_status(region, exc, deadline))
        return results

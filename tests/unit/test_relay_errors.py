"""How the directory passes on a node's answer to a relayed act (directory/relay.py)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from directory.relay import passed_on, routed_address
from dmp.discovery import NodeRoute
from dmp.errors import Unavailable
from dmp.server import ERROR_DOMAIN, STATUS_DETAILS_KEY


class NodeError(grpc.RpcError):  # type: ignore[misc]
    """An error as a node's call raises it: status, message, trailing ErrorInfo."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None) -> None:
        self._code, self._details = code, details
        self._trailing: tuple[tuple[str, bytes], ...] = ()
        if reason is not None:
            status = status_pb2.Status(code=code.value[0], message=details)
            status.details.add().Pack(
                error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
            )
            self._trailing = ((STATUS_DETAILS_KEY, status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailing


def test_a_node_refusal_keeps_its_status_message_and_reason() -> None:
    message = "prescription RX-11-0123456789ABCDEFGHJK was already dispensed on ..."
    error = passed_on(
        "11", NodeError(grpc.StatusCode.FAILED_PRECONDITION, message, "ALREADY_DISPENSED")
    )
    assert (error.code, error.message, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        message,
        "ALREADY_DISPENSED",
    )


def test_a_node_unavailable_of_its_own_is_passed_on_as_it_said() -> None:
    """The node answered (its storage is down): its reason says so, it is not a route."""
    error = passed_on(
        "11", NodeError(grpc.StatusCode.UNAVAILABLE, "storage", "STORAGE_UNAVAILABLE")
    )
    assert (error.code, error.message, error.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "storage",
        "STORAGE_UNAVAILABLE",
    )


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_node_that_does_not_answer_is_unavailable_naming_its_region(
    code: grpc.StatusCode,
) -> None:
    error = passed_on("84", NodeError(code, "failed to connect to all addresses", None))
    assert isinstance(error, Unavailable)
    assert "region 84 (Auvergne-Rhône-Alpes)" in error.message


class Routes:
    def __init__(self, routes: dict[str, NodeRoute]) -> None:
        self._routes = routes

    def routes(self) -> dict[str, NodeRoute]:
        return self._routes


def test_a_region_without_a_healthy_node_is_unavailable_naming_it() -> None:
    with pytest.raises(Unavailable, match=r"region 93 .*no node is registered"):
        routed_address(Routes({}), "93")  # type: ignore[arg-type]


def test_an_unhealthy_route_is_unavailable_with_its_reason() -> None:
    routes = Routes({"53": NodeRoute("53", "127.0.0.1:1", False, "health check failed")})
    with pytest.raises(Unavailable, match=r"region 53 .*health check failed"):
        routed_address(routes, "53")  # type: ignore[arg-type]
    healthy = Routes({"53": NodeRoute("53", "127.0.0.1:1", True)})
    assert routed_address(healthy, "53") == "127.0.0.1:1"  # type: ignore[arg-type]

"""Which Consul instance a region is routed to when instances must prove who they are."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dmp.discovery import NodeRoute
from dmp.discovery.consul_routes import routes_from


def _entry(service_id: str, region: str, port: int) -> dict[str, Any]:
    return {
        "Node": {"Node": "agent", "Address": "10.0.0.1"},
        "Service": {"ID": service_id, "Meta": {"region": region}, "Address": "", "Port": port},
    }


class Verifier:
    """Answers as if only the addresses in `genuine` held their region's certificate."""

    def __init__(self, genuine: set[tuple[str, str]]) -> None:
        self.genuine = genuine
        self.asked: list[tuple[str, str]] = []

    def __call__(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        answers: dict[tuple[str, str], str | None] = {}
        for pair in pairs:
            self.asked.append(pair)
            answers[pair] = None if pair in self.genuine else f"not urn:dmp:node:{pair[0]}"
        return answers


def test_the_verified_instance_is_routed_not_the_first() -> None:
    # "a-squatter" sorts first, at node 84's address; node 11's own instance second.
    entries = [_entry("a-squatter", "11", 7084), _entry("dmp-node-11", "11", 7011)]
    verify = Verifier({("11", "10.0.0.1:7011")})
    verified: set[tuple[str, str]] = set()
    routes, skipped = routes_from(entries, verify, verified)
    assert routes == {"11": NodeRoute("11", "10.0.0.1:7011", healthy=True)}
    assert any("a-squatter" in s and "not urn:dmp:node:11" in s for s in skipped)
    # A verified address is not asked again; one that failed is.
    verify.asked.clear()
    routes_from(entries, verify, verified)
    assert verify.asked == [("11", "10.0.0.1:7084")]


def test_a_region_without_a_verified_instance_is_not_healthy() -> None:
    routes, _ = routes_from([_entry("dmp-node-11", "11", 7084)], Verifier(set()), set())
    route = routes["11"]
    assert not route.healthy
    assert "not urn:dmp:node:11" in route.reason


def test_without_verify_the_first_instance_is_routed() -> None:
    entries = [_entry("a", "11", 1), _entry("b", "11", 2)]
    routes, skipped = routes_from(entries)
    assert routes == {"11": NodeRoute("11", "10.0.0.1:1", healthy=True)}
    assert any("already routed" in s for s in skipped)

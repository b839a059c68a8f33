"""Which passing `dmp-node` instance the directory routes each region to.

Consul lists what was registered, by whoever held a token: an instance saying "region 11"
may stand at another node's address. With a `verify` function (the directory's, which
asks each address for its health through a channel that accepts only that region's node
certificate), an instance is routed only once its address answered as its region's node;
a region none of whose instances did is listed as not healthy, with the reason, so views
report it unavailable instead of showing another region's records as its own. A verified
(region, address) is remembered: every later connection to it checks the certificate
again anyway. One that failed is asked again at the next answer from Consul (at the
latest after one blocking-query wait).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from dmp.discovery import NodeRoute
from dmp.regions import REGIONS

#: Per (region, address): None if the server there answered as that region's node, or why
#: it did not, for a person.
Verify = Callable[[Iterable[tuple[str, str]]], dict[tuple[str, str], str | None]]

#: (Consul node name, service id, address) of one passing instance.
_Candidate = tuple[str, str, str]


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _candidates_from(entries: object) -> tuple[dict[str, list[_Candidate]], set[str]]:
    """Passing instances by region from a /v1/health/service answer, sorted by (node,
    service id), and why some entries were skipped."""
    if not isinstance(entries, list):
        return {}, {f"unexpected answer {type(entries).__name__}"}
    candidates: dict[str, list[_Candidate]] = {}
    skipped: set[str] = set()
    for entry in entries:
        node = entry.get("Node") if isinstance(entry, dict) else None
        service = entry.get("Service") if isinstance(entry, dict) else None
        if not isinstance(node, dict) or not isinstance(service, dict):
            skipped.add("malformed entry")
            continue
        service_id = str(service.get("ID", "?"))
        node_name = str(node.get("Node", "?"))
        meta = service.get("Meta")
        region = meta.get("region") if isinstance(meta, dict) else None
        if not isinstance(region, str) or region not in REGIONS:
            skipped.add(f"{service_id} on {node_name}: no known region in Meta ({region!r})")
            continue
        host = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if (
            not isinstance(host, str)
            or not host
            or not isinstance(port, int)
            or not 0 < port < 65536
        ):
            skipped.add(f"{service_id} on {node_name}: no usable address ({host!r}, {port!r})")
            continue
        candidates.setdefault(region, []).append((node_name, service_id, _join_address(host, port)))
    for found in candidates.values():
        found.sort()
    return candidates, skipped


def routes_from(
    entries: object, verify: Verify | None = None, verified: set[tuple[str, str]] | None = None
) -> tuple[dict[str, NodeRoute], frozenset[str]]:
    """Routes by region from a /v1/health/service answer, and why some instances were skipped.

    Several passing instances for one region: the first by (node, service id) that is
    verified (every one, without `verify`) is routed. `verified` remembers the
    (region, address) pairs already verified (updated here).
    """
    candidates, skipped = _candidates_from(entries)
    known = verified if verified is not None else set()
    problems: dict[tuple[str, str], str | None] = {}
    if verify is not None:
        asked = [
            (region, address)
            for region, found in candidates.items()
            for _, _, address in found
            if (region, address) not in known
        ]
        problems = verify(dict.fromkeys(asked)) if asked else {}
        known.update(pair for pair, problem in problems.items() if problem is None)
    routes: dict[str, NodeRoute] = {}
    for region, found in candidates.items():
        chosen: _Candidate | None = None
        for node_name, service_id, address in found:
            if verify is None or (region, address) in known:
                if chosen is None:
                    chosen = (node_name, service_id, address)
                    continue
                skipped.add(
                    f"{service_id} on {node_name} ({address}): region {region} is already"
                    f" routed to {chosen[2]}"
                )
                continue
            problem = problems.get((region, address)) or "not verified"
            skipped.add(f"{service_id} on {node_name} ({address}): {problem}")
        if chosen is not None:
            routes[region] = NodeRoute(region, chosen[2], healthy=True)
        else:
            _, service_id, address = found[0]
            problem = problems.get((region, address)) or "not verified"
            routes[region] = NodeRoute(
                region,
                address,
                healthy=False,
                reason=f"Consul instance {service_id} at {address} is not this region's node"
                f" ({problem})",
            )
    return routes, frozenset(skipped)

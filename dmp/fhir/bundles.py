"""Searchset Bundles: entries, paging links, and the regions that did not answer.

A consolidated view that misses regions is partial, and says so inside the Bundle: one
OperationOutcome entry (``search.mode = outcome``) with one issue per region that did not
answer, as IHE XCA names each community that did not respond.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from dmp.fhir.errors import issue
from dmp.fhir.systems import REGION_SYSTEM
from dmp.regions import REGION_STATE_NAMES, region_name
from dmp.v1 import directory_service_pb2 as dpb

Resource = dict[str, Any]

#: Region states that leave a view partial, and the OperationOutcome issue type of each.
_MISSING = {
    dpb.REGION_STATE_UNAVAILABLE: "transient",
    dpb.REGION_STATE_DEADLINE_EXCEEDED: "timeout",
    dpb.REGION_STATE_REFUSED: "forbidden",
    dpb.REGION_STATE_FAILED: "exception",
}


def now_instant() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def regions_outcome(regions: Iterable[dpb.RegionStatus]) -> Resource | None:
    """An OperationOutcome naming each region that did not answer; None when all did."""
    issues = []
    for status in sorted(regions, key=lambda s: s.region):
        code = _MISSING.get(status.state)
        if code is None:
            continue
        state = REGION_STATE_NAMES.get(status.state, "failed")
        text = f"region {status.region} ({region_name(status.region)}): {state}"
        if status.message:
            text += f": {status.message}"
        region = {
            "system": REGION_SYSTEM,
            "code": status.region,
            "display": region_name(status.region),
        }
        details = {"coding": [region], "text": state}
        issues.append(issue(code, text, severity="warning", details=details))
    if not issues:
        return None
    return {"resourceType": "OperationOutcome", "id": str(uuid.uuid4()), "issue": issues}


def searchset(
    base: str,
    matches: Iterable[tuple[str, Resource]],
    *,
    self_url: str,
    next_url: str | None = None,
    outcome: Resource | None = None,
    include: Iterable[tuple[str, Resource]] = (),
    total: int | None = None,
) -> Resource:
    """A searchset Bundle: ``matches`` as (relative url, resource) pairs, ``include``d
    resources, then the OperationOutcome of a partial answer."""
    entries: list[Resource] = []
    for relative, resource in include:
        entries.append(
            {"fullUrl": f"{base}/{relative}", "resource": resource, "search": {"mode": "include"}}
        )
    for relative, resource in matches:
        entries.append(
            {"fullUrl": f"{base}/{relative}", "resource": resource, "search": {"mode": "match"}}
        )
    if outcome is not None:
        entries.append(
            {
                "fullUrl": f"urn:uuid:{outcome['id']}",
                "resource": outcome,
                "search": {"mode": "outcome"},
            }
        )
    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    bundle: Resource = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now_instant()},
        "type": "searchset",
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return bundle


def query_url(base: str, path: str, params: Mapping[str, str | list[str]]) -> str:
    """``base/path?params`` with every value encoded (repeated parameters kept)."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        for one in value if isinstance(value, list) else [value]:
            pairs.append((key, one))
    query = urlencode(pairs, safe=":|,/")
    return f"{base}/{path}" + (f"?{query}" if query else "")

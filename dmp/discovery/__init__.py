"""Service discovery: where each region's node is, behind one interface, two backends.

- embedded (default, no extra process): nodes announce themselves to the directory,
  which checks their gRPC health over mutual TLS (directory/registry.py, node side in
  dmp/discovery/embedded.py);
- Consul: nodes register service `dmp-node` with their region in the service metadata and
  a TTL check they keep passing; the directory follows the passing instances
  (dmp/discovery/consul.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

#: The Consul service name of a regional node.
NODE_SERVICE_NAME = "dmp-node"


@dataclass(frozen=True, slots=True)
class NodeRoute:
    """Where a region's node answers, and whether the directory should route to it."""

    region: str
    address: str
    healthy: bool
    #: Why the route is not healthy, for a person (empty when healthy).
    reason: str = ""


class Discovery(Protocol):
    """The directory's view of the nodes. `routes()` is called on every view: cheap."""

    def start(self) -> None: ...

    def routes(self) -> dict[str, NodeRoute]: ...

    def close(self) -> None: ...


class Announcer(Protocol):
    """A node's side: make itself known while it runs, withdraw on shutdown."""

    def start(self) -> None: ...

    def close(self) -> None: ...

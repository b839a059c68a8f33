"""Consul discovery: nodes register `dmp-node` with a TTL check, the directory follows them.

A node (ConsulAnnouncer) registers the service `dmp-node` with its local Consul agent:
service id `dmp-node-<region>`, its address and port, `Meta = {"region": <code>}`, tag
`region-<code>`, and one TTL check that the node itself marks passing every TTL/3 seconds.
The directory (ConsulDiscovery) follows `/v1/health/service/dmp-node?passing=true` with
blocking queries and routes each region to its passing instance.

Why a TTL check refreshed by the node, not a Consul gRPC+TLS health check: nodes accept
only mutual TLS with client certificates issued by the federation CA. A Consul gRPC check
against a node would have to complete that handshake, so every Consul agent would need a
client certificate from the federation CA: Consul agents would become federation
identities and Consul's TLS configuration part of the federation's trust. With a TTL check
the federation CA stays the only trust root and Consul needs no certificate of ours. The
node announces only after its gRPC server is serving and withdraws (deregisters) before it
stops, so it passes its TTL only while its server runs; if the process dies the check
turns critical after one TTL and the node is no longer routed. A TTL proves that the node
process is alive, not that each call will succeed: the directory still reaches every node
over mutual TLS with its own certificate and a per-region deadline, and reports a region
that does not answer as unavailable or timed out.

py-consul pitfalls handled here:

- the `CONSUL_HTTP_TOKEN` environment variable overrides the token given to the client's
  constructor: a token passed explicitly is therefore passed again to every call (a
  per-call token wins over the environment); with no explicit token the environment's is
  used;
- a registration is answered 200 even when the token lacks the rights to register: the
  announcer reads its registration back and fails if Consul does not list it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import urllib.parse
from typing import Any

import consul

from dmp.discovery import NODE_SERVICE_NAME
from dmp.errors import FailedPrecondition, InvalidArgument, Unavailable
from dmp.regions import check_region

log = logging.getLogger("dmp.discovery.consul")

DEFAULT_CONSUL_PORT = 8500
#: How long Consul keeps a node whose check stays critical before removing it (Consul's
#: minimum is one minute).
DEREGISTER_CRITICAL_AFTER = "1m"
#: HTTP timeout of the directory's calls to Consul, on top of a blocking query's wait.
DISCOVERY_HTTP_TIMEOUT = 5.0
#: Rate limit of the blocking-query loop (Consul's advice): a burst of 2 quick queries,
#: then at most one query per this many seconds while the result keeps changing.
QUERY_MIN_INTERVAL = 1.0
QUERY_BURST = 2

# What a call to Consul raises when Consul does not answer or answers an error: requests'
# exceptions derive from OSError; py-consul raises ConsulException for 4xx/5xx answers and
# undecodable bodies.
_CONSUL_ERRORS: tuple[type[BaseException], ...] = (
    consul.ConsulException,
    OSError,
    ValueError,
    KeyError,
    TypeError,
)

_GO_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
_MAX_WAIT_SECONDS = 600.0
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_consul_url(url: str) -> tuple[str, int, str]:
    """Split a Consul HTTP API URL such as "http://127.0.0.1:8500" into (host, port, scheme).

    The port defaults to 8500. An IPv6 host is returned in brackets ("[::1]"), which is how
    py-consul expects it (it builds "<scheme>://<host>:<port>").
    """
    expected = "expected http://host[:port] or https://host[:port], e.g. http://127.0.0.1:8500"
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"invalid Consul URL {url!r} ({exc}): {expected}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"invalid Consul URL {url!r}: {expected}")
    host = parts.hostname
    if not host:
        raise InvalidArgument(f"invalid Consul URL {url!r}: no host; {expected}")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(
            f"invalid Consul URL {url!r}: credentials in the URL are not supported,"
            " pass the ACL token separately"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgument(f"invalid Consul URL {url!r}: no path or query allowed; {expected}")
    if port is None:
        port = DEFAULT_CONSUL_PORT
    if port == 0:
        raise InvalidArgument(f"invalid Consul URL {url!r}: port 0; {expected}")
    if ":" in host:
        host = f"[{host}]"
    return host, port, parts.scheme


def _split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise InvalidArgument(f"invalid node address {address!r}: expected host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidArgument(f"invalid node address {address!r}: port out of range 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidArgument(
            f"invalid node address {address!r}: write an IPv6 host as [addr]:port"
        )
    return host, port


def _is_unspecified(host: str) -> bool:
    if not host:
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _duration_seconds(duration: str) -> float:
    return sum(
        float(number) * _DURATION_UNITS[unit]
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", duration)
    )


def _ttl_text(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _client(consul_url: str, token: str | None, timeout: float) -> Any:
    host, port, scheme = parse_consul_url(consul_url)
    # Host and port are given, so CONSUL_HTTP_ADDR is not consulted; the token given here is
    # overridden by CONSUL_HTTP_TOKEN, hence the per-call token in the classes below.
    return consul.Consul(
        host=host, port=port, scheme=scheme, token=token, connections_timeout=timeout
    )


class ConsulAnnouncer:
    """A node's announcer: registers `dmp-node-<region>` and keeps its TTL check passing.

    Start it once the node's gRPC server serves, close it before the server stops: the node
    then passes its TTL only while its server runs.

    `token` is the Consul ACL token (needs `service:write` on `dmp-node`). py-consul lets the
    `CONSUL_HTTP_TOKEN` environment variable override a token given to its client, so a
    token given here is passed to every call, where it wins over the environment; without
    one, `CONSUL_HTTP_TOKEN` (if set) is used. Because Consul may accept a registration the
    token has no right to make, start() reads the registration back and raises
    FailedPrecondition when it is missing or different.

    A host of "0.0.0.0", "::" or empty in `address` registers no service address: Consul
    then gives the address of its agent's node.
    """

    def __init__(
        self,
        consul_url: str,
        region: str,
        address: str,
        *,
        ttl_seconds: float = 10.0,
        token: str | None = None,
    ) -> None:
        if not ttl_seconds > 0:
            raise InvalidArgument(f"ttl_seconds must be positive, got {ttl_seconds!r}")
        self._region = check_region(region)
        host, self._port = _split_address(address)
        self._host = "" if _is_unspecified(host) else host
        self._ttl = float(ttl_seconds)
        self._token = token or None
        self._url = consul_url
        self.service_id = f"{NODE_SERVICE_NAME}-{region}"
        self.check_id = f"service:{self.service_id}"
        self._interval = self._ttl / 3
        self._http_timeout = max(1.0, min(5.0, self._ttl / 3))
        self._client = _client(consul_url, self._token, self._http_timeout)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._registered = False
        self._outage = False
        self._rejected = False

    def start(self) -> None:
        """Register, verify the registration, pass the check, then keep passing it.

        Raises Unavailable when Consul does not answer, FailedPrecondition when Consul
        refuses the registration or does not list it afterwards (ACL token without rights).
        """
        with self._lock:
            if self._closed:
                raise FailedPrecondition("this Consul announcer is closed: create a new one")
            if self._started:
                return
            self._started = True
        try:
            self._register()
            self._pass_or_raise()
        except BaseException:
            with self._lock:
                self._started = False
            raise
        log.info(
            "announced region %s to Consul at %s as %s (TTL %.3gs)",
            self._region,
            self._url,
            self.service_id,
            self._ttl,
        )
        self._thread = threading.Thread(
            target=self._run, name=f"consul-ttl-{self._region}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop passing the check and deregister (errors are logged, not raised). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._http_timeout + 1.0)
        if not self._registered:
            return
        try:
            self._client.agent.service.deregister(self.service_id, token=self._token)
        except _CONSUL_ERRORS as exc:
            log.warning(
                "could not deregister %s from Consul at %s (%s): Consul removes it once its"
                " check has been critical for %s",
                self.service_id,
                self._url,
                exc,
                DEREGISTER_CRITICAL_AFTER,
            )
        else:
            log.info("deregistered %s from Consul at %s", self.service_id, self._url)

    # -- internals ---------------------------------------------------------------------------

    def _register(self) -> None:
        check = {
            "CheckID": self.check_id,
            "Name": f"{NODE_SERVICE_NAME} {self._region} TTL",
            "Notes": "passed by the node while its gRPC server runs",
            "TTL": _ttl_text(self._ttl),
            "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
        }
        try:
            accepted = self._client.agent.service.register(
                NODE_SERVICE_NAME,
                service_id=self.service_id,
                address=self._host or None,
                port=self._port,
                tags=[f"region-{self._region}"],
                meta={"region": self._region},
                check=check,
                token=self._token,
            )
        except consul.ACLPermissionDenied as exc:
            raise FailedPrecondition(
                f"Consul at {self._url} refused to register {self.service_id}: the ACL token"
                f" needs service:write on {NODE_SERVICE_NAME} ({exc})"
            ) from None
        except consul.ConsulException as exc:
            raise FailedPrecondition(
                f"Consul at {self._url} refused to register {self.service_id}: {exc}"
            ) from None
        except OSError as exc:
            raise Unavailable(
                f"Consul at {self._url} does not answer ({type(exc).__name__}):"
                f" cannot register {self.service_id}"
            ) from None
        if not accepted:
            raise FailedPrecondition(
                f"Consul at {self._url} did not accept the registration of {self.service_id}"
            )
        self._registered = True
        self._verify_registration()

    def _verify_registration(self) -> None:
        token_hint = (
            "the token passed explicitly"
            if self._token
            else "the CONSUL_HTTP_TOKEN environment variable (no token passed explicitly)"
        )
        try:
            services = self._client.agent.services(token=self._token)
        except OSError as exc:
            raise Unavailable(
                f"Consul at {self._url} stopped answering ({type(exc).__name__}) while"
                f" {self.service_id} was being registered"
            ) from None
        except _CONSUL_ERRORS as exc:
            raise FailedPrecondition(
                f"Consul at {self._url} accepted {self.service_id} but cannot list it back"
                f" ({exc}): check the ACL token, from {token_hint}"
            ) from None
        entry = services.get(self.service_id) if isinstance(services, dict) else None
        if not isinstance(entry, dict):
            self._registered = False
            raise FailedPrecondition(
                f"Consul at {self._url} answered the registration of {self.service_id} with"
                f" success but does not list it: the ACL token, from {token_hint}, most likely"
                f" lacks service:write on {NODE_SERVICE_NAME}"
            )
        meta = entry.get("Meta") or {}
        if (
            entry.get("Service") != NODE_SERVICE_NAME
            or meta.get("region") != self._region
            or entry.get("Port") != self._port
        ):
            raise FailedPrecondition(
                f"Consul at {self._url} lists {self.service_id} with other values than"
                f" registered (service {entry.get('Service')!r}, region {meta.get('region')!r},"
                f" port {entry.get('Port')!r}): another process registers the same id"
            )

    def _pass_or_raise(self) -> None:
        try:
            passed = self._client.agent.check.ttl_pass(self.check_id, token=self._token)
        except OSError as exc:
            raise Unavailable(
                f"Consul at {self._url} does not answer ({type(exc).__name__}):"
                f" cannot pass the check of {self.service_id}"
            ) from None
        except _CONSUL_ERRORS as exc:
            raise FailedPrecondition(
                f"Consul at {self._url} refused to pass check {self.check_id}: {exc}"
            ) from None
        if not passed:
            raise FailedPrecondition(
                f"Consul at {self._url} does not know check {self.check_id} right after"
                " registering it"
            )

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._heartbeat()
            except Exception:  # the thread must survive anything: log and keep trying
                log.exception("unexpected error while passing the Consul check %s", self.check_id)

    def _heartbeat(self) -> None:
        try:
            passed = self._client.agent.check.ttl_pass(self.check_id, token=self._token)
            problem = "" if passed else "Consul does not know the check"
        except OSError as exc:
            if not self._outage:
                self._outage = True
                log.warning(
                    "Consul at %s does not answer (%s): cannot pass %s, retrying every %.3gs;"
                    " the directory stops routing to region %s once the %.3gs TTL runs out",
                    self._url,
                    type(exc).__name__,
                    self.check_id,
                    self._interval,
                    self._region,
                    self._ttl,
                )
            return
        except _CONSUL_ERRORS as exc:
            passed = False
            problem = str(exc)
        if passed:
            self._rejected = False
            if self._outage:
                self._outage = False
                log.info("Consul at %s answers again: %s passing", self._url, self.check_id)
            return
        if self._stop.is_set():
            # Closing. (Should close() give up waiting for this thread while Consul hangs, a
            # registration made again here would stay critical and be reaped by Consul.)
            return
        # Consul answers but does not take our pass: the agent lost the registration (agent
        # restarted without state, or the service was reaped after being critical too long).
        if not self._rejected:
            log.warning(
                "Consul at %s did not take the pass of %s (%s): registering %s again",
                self._url,
                self.check_id,
                problem,
                self.service_id,
            )
        try:
            self._register()
            self._pass_or_raise()
        except (FailedPrecondition, Unavailable) as exc:
            if not self._rejected:
                self._rejected = True
                log.warning(
                    "could not register %s again: %s; retrying every %.3gs",
                    self.service_id,
                    exc.message,
                    self._interval,
                )
            return
        self._outage = self._rejected = False
        log.info("registered %s again in Consul at %s", self.service_id, self._url)

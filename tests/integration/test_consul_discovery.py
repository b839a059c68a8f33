"""Consul discovery against a fake Consul agent (and a real `consul agent -dev` if present)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import consul
import pytest

from dmp.discovery import NODE_SERVICE_NAME, Announcer, Discovery, NodeRoute
from dmp.discovery.consul import ConsulAnnouncer, parse_consul_url
from dmp.discovery.consul_discovery import ConsulDiscovery
from dmp.errors import FailedPrecondition, InvalidArgument, Unavailable
from tests.fake_consul import FakeConsul, free_port

T = TypeVar("T")

TTL = 1.0
WAIT = "1s"


def wait_for(condition: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """Poll `condition` every 50 ms until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exit_stack:
        yield exit_stack


@pytest.fixture
def fake(stack: ExitStack) -> FakeConsul:
    return stack.enter_context(FakeConsul(node_address="127.0.0.2"))


def announcer(stack: ExitStack, url: str, region: str, port: int, **kwargs: Any) -> ConsulAnnouncer:
    a = ConsulAnnouncer(
        url, region, f"127.0.0.1:{port}", ttl_seconds=kwargs.pop("ttl", TTL), **kwargs
    )
    stack.callback(a.close)
    return a


def discovery(stack: ExitStack, url: str, **kwargs: Any) -> ConsulDiscovery:
    d = ConsulDiscovery(url, wait=WAIT, retry_seconds=0.1, **kwargs)
    stack.callback(d.close)
    return d


def raw_client(fake: FakeConsul) -> Any:
    return consul.Consul(host="127.0.0.1", port=fake.port, token=None)


def register_by_hand(
    fake: FakeConsul, region: str | None, port: int, *, address: str | None = None
) -> str:
    """A dmp-node instance registered directly (as a node that then dies would leave it)."""
    service_id = f"{NODE_SERVICE_NAME}-by-hand-{region}-{port}"
    meta = {"region": region} if region is not None else None
    raw_client(fake).agent.service.register(
        NODE_SERVICE_NAME,
        service_id=service_id,
        address=address,
        port=port,
        meta=meta,
        check={"CheckID": f"service:{service_id}", "TTL": "1s"},
    )
    return f"service:{service_id}"


# -- parse_consul_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8500", ("127.0.0.1", 8500, "http")),
        ("http://consul.local", ("consul.local", 8500, "http")),
        ("https://consul.example.org:8501/", ("consul.example.org", 8501, "https")),
        ("http://[::1]:8500", ("[::1]", 8500, "http")),
    ],
)
def test_parse_consul_url(url: str, expected: tuple[str, int, str]) -> None:
    assert parse_consul_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:8500",
        "consul:8500",
        "ftp://127.0.0.1:8500",
        "http://:8500",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:port",
        "http://127.0.0.1:0",
        "http://127.0.0.1:8500/v1/agent",
        "http://127.0.0.1:8500?dc=dc1",
        "http://user:secret@127.0.0.1:8500",
    ],
)
def test_parse_consul_url_rejects(url: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_consul_url(url)
    assert "\n" not in caught.value.message
    assert "Consul URL" in caught.value.message


def test_invalid_arguments() -> None:
    with pytest.raises(InvalidArgument):
        ConsulAnnouncer("http://127.0.0.1:8500", "11", "127.0.0.1")
    with pytest.raises(InvalidArgument):
        ConsulAnnouncer("http://127.0.0.1:8500", "99", "127.0.0.1:50051")
    with pytest.raises(InvalidArgument):
        ConsulAnnouncer("http://127.0.0.1:8500", "11", "127.0.0.1:50051", ttl_seconds=0)
    with pytest.raises(InvalidArgument):
        ConsulDiscovery("http://127.0.0.1:8500", wait="soon")
    with pytest.raises(InvalidArgument):
        ConsulDiscovery("consul:8500")


# -- announcer ----------------------------------------------------------------------------------


def test_classes_implement_the_protocols() -> None:
    announcers: list[Announcer] = [ConsulAnnouncer("http://127.0.0.1:1", "11", "h:1")]
    discoveries: list[Discovery] = [ConsulDiscovery("http://127.0.0.1:1")]
    assert announcers and discoveries


def test_announcer_registers_region_and_keeps_ttl_passing(
    fake: FakeConsul, stack: ExitStack
) -> None:
    node = announcer(stack, fake.url, "11", 50051, ttl=1.5)
    node.start()

    service = fake.services["dmp-node-11"]
    assert service["Service"] == NODE_SERVICE_NAME
    assert service["Meta"] == {"region": "11"}
    assert service["Tags"] == ["region-11"]
    assert (service["Address"], service["Port"]) == ("127.0.0.1", 50051)
    assert fake.checks["service:dmp-node-11"]["Status"] == "passing"
    index = fake.index

    def passes() -> int:
        return sum(
            1 for m, p, _ in fake.requests if p == "/v1/agent/check/pass/service:dmp-node-11"
        )

    # Several TTL periods' worth of heartbeats: the check never went critical meanwhile.
    wait_for(lambda: passes() >= 5, "five TTL passes")
    assert fake.checks["service:dmp-node-11"]["Status"] == "passing"
    assert fake.index == index, "the check changed status between heartbeats"


def test_unspecified_host_registers_no_address(fake: FakeConsul, stack: ExitStack) -> None:
    node = ConsulAnnouncer(fake.url, "53", "0.0.0.0:50053", ttl_seconds=TTL)
    stack.callback(node.close)
    node.start()
    assert fake.services["dmp-node-53"]["Address"] == ""
    d = discovery(stack, fake.url)
    d.start()
    assert d.routes()["53"].address == "127.0.0.2:50053"  # the agent node's address


def test_announcer_close_deregisters(fake: FakeConsul, stack: ExitStack) -> None:
    node = announcer(stack, fake.url, "84", 50084)
    node.start()
    d = discovery(stack, fake.url)
    d.start()
    assert d.routes() == {"84": NodeRoute("84", "127.0.0.1:50084", healthy=True)}

    node.close()
    assert "dmp-node-84" not in fake.services
    wait_for(lambda: "84" not in d.routes(), "region 84 to leave the routes")
    node.close()  # idempotent


def test_announcer_registers_again_when_consul_forgot_it(
    fake: FakeConsul, stack: ExitStack
) -> None:
    node = announcer(stack, fake.url, "11", 50051)
    node.start()
    raw_client(fake).agent.service.deregister("dmp-node-11")  # e.g. an agent restarted empty
    wait_for(
        lambda: fake.checks.get("service:dmp-node-11", {}).get("Status") == "passing",
        "the announcer to register again",
    )


# -- discovery ----------------------------------------------------------------------------------


def test_discovery_routes_only_passing_instances(fake: FakeConsul, stack: ExitStack) -> None:
    announcer(stack, fake.url, "11", 50051).start()
    critical = register_by_hand(fake, "53", 50053)  # registered, never passed: critical
    no_region = register_by_hand(fake, None, 50099)
    unknown_region = register_by_hand(fake, "zz", 50098)
    for check_id in (no_region, unknown_region):
        fake.set_check_status(check_id, "passing")

    d = discovery(stack, fake.url)
    d.start()
    assert d.routes() == {"11": NodeRoute("11", "127.0.0.1:50051", healthy=True)}

    fake.set_check_status(critical, "passing")
    wait_for(lambda: "53" in d.routes(), "region 53 to pass")
    routes = d.routes()
    # No service address: Consul's answer gives the node's address.
    assert routes["53"] == NodeRoute("53", "127.0.0.2:50053", healthy=True)
    assert set(routes) == {"11", "53"}

    fake.set_check_status(critical, "warning")  # not passing: not routed
    wait_for(lambda: "53" not in d.routes(), "region 53 in warning to leave the routes")


def test_blocking_query_sees_new_node_and_expired_ttl(fake: FakeConsul, stack: ExitStack) -> None:
    d = discovery(stack, fake.url)
    d.start()
    assert d.routes() == {}

    # A node that passes once then stops (crashed): routed, then dropped when its TTL runs out.
    check_id = register_by_hand(fake, "84", 50084, address="10.0.0.84")
    raw_client(fake).agent.check.ttl_pass(check_id)
    wait_for(lambda: "84" in d.routes(), "the new node 84")
    assert d.routes()["84"].address == "10.0.0.84:50084"
    wait_for(lambda: "84" not in d.routes(), "node 84's TTL to expire")
    assert fake.checks[check_id]["Status"] == "critical"

    announcer(stack, fake.url, "11", 50051).start()
    wait_for(lambda: "11" in d.routes(), "the announced node 11")

    health = [p for m, p, _ in fake.requests if p.startswith("/v1/health/service/dmp-node")]
    assert any("index=" in p and "wait=1s" in p for p in health), "no blocking query made"
    assert all("passing=1" in p for p in health)


def test_discovery_keeps_last_routes_while_consul_is_down(
    fake: FakeConsul, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dmp.discovery.consul")
    node_11 = announcer(stack, fake.url, "11", 50051)
    node_11.start()
    d = discovery(stack, fake.url)
    d.start()
    assert set(d.routes()) == {"11"}

    fake.stop()

    def outage_warnings() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "keeping the last known" in r.getMessage()
        ]

    wait_for(outage_warnings, "discovery to notice that Consul is down")
    time.sleep(0.5)  # several retries (retry_seconds=0.1): still one warning for the outage
    assert len(outage_warnings()) == 1
    assert set(d.routes()) == {"11"}
    with pytest.raises(Unavailable):
        d.refresh()

    fake.start()
    announcer(stack, fake.url, "53", 50053).start()
    wait_for(lambda: set(d.routes()) == {"11", "53"}, "region 53 once Consul is back")
    node_11.close()
    wait_for(lambda: set(d.routes()) == {"53"}, "region 11 to leave once Consul is back")


def test_discovery_starts_while_consul_is_down(stack: ExitStack) -> None:
    fake = stack.enter_context(FakeConsul())
    fake.stop()  # keeps its port: nothing answers there
    d = discovery(stack, fake.url)
    d.start()  # no exception: a warning, and no routes yet
    assert d.routes() == {}
    fake.start()
    announcer(stack, fake.url, "11", 50051).start()
    wait_for(lambda: "11" in d.routes(), "region 11 once Consul answers")


def test_discovery_resets_an_index_that_goes_backwards(fake: FakeConsul, stack: ExitStack) -> None:
    fake.set_index(100)
    announcer(stack, fake.url, "11", 50051).start()
    d = discovery(stack, fake.url)
    d.start()
    assert set(d.routes()) == {"11"}
    wait_for(lambda: "index=102" in _health_queries(fake)[-1], "a blocking query at index 102")

    first = len(fake.requests)
    fake.set_index(1)  # e.g. a snapshot restored on the servers: the index goes back
    announcer(stack, fake.url, "53", 50053).start()
    wait_for(lambda: set(d.routes()) == {"11", "53"}, "region 53 after the index went back")
    # The blocking query at 102 (made before) answered the lower index 3: the index was
    # reset to 0 (one non-blocking query), then queries block on the new, lower index.
    wait_for(lambda: len(_health_queries(fake, first)) >= 2, "queries after the reset")
    after = _health_queries(fake, first)
    assert "index=" not in after[0]
    blocking_at = urllib.parse.parse_qs(urllib.parse.urlsplit(after[1]).query)["index"]
    assert 0 < int(blocking_at[0]) <= 3


def _health_queries(fake: FakeConsul, start: int = 0) -> list[str]:
    return [p for _, p, _ in fake.requests[start:] if p.startswith("/v1/health/service/dmp-node")]


def test_routes_are_a_copy(fake: FakeConsul, stack: ExitStack) -> None:
    announcer(stack, fake.url, "11", 50051).start()
    d = discovery(stack, fake.url)
    d.start()
    d.routes().clear()
    assert set(d.routes()) == {"11"}


# -- ACL token pitfall -------------------------------------------------------------------------


def test_registration_without_rights_fails_loudly(
    stack: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    fake = stack.enter_context(FakeConsul(required_token="s3cret"))

    with pytest.raises(FailedPrecondition) as caught:
        announcer(stack, fake.url, "11", 50051).start()
    assert "does not list it" in caught.value.message
    with pytest.raises(FailedPrecondition):
        announcer(stack, fake.url, "11", 50051, token="wrong").start()
    assert fake.services == {}

    # The environment's token would override the one given to py-consul's client: the
    # announcer passes its token to every call, so the explicit one wins.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "wrong")
    first = len(fake.requests)
    node = announcer(stack, fake.url, "11", 50051, token="s3cret")
    node.start()
    assert "dmp-node-11" in fake.services
    wait_for(
        lambda: (
            sum(p.startswith("/v1/agent/check/pass/") for _, p, _ in fake.requests[first:]) >= 2
        ),
        "a heartbeat after the first pass",
    )
    calls = fake.requests[first:]
    assert calls and all(t == "s3cret" for _, _, t in calls), calls
    node.close()
    assert fake.services == {}

    # Without an explicit token, CONSUL_HTTP_TOKEN is used.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret")
    announcer(stack, fake.url, "53", 50053).start()
    assert "dmp-node-53" in fake.services


# -- a real Consul agent ------------------------------------------------------------------------


def _leader(http_port: int) -> str:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/v1/status/leader", timeout=1
        ) as response:
            leader: str = json.loads(response.read())
            return leader
    except (OSError, ValueError):
        return ""


def test_against_real_consul_agent(
    tmp_path: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = shutil.which("consul")
    if binary is None:
        pytest.skip("consul binary not on PATH: real Consul agent test skipped")
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    http_port, server_port, serf_lan_port = free_port(), free_port(), free_port()
    config = tmp_path / "consul.json"
    config.write_text(
        json.dumps(
            {
                "node_name": "dmp-test",
                "bind_addr": "127.0.0.1",
                "client_addr": "127.0.0.1",
                "ports": {
                    "http": http_port,
                    "server": server_port,
                    "serf_lan": serf_lan_port,
                    "serf_wan": -1,
                    "dns": -1,
                    "grpc": -1,
                    "grpc_tls": -1,
                },
            }
        )
    )
    log_path = tmp_path / "consul.log"
    log_file = stack.enter_context(log_path.open("w"))
    process = subprocess.Popen(
        [binary, "agent", "-dev", f"-config-file={config}"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )

    def stop_agent() -> None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(stop_agent)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"consul agent exited with {process.returncode}:\n{log_path.read_text()}")
        return bool(_leader(http_port))

    wait_for(ready, "the Consul dev agent to elect itself leader", timeout=30)
    url = f"http://127.0.0.1:{http_port}"

    d = discovery(stack, url)
    d.start()
    node = announcer(stack, url, "11", 50051, ttl=2.0)
    node.start()
    wait_for(lambda: "11" in d.routes(), "region 11 through the real agent", timeout=20)
    assert d.routes()["11"] == NodeRoute("11", "127.0.0.1:50051", healthy=True)

    client = consul.Consul(host="127.0.0.1", port=http_port)
    client.agent.service.register(
        NODE_SERVICE_NAME,
        service_id="dmp-node-53",
        address="127.0.0.1",
        port=50053,
        meta={"region": "53"},
        check={"CheckID": "service:dmp-node-53", "TTL": "2s"},
    )
    d.refresh()
    assert "53" not in d.routes(), "a critical instance must not be routed"

    node.close()
    wait_for(lambda: "11" not in d.routes(), "region 11 to leave through the real agent", 20)
    assert "dmp-node-11" not in client.agent.services()

"""Mutual-TLS credentials and channel options shared by every server and client.

Only the federation CA is trusted; servers require a client certificate. Message limits
are set on both sides from one constant so a record at the maximum content size fits.
"""

from __future__ import annotations

import grpc

from dmp.pki import Credentials

MiB = 1024 * 1024
#: Default maximum content size of one record (documented in the README).
DEFAULT_MAX_CONTENT = 20 * MiB
#: Room for a record's metadata around its content in one message.
_ENVELOPE = 1 * MiB

#: Client keepalive, aligned with what the servers allow (no GOAWAY too_many_pings).
KEEPALIVE_MS = 30_000


def message_options(max_content: int = DEFAULT_MAX_CONTENT) -> list[tuple[str, int]]:
    limit = max_content + _ENVELOPE
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]


def server_options(max_content: int = DEFAULT_MAX_CONTENT) -> list[tuple[str, int]]:
    return [
        *message_options(max_content),
        # A second server on the same port must fail, not silently share connections.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options(max_content: int = DEFAULT_MAX_CONTENT) -> list[tuple[str, int]]:
    return [
        *message_options(max_content),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_credentials(creds: Credentials) -> grpc.ServerCredentials:
    """Server side of mutual TLS: our certificate, the federation CA, client cert required."""
    return grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)],
        root_certificates=creds.ca_pem,
        require_client_auth=True,
    )


def channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: trust only the federation CA, present our certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem,
        private_key=creds.key_pem,
        certificate_chain=creds.cert_pem,
    )


def secure_channel(
    target: str,
    creds: Credentials,
    max_content: int = DEFAULT_MAX_CONTENT,
    *,
    server_name: str | None = None,
) -> grpc.Channel:
    """A mutual-TLS channel to `target`. With `server_name`, the server's certificate must
    carry that DNS name, whatever host `target` names (the directory reaches node R only
    if it holds node R's own name, dmp.pki.node_tls_name)."""
    options: list[tuple[str, int | str]] = [*channel_options(max_content)]
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, channel_credentials(creds), options=options)

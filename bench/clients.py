"""How the benchmark talks to the federation as a client.

Every client call about patient data (views, patient lookups and registrations, record
writes and lists) takes its metadata from `patient_call_metadata`, and from nowhere else:
whatever the federation asks of a client for such a call goes there, once, and is then on
every call the benchmark makes, so the figures include its cost on the servers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import grpc

from dmp.client import Assertions, open_channel
from dmp.pki import Credentials, load_credentials
from dmp.purposes import Purpose
from dmp.signing import Signer
from dmp.v1 import access_pb2

Metadata = Sequence[tuple[str, str | bytes]]
PurposeName = Literal["CARE", "EMERGENCY", "SELF"]
#: What the call does: a view or list of records, a patient lookup, a write (writes and
#: registrations are authorized by the writer's certificate and carry no assertion), or a
#: dispensing of the prescription named by record_id.
Call = Literal["VIEW", "LOOKUP", "WRITE", "DISPENSE"]


def patient_call_metadata(
    pki_dir: Path,
    identity: str,
    ins: str | None,
    call: Call,
    purpose: PurposeName = "CARE",
    *,
    record_id: str = "",
) -> Metadata:
    """The metadata of one client call made as `identity` about patient `ins` (None for a
    call that spans many patients, such as an ingest stream), for `purpose`: a fresh access
    assertion signed with the identity's own key for that `call` (dmp/client.py; one
    per call, nonces are single-use, each assertion allows one operation), nothing for a
    write or a call about no single patient.

    Called once per call, just before the call and outside its timed interval (the caller's
    own signing is not a server cost). A dispensing names its prescription (`record_id`)
    and may name no patient (`ins` ""), as a pharmacist who scanned the id does.
    """
    if ins is None or call == "WRITE":
        return ()
    reason = "benchmark" if purpose == Purpose.EMERGENCY else ""
    return _assertions(pki_dir, identity).sign(
        ins,
        operation=_OPERATIONS[call],
        record_id=record_id,
        purpose=Purpose(purpose).wire,
        reason=reason,
    )


_OPERATIONS = {
    "VIEW": access_pb2.OPERATION_VIEW,
    "LOOKUP": access_pb2.OPERATION_LOOKUP,
    "DISPENSE": access_pb2.OPERATION_DISPENSE,
}


@functools.cache
def _assertions(pki_dir: Path, identity: str) -> Assertions:
    return Assertions(Signer(credentials(pki_dir, identity)))


@functools.cache
def credentials(pki_dir: Path, identity: str) -> Credentials:
    """The identity's certificate and key (read once per process)."""
    return load_credentials(pki_dir, identity)


def channel(address: str, pki_dir: Path, identity: str) -> grpc.Channel:
    """A mutual-TLS channel as the federation's own clients open it."""
    return open_channel(address, credentials(pki_dir, identity))


def wait_ready(channel: grpc.Channel, timeout: float = 30.0) -> None:
    """Block until the channel is connected (the TLS handshake is done)."""
    grpc.channel_ready_future(channel).result(timeout=timeout)

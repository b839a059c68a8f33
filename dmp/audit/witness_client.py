"""The signer's side of witnessing: send each new checkpoint of our audit log to our
witnesses, in the background, and compare the log with what they witnessed at start-up.

Checkpoints are read from our own ``audit_checkpoints`` table, so a head signed while a
witness was away (or before a restart) is sent once it is back: the publisher is never on
the write path, retries with backoff and only logs while a witness is unreachable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Final

import grpc
from sqlalchemy import Engine, func, select

from dmp.audit.checkpoints import Checkpoint
from dmp.audit.log import AuditLog
from dmp.audit.merkle_proofs import LeafSubtrees
from dmp.audit.witness import Witnessed, head_to_proto, iso_us, witnessed_from_proto
from dmp.errors import DataLoss
from dmp.v1 import witness_pb2 as wpb
from dmp.v1 import witness_pb2_grpc

log = logging.getLogger("dmp.witness")

MAX_BACKOFF: Final = 30.0
_BATCH: Final = 100

WitnessStub = witness_pb2_grpc.WitnessServiceStub


def fetch_witnessed(
    stub: WitnessStub,
    signer: str,
    *,
    latest_only: bool = False,
    timeout: float = 10.0,
    wait_for_ready: bool = False,
) -> list[Witnessed]:
    """The heads ``stub``'s service witnessed for ``signer``, smallest first (all pages)."""
    heads: list[Witnessed] = []
    after = 0
    while True:
        answer = stub.ListWitnessedTreeHeads(
            wpb.ListWitnessedTreeHeadsRequest(
                signer=signer, after_tree_size=after, latest_only=latest_only
            ),
            timeout=timeout,
            wait_for_ready=wait_for_ready,
        )
        heads.extend(witnessed_from_proto(h) for h in answer.heads)
        if latest_only or not answer.more or not answer.heads:
            return heads
        after = answer.heads[-1].head.tree_size


def compare_with_witnessed(held: int, witnessed: Witnessed, subtrees: LeafSubtrees) -> str:
    """What the log (``held`` events) lacks against a head witnessed for it, or ""."""
    head = witnessed.head
    seen = (
        f"{witnessed.witness} witnessed a head of {head.tree_size} events signed by"
        f" {head.source_id} at {iso_us(head.signed_at_us)}"
    )
    if held < head.tree_size:
        first = held + 1
        size = head.tree_size
        missing = f"event {first} is" if first == size else f"events {first}..{size} are"
        return (
            f"the audit log holds {held} events but {seen}: {missing} missing (with the"
            " records written in the same transactions: a lost or truncated -wal, or a"
            " restore from an older backup)"
        )
    try:
        root = subtrees.root(head.tree_size)
    except DataLoss as exc:
        return f"{exc.message}, but {seen}"
    if root != head.root_hash:
        return (
            f"the first {head.tree_size} events of the audit log do not hash to the root of"
            f" the head {seen}: the log was changed; run `dmp audit verify --witness`"
        )
    return ""


class HeadPublisher:
    """Sends our checkpoints to each witness, each with a consistency proof from the last
    head that witness holds for us."""

    def __init__(
        self,
        audit_log: AuditLog,
        engine: Engine,
        subtrees: LeafSubtrees,
        witnesses: Callable[[], Mapping[str, WitnessStub]],
        *,
        interval: float = 30.0,
        retry: float = 0.5,
    ) -> None:
        self._signer = audit_log.source_id
        self._engine = engine
        self._checkpoints = audit_log.checkpoints_table
        self._subtrees = subtrees
        self._witnesses = witnesses
        self._interval = interval
        self._retry = retry
        self._known: dict[str, int] = {}  # witness -> the latest size it holds for us
        self._failing: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-witness", daemon=True)
        audit_log.on_checkpoint.append(lambda _: self._wake.set())

    def start(self) -> None:
        self._thread.start()

    def witnessed_size(self, witness: str) -> int:
        """The latest size ``witness`` is known to hold for us (0: none or not known)."""
        return self._known.get(witness, 0)

    def push_once(self, timeout: float = 10.0, *, wait_for_ready: bool = False) -> bool:
        """Send every checkpoint each witness lacks; True when all were reached. With
        ``wait_for_ready`` a call waits (``timeout``) for a witness being reconnected."""
        ok = True
        with self._lock:
            for name, stub in self._witnesses().items():
                try:
                    self._push(name, stub, timeout, wait_for_ready)
                except grpc.RpcError as exc:
                    ok = False
                    self._failed(name, exc.code(), exc.details() or "")
                except DataLoss as exc:
                    ok = False
                    self._failed(name, None, exc.message)
                else:
                    if name in self._failing:
                        self._failing.discard(name)
                        log.info("audit heads of %s delivered to %s again", self._signer, name)
        return ok

    def _failed(self, name: str, code: grpc.StatusCode | None, details: str) -> None:
        if code is grpc.StatusCode.FAILED_PRECONDITION or code is None:
            self._known.pop(name, None)  # ask it again what it holds
            log.error("%s refused the audit head of %s: %s", name, self._signer, details)
        elif name not in self._failing:
            log.warning(
                "cannot send the audit heads of %s to %s (%s): will retry",
                self._signer,
                name,
                code.name,
            )
        self._failing.add(name)

    def _latest_size(self) -> int:
        t = self._checkpoints
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.max(t.c.tree_size))).scalar() or 0)

    def _push(self, name: str, stub: WitnessStub, timeout: float, ready: bool) -> None:
        known = self._known.get(name)
        if known is not None and self._latest_size() <= known:
            return  # nothing new for this witness
        if known is None:
            if not self._latest_size():
                return  # nothing to send yet: do not bother the witness
            held = fetch_witnessed(
                stub, self._signer, latest_only=True, timeout=timeout, wait_for_ready=ready
            )
            known = self._known[name] = held[0].head.tree_size if held else 0
        t = self._checkpoints
        while True:
            query = select(t).where(t.c.tree_size > known)
            if known == 0:  # a witness new to us starts from our latest head
                query = query.order_by(t.c.tree_size.desc()).limit(1)
            else:
                query = query.order_by(t.c.tree_size).limit(_BATCH)
            with self._engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            for row in rows:
                r = row._mapping
                head = Checkpoint(
                    self._signer,
                    int(r["tree_size"]),
                    bytes(r["root_hash"]),
                    int(r["signed_at_us"]),
                    bytes(r["signature"]),
                    str(r["signer_cert_pem"]).encode("ascii"),
                )
                proof = self._subtrees.consistency(known, head.tree_size) if known else []
                stub.WitnessTreeHead(
                    wpb.WitnessTreeHeadRequest(
                        head=head_to_proto(head), proof_from_size=known, consistency_proof=proof
                    ),
                    timeout=timeout,
                    wait_for_ready=ready,
                )
                known = self._known[name] = head.tree_size

    def _run(self) -> None:
        backoff = self._retry
        while not self._stop.is_set():
            try:
                ok = self.push_once()
            except Exception:
                log.exception("sending the audit heads of %s failed: will retry", self._signer)
                ok = False
            wait = self._interval if ok else backoff
            backoff = self._retry if ok else min(MAX_BACKOFF, backoff * 2)
            self._wake.wait(wait)
            self._wake.clear()

    def close(self, final_timeout: float = 2.0) -> None:
        """Stop, after one last attempt to send what is pending (the checkpoint signed at
        shutdown): best effort, bounded by ``final_timeout`` per witness call."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.push_once(timeout=final_timeout)
        except Exception:
            log.exception("last delivery of the audit heads of %s failed", self._signer)

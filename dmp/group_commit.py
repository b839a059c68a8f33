"""Group commit: concurrent callers share one durable transaction.

Each caller hands its item over; one thread takes every item waiting at that moment (at
most `max_batch`) and writes them in one transaction, then gives each caller its own
outcome. A busy service pays one durable commit for many calls instead of one each. Used
by the audit log (events), the seen nonces (assertion nonces) and the node's shared
PutRecord commits (dmp/shared_commit.py).

The thread that writes is a caller's own (leader and followers): a caller that finds no
batch being written writes one itself, with whatever waits by then; callers arriving
meanwhile wait, and when the batch is done the turn passes to the first of them, who writes
the next. A lone caller thus commits on its own thread, without handing its item to
another thread and waiting to be woken (two thread switches a call). Items handed over
without waiting (`start`) are written by a worker thread when no caller holds the turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

#: Writes one batch; returns one outcome per item, in order (a value, or the error that
#: caller must raise). An exception it raises is `on_failure`'s to turn into the outcome of
#: every item of the batch.
WriteBatch = Callable[[Sequence[T]], Sequence[R | BaseException]]


class Pending(Protocol[R_co]):
    def result(self) -> R_co:
        """Wait for the commit; the outcome, or raise the caller's error."""
        ...


class _Waiter(Generic[T, R]):
    __slots__ = ("blocking", "finished", "item", "lead", "outcome", "wake")

    def __init__(self, item: T, blocking: bool) -> None:
        self.item = item
        #: Its caller waits in submit() and may be given the turn to write.
        self.blocking = blocking
        self.wake = threading.Event()
        self.finished = False
        self.lead = False
        self.outcome: R | BaseException | None = None

    def result(self) -> R:
        self.wake.wait()
        return self.value()

    def value(self) -> R:
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value]


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        name: str,
        write: WriteBatch[T, R],
        on_failure: Callable[[Exception], BaseException],
        max_batch: int | None = None,
    ) -> None:
        self._name = name
        self._write = write
        self._on_failure = on_failure
        self._max = max_batch
        self._queue: list[_Waiter[T, R]] = []
        self._lock = threading.Lock()
        #: Someone (a caller or the worker) holds the turn to write.
        self._busy = False
        self._worker_due = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, item: T) -> R:
        """Wait until `item` is committed with the others waiting; its outcome, or raise."""
        waiter: _Waiter[T, R] = _Waiter(item, blocking=True)
        with self._lock:
            self._queue.append(waiter)
            lead = not self._busy
            self._busy = True
        if not lead:
            waiter.wake.wait()  # written by another, or given the turn
            if not waiter.lead:
                return waiter.value()
        self._lead(waiter)
        return waiter.value()

    def start(self, item: T) -> Pending[R]:
        """Hand `item` over and return at once: its `result()` waits for the commit (so
        that the caller's own work overlaps the disk flush)."""
        waiter: _Waiter[T, R] = _Waiter(item, blocking=False)
        with self._lock:
            self._queue.append(waiter)
            idle = not self._busy
            self._busy = True
            if idle:
                self._wake_worker()
        return waiter

    def waiting(self) -> int:
        """How many items wait for the next batch."""
        with self._lock:
            return len(self._queue)

    def _lead(self, own: _Waiter[T, R] | None) -> None:
        """Holding the turn: write batches until `own` is written (the worker: until none
        waits), then pass the turn on."""
        try:
            while True:
                with self._lock:
                    if not self._queue or (own is not None and own.finished):
                        self._pass_turn()
                        return
                    cut = len(self._queue) if self._max is None else self._max
                    batch, self._queue = self._queue[:cut], self._queue[cut:]
                self._write_batch(batch)
        except BaseException:
            with self._lock:
                self._pass_turn()
            raise

    def _pass_turn(self) -> None:
        """(Lock held.) To the first caller waiting in submit(), else to the worker for
        items handed over by start(), else nobody."""
        for waiter in self._queue:
            if waiter.blocking:
                waiter.lead = True
                waiter.wake.set()
                return
        if self._queue:
            self._wake_worker()
        else:
            self._busy = False

    def _write_batch(self, batch: list[_Waiter[T, R]]) -> None:
        try:
            outcomes = list(self._write([w.item for w in batch]))
        except Exception as exc:
            failure = self._on_failure(exc)
            outcomes = [failure] * len(batch)
        except BaseException as exc:  # the writing thread itself is going: fail the batch
            self._settle(batch, [exc] * len(batch))
            raise
        self._settle(batch, outcomes)

    @staticmethod
    def _settle(batch: list[_Waiter[T, R]], outcomes: Sequence[R | BaseException]) -> None:
        for waiter, outcome in zip(batch, outcomes, strict=True):
            waiter.outcome = outcome
            waiter.finished = True
            waiter.wake.set()

    def _wake_worker(self) -> None:
        """(Lock held.) Have the worker thread take the turn."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._worker_due.set()

    def _work(self) -> None:
        """The worker: take the turn when given it, for as long as the process lives."""
        while True:
            self._worker_due.wait()
            self._worker_due.clear()
            self._lead(None)

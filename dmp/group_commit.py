"""Group commit: concurrent callers share one durable transaction.

Each caller hands its item over and waits; one thread takes every item waiting at that
moment (at most `max_batch`) and writes them in one transaction, then gives each caller
its own outcome. A busy service pays one durable commit for many calls instead of one
each. Used by the audit log (events) and by the seen nonces (assertion nonces).
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
    __slots__ = ("done", "item", "outcome")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = threading.Event()
        self.outcome: R | BaseException | None = None

    def result(self) -> R:
        self.done.wait()
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
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, item: T) -> R:
        """Wait until `item` is committed with the others waiting; its outcome, or raise."""
        return self.start(item).result()

    def start(self, item: T) -> Pending[R]:
        """Hand `item` over and return at once: its `result()` waits for the commit (so
        that the caller's own work overlaps the disk flush)."""
        waiter: _Waiter[T, R] = _Waiter(item)
        with self._ready:
            self._queue.append(waiter)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._ready.notify()
        return waiter

    def waiting(self) -> int:
        """How many items wait for the next batch."""
        with self._ready:
            return len(self._queue)

    def _run(self) -> None:
        """Write the waiting items, batch after batch, for as long as the process lives."""
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                cut = len(self._queue) if self._max is None else self._max
                batch, self._queue = self._queue[:cut], self._queue[cut:]
            try:
                outcomes = list(self._write([w.item for w in batch]))
            except Exception as exc:
                failure = self._on_failure(exc)
                outcomes = [failure] * len(batch)
            for waiter, outcome in zip(batch, outcomes, strict=True):
                waiter.outcome = outcome
                waiter.done.set()

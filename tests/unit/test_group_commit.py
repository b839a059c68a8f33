"""Group commit: every caller gets its own outcome, and a failed batch fails each caller."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from dmp.group_commit import GroupCommit


def test_concurrent_callers_share_batches_and_each_get_their_own_outcome() -> None:
    batches: list[int] = []
    gate = threading.Event()

    def write(items: Sequence[int]) -> list[int | BaseException]:
        gate.wait(5)  # the first batch waits, so that the others pile up behind it
        batches.append(len(items))
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    commits: GroupCommit[int, int] = GroupCommit("test-commit", write, lambda e: e, max_batch=50)

    def call(i: int) -> int | str:
        try:
            return commits.submit(i)
        except ValueError as exc:
            return str(exc)

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(call, i) for i in range(200)]
        for _ in range(500):  # until the callers queue up behind the first, held, batch
            if len(commits._queue) >= 20:
                break
            threading.Event().wait(0.01)
        gate.set()
        answers = [f.result(timeout=10) for f in futures]
    assert answers == [f"odd {i}" if i % 2 else i * 10 for i in range(200)]
    assert sum(batches) == 200
    assert max(batches) <= 50
    assert max(batches) >= 20  # callers shared a commit


def test_a_batch_that_raises_fails_every_caller_with_the_mapped_error() -> None:
    def write(items: Sequence[str]) -> list[str | BaseException]:
        raise OSError("disk gone")

    commits: GroupCommit[str, str] = GroupCommit(
        "test-commit", write, lambda e: RuntimeError(f"unavailable: {e}")
    )
    for _ in range(3):  # the committing thread survives a failed batch
        with pytest.raises(RuntimeError, match="unavailable: disk gone"):
            commits.submit("x")

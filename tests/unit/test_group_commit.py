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


def test_a_lone_caller_writes_on_its_own_thread_and_handed_over_items_on_the_worker() -> None:
    threads: list[str] = []

    def write(items: Sequence[str]) -> list[str | BaseException]:
        threads.append(threading.current_thread().name)
        return [item.upper() for item in items]

    commits: GroupCommit[str, str] = GroupCommit("test-commit", write, lambda e: e)
    assert commits.submit("a") == "A"
    assert threads == [threading.current_thread().name]  # no hand-over to another thread
    pending = commits.start("b")  # nobody waits in submit(): the worker writes it
    assert pending.result() == "B"
    assert threads[-1] == "test-commit"
    assert commits.submit("c") == "C"  # and the turn came back to callers
    assert threads[-1] == threading.current_thread().name


def test_the_turn_passes_on_when_a_writer_dies_and_followers_are_written_by_one_of_them() -> None:
    held = threading.Event()
    release = threading.Event()
    batches: list[list[int]] = []

    def write(items: Sequence[int]) -> list[int | BaseException]:
        if items[0] == 0:
            held.set()
            release.wait(5)
            raise KeyboardInterrupt  # not an Exception: the leader's own call dies
        batches.append(list(items))
        return [i * 2 for i in items]

    commits: GroupCommit[int, int] = GroupCommit("test-commit", write, lambda e: e)
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(commits.submit, 0)
        assert held.wait(5)
        others = [pool.submit(commits.submit, i) for i in range(1, 9)]
        for _ in range(500):  # until the followers queue up behind the held batch
            if commits.waiting() == 8:
                break
            threading.Event().wait(0.01)
        release.set()
        with pytest.raises(KeyboardInterrupt):
            first.result(timeout=5)
        assert [f.result(timeout=5) for f in others] == [i * 2 for i in range(1, 9)]
    assert sorted(i for batch in batches for i in batch) == list(range(1, 9))
    assert len(batches) < 8  # the followers shared commits

"""The seen-nonce table (dmp/nonces.py) on SQLite and PostgreSQL: one winner per nonce,
even within one group commit, and expired nonces purged."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from dmp.db import make_engine, upgrade
from dmp.nonces import StoredNonces
from node.app import MIGRATIONS
from node.models import seen_nonces


def test_each_nonce_is_new_once_and_expired_ones_are_purged(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, MIGRATIONS, "alembic_version_node")
    now = [1_000_000_000]
    nonces = StoredNonces(engine, seen_nonces, clock=lambda: now[0], purge_interval_s=0)
    # 20 callers race with 5 distinct nonces: exactly one caller wins each.
    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(
            pool.map(
                lambda i: (i % 5, nonces.first_time(bytes([i % 5]) * 16, now[0] + 10, now[0])),
                range(20),
            )
        )
    assert sorted(n for n, new in outcomes if new) == [0, 1, 2, 3, 4]
    assert not nonces.first_time(bytes([0]) * 16, now[0] + 10, now[0])
    # Once past their keep_until, they are purged by the next commit (and new again).
    now[0] += 11
    assert nonces.first_time(b"\xff" * 16, now[0] + 10, now[0])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(seen_nonces)).scalar() == 1
    engine.dispose()

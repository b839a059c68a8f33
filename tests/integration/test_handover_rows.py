"""What a hand-over carries, applied at the successor: sealed to its certificate, data keys
wrapped with its own KEK, upserts and deletions idempotent, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from dmp.certificates import certificate_from_pem, load_private_key
from dmp.envelope import FileKek
from dmp.pki import load_credentials
from node.handover_cli import open_node_database
from node.handover_rows import TABLES, Applier, BatchWriter, Unwrapper, upsert_many
from tests.handover_rig import REGION, Hosts


def test_batches_apply_idempotently_with_keys_rewrapped(tmp_path: Path, db_url: str) -> None:
    hosts = Hosts.make(tmp_path)
    successor = load_credentials(hosts.b, f"node-{REGION}")
    old_kek, new_kek = FileKek(b"a" * 32), FileKek(b"b" * 32)
    data_key = b"k" * 32
    keys, nonces, outbox = TABLES["data_keys"], TABLES["seen_nonces"], TABLES["locator_outbox"]

    def batch() -> BatchWriter:
        return BatchWriter(
            certificate_from_pem(successor.cert_pem),
            "successor",
            Unwrapper(lambda kek_id, wrapped: old_kek.unwrap(wrapped)),
        )

    first = batch()
    first.add(keys, ("185027512345625", old_kek.key_id, old_kek.wrap(data_key), 1, None))
    for n in range(3):
        first.add(nonces, (bytes([n]) * 16, 100 + n))
        first.add(outbox, (n + 1, "185027512345625", 10 + n))
    second = batch()
    second.add(nonces, (b"\x01" * 16, 999))  # changed
    second.add(nonces, (b"\x07" * 16, 7))  # new
    second.delete(outbox, [(2,)])
    engine = open_node_database(db_url, create=True)
    applier = Applier(load_private_key(successor.key_pem), new_kek)
    try:
        for sealed in (first.seal(), second.seal(), first.seal(), second.seal()):
            with engine.begin() as conn:
                applier.apply(conn, sealed)
        with engine.connect() as conn:
            kept = dict(
                (bytes(n), k)
                for n, k in conn.execute(select(nonces.c.nonce, nonces.c.keep_until_us))
            )
            seqs = sorted(s for (s,) in conn.execute(select(outbox.c.seq)))
            kek_id, wrapped = conn.execute(select(keys.c.kek_id, keys.c.wrapped)).one()
    finally:
        engine.dispose()
    # Each batch applied twice, in order: the state of the last one.
    assert kept == {b"\x00" * 16: 100, b"\x01" * 16: 999, b"\x02" * 16: 102, b"\x07" * 16: 7}
    assert seqs == [1, 3]
    assert kek_id == new_kek.key_id and new_kek.unwrap(bytes(wrapped)) == data_key
    assert bytes(wrapped) != old_kek.wrap(data_key)


def test_upsert_many_updates_the_rows_already_there(tmp_path: Path, db_url: str) -> None:
    nonces = TABLES["seen_nonces"]
    engine = open_node_database(db_url, create=True)
    try:
        with engine.begin() as conn:
            upsert_many(conn, nonces, [{"nonce": b"a" * 16, "keep_until_us": 1}])
            upsert_many(
                conn,
                nonces,
                [
                    {"nonce": b"a" * 16, "keep_until_us": 2},
                    {"nonce": b"b" * 16, "keep_until_us": 3},
                ],
            )
        with engine.connect() as conn:
            rows = sorted((bytes(n), k) for n, k in conn.execute(select(nonces)))
    finally:
        engine.dispose()
    assert rows == [(b"a" * 16, 2), (b"b" * 16, 3)]

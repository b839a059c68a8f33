"""`dmp node init-kek | encrypt | rotate-kek | shred`: the operator's key tasks
(node/key_admin.py), each on the node's database while it serves or not."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from dmp.clock import from_us
from dmp.db import make_engine, upgrade
from dmp.dbfile import sqlite_file
from dmp.errors import FailedPrecondition
from dmp.ins import normalize_ins
from dmp.regions import check_region


def register_keys(node_sub: argparse._SubParsersAction[Any]) -> None:
    init = node_sub.add_parser(
        "init-kek",
        help="create a key-encryption key file (32 random bytes, mode 0600)",
        description="Create a node's key-encryption key: 32 random bytes in FILE, mode 0600"
        " in a 0700 directory. Never overwrites a file. Keep it off the database's host"
        " backups: a backup never contains it.",
    )
    init.add_argument("file", type=Path, metavar="FILE")
    init.set_defaults(handler=_init_kek)

    encrypt = node_sub.add_parser(
        "encrypt",
        help="encrypt a node's records stored in clear, in place (online, resumable)",
        description="Seal every record still stored in clear with its patient's data key,"
        " in committed batches: safe while the node serves (started with the same"
        " --kek-file), and a rerun continues where an interrupted one stopped.",
    )
    _database(encrypt)
    encrypt.add_argument("--batch", type=int, default=200, help="records per transaction")
    encrypt.set_defaults(handler=_encrypt)

    rotate = node_sub.add_parser(
        "rotate-kek",
        help="rewrap every data key with a new KEK (content untouched, resumable)",
        description="Rewrap every patient's data key with the new KEK, in committed"
        " batches; rerun it after a crash to finish. Content is not re-encrypted. Online:"
        " serve meanwhile with --kek-file NEW --previous-kek-file OLD, then restart with"
        " --kek-file NEW alone (or stop the node, rotate, start it with NEW): the old KEK"
        " then opens nothing.",
    )
    _database(rotate)
    rotate.add_argument("--new-kek-file", type=Path, required=True, metavar="FILE")
    rotate.add_argument("--batch", type=int, default=200, help="keys per transaction")
    rotate.set_defaults(handler=_rotate)

    shred = node_sub.add_parser(
        "shred",
        help="crypto-shred a patient: destroy their data key (audited, irreversible)",
        description="Destroy the data key of a patient (after the legal retention): their"
        " records' content and free-text metadata can no longer be read by anyone,"
        " including from backups that did not keep the key. Their records stay listed as"
        " shredded. Written to the node's audit log.",
    )
    _database(shred)
    shred.add_argument("--patient", required=True, metavar="INS")
    shred.add_argument("--region", required=True, help="the node's region (its audit log)")
    shred.add_argument("--operator", default="", help="who shreds, for the audit event")
    shred.set_defaults(handler=_shred)


def _database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", required=True, metavar="URL", help="the node's database URL")
    parser.add_argument("--kek-file", type=Path, required=True, metavar="FILE")


def _open(url: str, task: str) -> Engine:
    from node.app import MIGRATIONS
    from node.handover_state import refuse_if_not_in_charge

    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise FailedPrecondition(f"no database at {path}")
    engine = make_engine(url)
    try:
        upgrade(engine, MIGRATIONS, "alembic_version_node")
        refuse_if_not_in_charge(engine, task)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _init_kek(args: argparse.Namespace) -> int:
    from dmp.envelope import init_kek_file

    os.umask(0o077)
    kek = init_kek_file(args.file)
    print(f"KEK {kek.key_id} written to {args.file} (mode 0600): keep it apart from backups")
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    from dmp.envelope import load_kek_file
    from node.key_admin import Progress, encrypt_in_place

    kek = load_kek_file(args.kek_file)
    engine = _open(args.db, "dmp node encrypt")

    def show(progress: Progress) -> None:
        print(f"\rsealed {progress.done}, {progress.remaining} left", end="", file=sys.stderr)

    try:
        done = encrypt_in_place(engine, kek, batch=args.batch, on_batch=show)
    finally:
        engine.dispose()
    print(file=sys.stderr)
    print(f"encrypted {done} record(s) in place; every record is sealed (KEK {kek.key_id})")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from dmp.envelope import load_kek_file
    from node.key_admin import Progress, rotate_kek

    old, new = load_kek_file(args.kek_file), load_kek_file(args.new_kek_file)
    engine = _open(args.db, "dmp node rotate-kek")

    def show(progress: Progress) -> None:
        print(f"\rrewrapped {progress.done}, {progress.remaining} left", end="", file=sys.stderr)

    try:
        done = rotate_kek(engine, old, new, batch=args.batch, on_batch=show)
    finally:
        engine.dispose()
    print(file=sys.stderr)
    print(
        f"rewrapped {done} data key(s): every key is now wrapped by {new.key_id};"
        f" {old.key_id} opens nothing. Serve with --kek-file {args.new_kek_file}"
    )
    return 0


def _shred(args: argparse.Namespace) -> int:
    from dmp.envelope import load_kek_file
    from node.key_admin import shred_patient

    kek = load_kek_file(args.kek_file)
    ins = normalize_ins(args.patient)
    engine = _open(args.db, "dmp node shred")
    try:
        done = shred_patient(engine, kek, check_region(args.region), ins, operator=args.operator)
    finally:
        engine.dispose()
    when = from_us(done.shredded_us).ToJsonString()
    if done.already:
        print(f"patient {ins} was already shredded on {when} ({done.records} record(s))")
    else:
        print(f"shredded patient {ins}: {done.records} record(s) unreadable since {when}")
    return 0

"""The key module: KEK files, key wrap, sealed values bound to their place."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dmp.envelope import (
    FileKek,
    KeyCache,
    init_kek_file,
    load_kek_file,
    new_data_key,
    open_value,
    seal,
)
from dmp.errors import DataLoss, FailedPrecondition


def test_init_kek_creates_a_private_file_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "kek"
    kek = init_kek_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_size == 32
    assert load_kek_file(path).key_id == kek.key_id
    before = path.read_bytes()
    with pytest.raises(FailedPrecondition, match="never overwritten"):
        init_kek_file(path)
    assert path.read_bytes() == before


def test_a_kek_file_others_may_read_or_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    init_kek_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(FailedPrecondition, match="readable by other users"):
        load_kek_file(path)
    short = tmp_path / "short"
    short.write_bytes(b"x" * 16)
    os.chmod(short, 0o600)
    with pytest.raises(FailedPrecondition, match="16 bytes, not 32"):
        load_kek_file(short)
    with pytest.raises(FailedPrecondition, match="does not exist"):
        load_kek_file(tmp_path / "missing")


def test_wrap_unwrap_and_another_kek_opens_nothing() -> None:
    kek, other = FileKek(os.urandom(32)), FileKek(os.urandom(32))
    key = new_data_key()
    wrapped = kek.wrap(key)
    assert wrapped != key and len(wrapped) == 40
    assert kek.unwrap(wrapped) == key
    assert kek.key_id != other.key_id and "file:" in kek.key_id
    with pytest.raises(FailedPrecondition, match="does not open this data key"):
        other.unwrap(wrapped)
    assert key.hex() not in repr(kek)


def test_sealed_values_open_only_in_their_place() -> None:
    key = new_data_key()
    a = seal(key, b"compte rendu", "rec-a", 1, "content")
    b = seal(key, b"compte rendu", "rec-a", 1, "content")
    assert a != b  # a fresh nonce each time
    assert b"compte rendu" not in a
    assert open_value(key, a, "rec-a", 1, "content") == b"compte rendu"
    with pytest.raises(DataLoss, match="record rec-b"):
        open_value(key, a, "rec-b", 1, "content")  # another row
    with pytest.raises(DataLoss, match="record rec-a: its encrypted content"):
        open_value(key, a, "rec-a", 2, "content")  # another version
    with pytest.raises(DataLoss, match="record rec-a: its encrypted title"):
        open_value(key, a, "rec-a", 1, "title")  # another column
    flipped = bytearray(a)
    flipped[-1] ^= 1
    with pytest.raises(DataLoss, match="does not open"):
        open_value(key, bytes(flipped), "rec-a", 1, "content")
    with pytest.raises(DataLoss):
        open_value(new_data_key(), a, "rec-a", 1, "content")


def test_the_cache_is_bounded_and_keyed_by_the_wrapped_form() -> None:
    kek = FileKek(os.urandom(32))
    cache = KeyCache(kek, limit=2)
    keys = [new_data_key() for _ in range(3)]
    wrapped = [kek.wrap(k) for k in keys]
    assert [cache.unwrap(w) for w in wrapped] == keys
    assert "KeyCache" in repr(cache) and keys[0].hex() not in repr(cache)
    assert len(cache._keys) == 2
    cache.forget(wrapped[2])
    assert len(cache._keys) == 1

"""Envelope encryption at rest: a key-encryption key (KEK) outside the database wraps one
data key per patient, and each data key seals that patient's values.

- `KeyEncryptionKey` is the interface an HSM or a KMS can serve later: wrap and unwrap a
  data key, and a key id that names the KEK (stored beside each wrapped key, so that a
  rotation knows which KEK wraps which row). `FileKek` is the one there is today: 32
  random bytes in a file created 0600 by `dmp node init-kek FILE`, wrapping with AES key
  wrap (RFC 3394).
- `seal` / `open_value`: AES-256-GCM, a fresh 96-bit nonce per value, and associated data
  binding the value to its record id, version and column: a ciphertext moved to another
  row or column does not open (DATA_LOSS naming the record).

Keys never reach a log, an error message or a repr.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import OrderedDict
from pathlib import Path
from threading import Lock
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from dmp.errors import DataLoss, FailedPrecondition

KEY_BYTES = 32
NONCE_BYTES = 12
#: First byte of every sealed value: the format, so that a later one can be told apart.
FORMAT = b"\x01"
#: Associated data prefix: a change of what is bound gets a new tag.
AD_TAG = b"dmp-seal-v1"


class KeyEncryptionKey(Protocol):
    """What wraps the data keys: a file today, an HSM or a KMS later."""

    @property
    def key_id(self) -> str:
        """A stable name of this KEK (never the key): stored beside what it wraps."""
        ...

    def wrap(self, data_key: bytes) -> bytes:
        """`data_key` wrapped by this KEK."""
        ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """The data key `wrapped` holds; FailedPrecondition if this KEK did not wrap it."""
        ...


class FileKek:
    """A KEK read from a file of 32 random bytes, private to its owner."""

    def __init__(self, key: bytes, source: str = "") -> None:
        if len(key) != KEY_BYTES:
            raise FailedPrecondition(f"a KEK is {KEY_BYTES} bytes, not {len(key)}")
        self._key = key
        self._source = source
        # Derived, one-way: names the KEK without revealing anything of it.
        self._id = "file:" + hashlib.sha256(b"dmp-kek-id\x00" + key).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"FileKek({self._id})"

    @property
    def key_id(self) -> str:
        return self._id

    def wrap(self, data_key: bytes) -> bytes:
        return aes_key_wrap(self._key, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap(self._key, wrapped)
        except InvalidUnwrap:
            raise FailedPrecondition(
                f"the KEK {self._id} does not open this data key: it was wrapped by another"
                " KEK (give the --kek-file the node was rotated to)",
                reason="WRONG_KEK",
            ) from None


def init_kek_file(path: Path) -> FileKek:
    """Create a new KEK file, mode 0600 in a 0700 directory; never overwrite one."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path.parent, 0o700)
    key = os.urandom(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FailedPrecondition(
            f"{path} already exists: a KEK is never overwritten (the data keys it wraps"
            " would be lost); choose another file"
        ) from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileKek(key, str(path))


def load_kek_file(path: Path) -> FileKek:
    """Read a KEK file; refused if others may read it or if it is not 32 bytes."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FailedPrecondition(
            f"KEK file {path} does not exist: create one with `dmp node init-kek {path}`"
        ) from None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise FailedPrecondition(
            f"KEK file {path} is readable by other users (mode {mode:o}): chmod 600 it"
            " (and consider the key exposed: rotate with `dmp node rotate-kek`)"
        )
    if info.st_size != KEY_BYTES:
        raise FailedPrecondition(
            f"KEK file {path} is {info.st_size} bytes, not {KEY_BYTES}: not a KEK made by"
            " `dmp node init-kek`"
        )
    return FileKek(path.read_bytes(), str(path))


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def associated_data(record_id: str, version: int, column: str) -> bytes:
    """What binds a sealed value to its place: record id, version and column."""
    return b"\x00".join((AD_TAG, record_id.encode(), str(version).encode(), column.encode()))


def seal(data_key: bytes, plaintext: bytes, record_id: str, version: int, column: str) -> bytes:
    """`plaintext` encrypted with a fresh nonce, bound to (record id, version, column)."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(data_key).encrypt(nonce, plaintext, associated_data(record_id, version, column))
    return FORMAT + nonce + sealed


def open_value(data_key: bytes, sealed: bytes, record_id: str, version: int, column: str) -> bytes:
    """The plaintext of a sealed value; DATA_LOSS naming the record if it does not open
    here (damaged, or moved from another row or column)."""
    if sealed[:1] != FORMAT or len(sealed) < 1 + NONCE_BYTES + 16:
        raise _not_opened(record_id, column)
    try:
        return AESGCM(data_key).decrypt(
            sealed[1 : 1 + NONCE_BYTES],
            sealed[1 + NONCE_BYTES :],
            associated_data(record_id, version, column),
        )
    except InvalidTag:
        raise _not_opened(record_id, column) from None


def is_sealed(value: bytes | None) -> bool:
    return bool(value) and value[:1] == FORMAT  # type: ignore[index]


def _not_opened(record_id: str, column: str) -> DataLoss:
    return DataLoss(
        f"record {record_id}: its encrypted {column} does not open with its patient's data key"
        " (damaged, or moved from another record or column); it is not served: the node's"
        " operator must restore it from the last verified backup"
    )


class KeyCache:
    """Unwrapped data keys in memory, by their wrapped form, bounded (least recently used
    goes first). Keyed by the wrapped bytes: a rotated or shredded key is never served
    from here, since the store reads the wrapped key of each call."""

    def __init__(self, kek: KeyEncryptionKey, limit: int = 10_000) -> None:
        self.kek = kek
        self._limit = limit
        self._keys: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = Lock()

    def __repr__(self) -> str:
        return f"KeyCache({self.kek.key_id}, {len(self._keys)} keys)"

    def unwrap(self, wrapped: bytes) -> bytes:
        with self._lock:
            key = self._keys.get(wrapped)
            if key is not None:
                self._keys.move_to_end(wrapped)
                return key
        key = self.kek.unwrap(wrapped)
        with self._lock:
            self._keys[wrapped] = key
            while len(self._keys) > self._limit:
                self._keys.popitem(last=False)
        return key

    def forget(self, wrapped: bytes) -> None:
        with self._lock:
            self._keys.pop(wrapped, None)

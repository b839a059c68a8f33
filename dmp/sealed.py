"""Sealed files: a byte stream encrypted to one certificate's key, written and read in chunks.

ECDH P-256 between an ephemeral key (one per file) and the recipient certificate's key,
HKDF-SHA256 into an AES-256-GCM key, then the stream in chunks of at most `CHUNK` bytes,
each its own GCM message: its nonce is its position and whether it is the last one, and
its associated data the SHA-256 of the file's header. A changed bit anywhere fails that
chunk's authentication; chunks swapped, dropped or cut off at the end are detected by
their positions and the last chunk's mark. Without the recipient's private key the file is
noise: a stolen backup is useless.

Layout: MAGIC, a 4-byte big-endian header length, the header (JSON: the recipient's
identity and key fingerprint, the ephemeral public key, the salt), then per chunk one byte
(1 for the last chunk, else 0), a 4-byte length and the ciphertext with its tag.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO, Final

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC: Final = b"DMPSEAL1"
CHUNK: Final = 1 << 20
_INFO: Final = b"dmp-sealed-v1 aes-256-gcm"
_LENGTH = struct.Struct(">I")
_MAX_HEADER: Final = 64 * 1024


class SealError(Exception):
    """Why a sealed file cannot be opened: a person can act on the message."""


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the key's SubjectPublicKeyInfo, hex: which key a file is sealed to."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _derive(shared: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(shared)


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class SealedWriter:
    """Writes a stream sealed to `recipient`'s key into `out`; `close()` writes the last chunk."""

    def __init__(self, out: BinaryIO, recipient: x509.Certificate, recipient_name: str) -> None:
        public = recipient.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise SealError("the recipient certificate holds no ECDSA P-256 key")
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        salt = os.urandom(16)
        header = json.dumps(
            {
                "recipient": recipient_name,
                "recipient_key_sha256": key_fingerprint(public),
                "ephemeral": ephemeral.public_key()
                .public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
                .hex(),
                "salt": salt.hex(),
                "cipher": "ECDH-P256+HKDF-SHA256+AES-256-GCM",
            },
            sort_keys=True,
        ).encode()
        self._aead = AESGCM(_derive(ephemeral.exchange(ec.ECDH(), public), salt))
        self._aad = hashlib.sha256(header).digest()
        self._out = out
        self._buffer = bytearray()
        self._index = 0
        self.written = 0
        self._emit(MAGIC + _LENGTH.pack(len(header)) + header)

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.written += len(data)

    def _chunk(self, plain: bytes, last: bool) -> None:
        sealed = self._aead.encrypt(_nonce(self._index, last), plain, self._aad)
        self._index += 1
        self._emit((b"\x01" if last else b"\x00") + _LENGTH.pack(len(sealed)) + sealed)

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) > CHUNK:
            self._chunk(bytes(self._buffer[:CHUNK]), False)
            del self._buffer[:CHUNK]

    def close(self) -> None:
        self._chunk(bytes(self._buffer), True)
        self._buffer.clear()


def _read_exactly(source: BinaryIO, size: int, what: str) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise SealError(f"the file is truncated ({what} cut off)")
    return data


def read_header(source: BinaryIO) -> tuple[dict[str, str], bytes]:
    """The header of a sealed file (and its bytes), the stream left at the first chunk."""
    if source.read(len(MAGIC)) != MAGIC:
        raise SealError("not a DMP backup file (no sealed-file header)")
    (length,) = _LENGTH.unpack(_read_exactly(source, 4, "header"))
    if length > _MAX_HEADER:
        raise SealError("the file's header is damaged (impossible length)")
    raw = _read_exactly(source, length, "header")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except ValueError:
        raise SealError("the file's header is damaged (not JSON)") from None
    return header, raw


def open_sealed(source: BinaryIO, key: ec.EllipticCurvePrivateKey) -> Iterator[bytes]:
    """The plaintext chunks of a sealed file, each authenticated before it is given out.

    SealError names the problem: another recipient's key, a changed bit (with the chunk),
    a truncated file."""
    header, raw = read_header(source)
    fingerprint = key_fingerprint(key.public_key())
    if header.get("recipient_key_sha256") != fingerprint:
        raise SealError(
            f"wrong recipient key: the file is encrypted to {header.get('recipient', '?')}"
            f" (key {str(header.get('recipient_key_sha256', '?'))[:16]}...), not to the key"
            f" given (key {fingerprint[:16]}...)"
        )
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), bytes.fromhex(header["ephemeral"])
        )
        salt = bytes.fromhex(header["salt"])
    except (KeyError, ValueError, TypeError):
        raise SealError("the file's header is damaged (bad ephemeral key or salt)") from None
    aead = AESGCM(_derive(key.exchange(ec.ECDH(), ephemeral), salt))
    aad = hashlib.sha256(raw).digest()
    index = 0
    while True:
        mark = source.read(1)
        if not mark:
            raise SealError(f"the file is truncated (ends after chunk {index}, before the last)")
        (length,) = _LENGTH.unpack(_read_exactly(source, 4, f"chunk {index}"))
        if length > CHUNK + 16:
            raise SealError(f"the file is damaged at chunk {index} (impossible length)")
        sealed = _read_exactly(source, length, f"chunk {index}")
        last = mark == b"\x01"
        try:
            plain = aead.decrypt(_nonce(index, last), sealed, aad)
        except InvalidTag:
            raise SealError(
                f"the file is damaged at chunk {index} of its encrypted stream: authentication"
                " failed (a changed bit, or a chunk not written by the backup)"
            ) from None
        yield plain
        index += 1
        if last:
            if source.read(1):
                raise SealError("the file is damaged: bytes after its last chunk")
            return

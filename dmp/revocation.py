"""The federation's revocation list as servers read it: revoked serials and when."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from dmp.certificates import _ca_public_key, _utc_now
from dmp.errors import FailedPrecondition

log = logging.getLogger("dmp.pki")


# --------------------------------------------------------------------------- revocation


class RevocationList:
    """The revoked serials of the federation CRL, kept in memory and refreshed on change.

    ``is_revoked`` is cheap: at most once per ``check_interval`` seconds it stats the file
    and re-reads it only if its inode, mtime or size changed. A CRL that is missing,
    unreadable or not signed by the CA is ignored with a warning and the last good set is
    kept; at construction it raises FailedPrecondition. Thread-safe.
    """

    def __init__(
        self, crl_path: Path, ca_cert: x509.Certificate, *, check_interval: float = 1.0
    ) -> None:
        self._path = Path(crl_path)
        self._ca_cert = ca_cert
        self._ca_key = _ca_public_key(ca_cert)
        self._interval = check_interval
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None
        self._serials: dict[int, datetime]
        try:
            self._stamp, self._serials = self._read()
        except _BadCrl as exc:
            raise FailedPrecondition(str(exc)) from None
        self._next_check = time.monotonic() + check_interval

    @property
    def path(self) -> Path:
        return self._path

    @property
    def revoked_serials(self) -> frozenset[int]:
        return frozenset(self._serials)

    def is_revoked(self, cert: x509.Certificate) -> bool:
        self._maybe_refresh()
        return cert.serial_number in self._serials

    def revoked_at(self, cert: x509.Certificate) -> datetime | None:
        """When the CA revoked `cert` (the CRL entry's revocation date), None if it did not:
        what a certificate signed before then stays valid (a patient's directives)."""
        self._maybe_refresh()
        return self._serials.get(cert.serial_number)

    def reload(self) -> bool:
        """Re-read the CRL now, whether or not it changed; True if it was read and good."""
        with self._lock:
            return self._refresh(force=True)

    def _maybe_refresh(self) -> None:
        if time.monotonic() < self._next_check:
            return
        # Another thread already refreshing: keep answering from the current set.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() >= self._next_check:
                self._refresh(force=False)
        finally:
            self._lock.release()

    def _refresh(self, *, force: bool) -> bool:
        """Re-read if forced or the file changed; called with the lock held."""
        self._next_check = time.monotonic() + self._interval
        try:
            stamp = self._stat()
        except _BadCrl as exc:
            if force or self._stamp is not None:
                log.warning("%s; keeping the last good revocation list", exc)
            self._stamp = None
            return False
        if not force and stamp == self._stamp:
            return True
        try:
            stamp, serials = self._read()
        except _BadCrl as exc:
            # Remember the bad file so the warning is logged once, not at every check.
            self._stamp = stamp
            log.warning("%s; keeping the last good revocation list", exc)
            return False
        if serials != self._serials:
            log.info("revocation list %s: %d revoked certificate(s)", self._path, len(serials))
        self._stamp, self._serials = stamp, serials
        return True

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise _BadCrl(f"CRL {self._path} cannot be read: {exc.strerror}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> tuple[tuple[int, int, int], dict[int, datetime]]:
        try:
            with open(self._path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as exc:
            raise _BadCrl(f"CRL {self._path} cannot be read: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            crl = x509.load_pem_x509_crl(data)
        except ValueError:
            raise _BadCrl(f"CRL {self._path} is not a PEM CRL") from None
        try:
            valid = crl.issuer == self._ca_cert.subject and crl.is_signature_valid(self._ca_key)
        except (InvalidSignature, ValueError, TypeError):
            valid = False
        if not valid:
            raise _BadCrl(f"CRL {self._path} is not signed by the federation CA")
        next_update = crl.next_update_utc
        if next_update is not None and next_update < _utc_now():
            log.warning(
                "CRL %s is stale (next update was due %s): re-sign it with the CA",
                self._path,
                next_update,
            )
        return stamp, {entry.serial_number: entry.revocation_date_utc for entry in crl}


class _BadCrl(Exception):
    pass

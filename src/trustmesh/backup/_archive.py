"""The encrypted container of a backup: a versioned header, then AES-256-GCM chunks.

Layout (all integers big-endian)::

    magic      16 bytes  b"TRUSTMESH-BACKUP"
    version     1 byte   1
    scrypt      3 bytes  log2(N), r, p
    chunk       1 byte   log2(plaintext bytes per chunk)
    salt       16 bytes  scrypt salt (random)
    nonce      7 bytes   nonce prefix (random)
    check      16 bytes  tells a wrong passphrase from a damaged archive
    chunks...            AES-256-GCM(plaintext chunk), 16-byte tag each

The key is scrypt(passphrase, salt). Each chunk's nonce is the prefix, a 4-byte
chunk counter and a last-chunk flag, and its associated data is the header: so
chunks cannot be reordered, dropped, or cut off at the end, and the header cannot
be changed, without authentication failing (the STREAM construction of Hoang,
Reyhanitabar, Rogaway and Vizár, as in age and Tink). Nothing is trusted before it
has been authenticated: a reader yields plaintext only chunk by chunk, after each
tag has verified.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from trustmesh.errors import BackupError

__all__ = ["FORMAT_VERSION", "MAGIC", "ArchiveReader", "ArchiveWriter"]

MAGIC = b"TRUSTMESH-BACKUP"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">16sB3BB16s7s16s")
_TAG = 16
#: scrypt cost: 2**17 x 8 x 128 bytes = 128 MiB of memory, about half a second.
_SCRYPT = (17, 8, 1)
_MAX_LOG2_N = 20  # refuse headers that would make a reader spend gigabytes
_CHUNK_LOG2 = 20  # 1 MiB chunks


def _derive(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> tuple[bytes, bytes]:
    material = Scrypt(salt=salt, length=64, n=1 << log2_n, r=r, p=p).derive(passphrase)
    check = hashlib.sha256(b"trustmesh-backup-check\0" + material[32:]).digest()[:16]
    return material[:32], check


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


class ArchiveWriter(io.RawIOBase):
    """A write-only stream that encrypts what is written to ``sink``.

    Call :meth:`close` to write the last chunk; without it the archive is
    truncated and readers refuse it.

    Args:
        sink: Where the header and chunks go.
        passphrase: What the key is derived from.
    """

    def __init__(self, sink: BinaryIO, passphrase: bytes) -> None:
        super().__init__()
        salt = os.urandom(16)
        self._prefix = os.urandom(7)
        key, check = _derive(passphrase, salt, *_SCRYPT)
        self._aead = AESGCM(key)
        self.header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, *_SCRYPT, _CHUNK_LOG2, salt, self._prefix, check
        )
        self._chunk = 1 << _CHUNK_LOG2
        self._sink = sink
        self._buffer = bytearray()
        self._counter = 0
        self.plaintext_bytes = 0
        sink.write(self.header)

    def writable(self) -> bool:
        return True

    def write(self, data: object) -> int:
        view = memoryview(data)  # type: ignore[arg-type]
        self._buffer += view
        self.plaintext_bytes += view.nbytes
        # Keep at least one byte back: the last chunk must be the one close() writes.
        while len(self._buffer) > self._chunk:
            self._emit(bytes(self._buffer[: self._chunk]), last=False)
            del self._buffer[: self._chunk]
        return view.nbytes

    def _emit(self, plaintext: bytes, *, last: bool) -> None:
        nonce = _nonce(self._prefix, self._counter, last)
        self._sink.write(self._aead.encrypt(nonce, plaintext, self.header))
        self._counter += 1

    def close(self) -> None:
        if not self.closed:
            self._emit(bytes(self._buffer), last=True)
            self._buffer.clear()
        super().close()


class ArchiveReader(io.RawIOBase):
    """A read-only stream of the authenticated plaintext of an archive.

    The passphrase is checked when it is opened; every chunk is authenticated
    before any of its bytes is returned.

    Args:
        source: The archive, positioned at its start.
        passphrase: The passphrase it was written with.
        name: How to call it in error messages.

    Raises:
        BackupError: Not a trustmesh backup, an unknown version, or the wrong
            passphrase (``reason`` ``format`` or ``passphrase``).
    """

    def __init__(self, source: BinaryIO, passphrase: bytes, *, name: str) -> None:
        super().__init__()
        self.name = name
        header = source.read(_HEADER.size)
        if header and len(header) < _HEADER.size and MAGIC.startswith(header[:16]):
            raise BackupError(
                f"{name} is truncated (its header is incomplete); nothing was restored. "
                f"Use a complete copy of the backup.",
                reason="truncated",
            )
        if len(header) < _HEADER.size or not header.startswith(MAGIC):
            raise BackupError(
                f"{name} is not a trustmesh backup (no trustmesh header); give a file "
                f"written by 'trustmesh ca backup'.",
                reason="format",
            )
        _, version, log2_n, r, p, chunk_log2, salt, prefix, check = _HEADER.unpack(header)
        if version != FORMAT_VERSION:
            raise BackupError(
                f"{name} is a version {version} backup; this trustmesh reads version "
                f"{FORMAT_VERSION}: restore it with the trustmesh version that wrote it.",
                reason="format",
            )
        if not (1 <= log2_n <= _MAX_LOG2_N and 1 <= r <= 32 and 1 <= p <= 16) or not (
            10 <= chunk_log2 <= 24
        ):
            raise BackupError(f"{name} has a damaged header.", reason="damaged")
        key, expected = _derive(passphrase, salt, log2_n, r, p)
        if not hmac.compare_digest(check, expected):
            raise BackupError(
                f"The passphrase does not open {name}: give the CA passphrase the backup "
                f"was made with (--passphrase-file or TRUSTMESH_CA_PASSPHRASE).",
                reason="passphrase",
            )
        self._aead = AESGCM(key)
        self._header = header
        self._prefix = prefix
        self._size = (1 << chunk_log2) + _TAG
        self._source = source
        self._counter = 0
        self._pending = source.read(self._size)
        self._plain = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> None:
        chunk = self._pending
        self._pending = self._source.read(self._size) if chunk else b""
        last = not self._pending
        try:
            self._plain = self._aead.decrypt(
                _nonce(self._prefix, self._counter, last), chunk, self._header
            )
            self._pos = 0
        except InvalidTag:
            raise self._failure(chunk, last) from None
        self._counter += 1
        self._done = last

    def _failure(self, chunk: bytes, last: bool) -> BackupError:
        at = f"chunk {self._counter + 1}"
        if last:
            try:
                self._aead.decrypt(_nonce(self._prefix, self._counter, False), chunk, self._header)
            except InvalidTag:
                pass
            else:
                return BackupError(
                    f"{self.name} is truncated (it ends after {at}, which is not the last); "
                    f"nothing was restored. Use a complete copy of the backup.",
                    reason="truncated",
                )
        return BackupError(
            f"{self.name} is damaged or truncated ({at} failed authentication); nothing "
            f"was restored. Use another copy of the backup.",
            reason="damaged",
        )

    def readinto(self, buffer: object) -> int:
        view = memoryview(buffer)  # type: ignore[arg-type]
        while self._pos >= len(self._plain) and not self._done:
            self._next_chunk()
        n = min(len(view), len(self._plain) - self._pos)
        view[:n] = self._plain[self._pos : self._pos + n]
        self._pos += n
        return n

    def drain(self) -> None:
        """Read and authenticate the rest of the archive (a tar reader may stop early)."""
        while not self._done:
            self._next_chunk()
        self._plain, self._pos = b"", 0

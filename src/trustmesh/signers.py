"""Where the CA's private keys live, behind one small interface.

A :class:`Signer` hands out the key object that signs certificates, CRLs and OCSP
answers. Today keys are PEM (PKCS#8, encrypted with the CA passphrase) in a file of
``TRUSTMESH_HOME`` (``file:NAME``, what ``ca init`` writes) or in the store
(``store``, what a rotation creates, so every ``ca serve`` replica has it), in a
PKCS#11 token (an RFC 7512 URI ``pkcs11:...``, see :mod:`trustmesh.hsm`; the key object
signs inside the token), or nowhere on this machine (``offline``: the root of an
offline-root CA, whose key is used only by ``trustmesh ca root`` on another machine).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from trustmesh.errors import ConfigError
from trustmesh.hsm import PKCS11URI, PKCS11Signer, is_pkcs11_ref
from trustmesh.pki import KeyType, PrivateKey, dump_private_key, generate_private_key
from trustmesh.pki import load_private_key as _load_pem

__all__ = [
    "OFFLINE_KEY_REF",
    "STORE_KEY_REF",
    "FileSigner",
    "PEMSigner",
    "Signer",
    "new_stored_key",
    "open_signer",
]

#: ``key_ref`` of a key kept (encrypted) in the store's ``ca_issuers.key_pem``.
STORE_KEY_REF = "store"
#: ``key_ref`` of a root whose key is kept on an offline machine (``trustmesh ca root``).
OFFLINE_KEY_REF = "offline"


class Signer(Protocol):
    """A CA key: ``private_key()`` returns the object that signs (never exported)."""

    @property
    def ref(self) -> str:
        """Where the key is, e.g. ``file:intermediate.key`` or ``store``."""
        ...

    def private_key(self) -> PrivateKey:
        """Return the key object, unlocking it on first use.

        Raises:
            PKIError: The passphrase is missing or wrong.
        """
        ...


@dataclass
class FileSigner:
    """A PEM key in a file (decrypted with the CA passphrase on first use)."""

    path: Path
    passphrase: bytes | None = field(repr=False)
    _key: PrivateKey | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ref(self) -> str:
        return f"file:{self.path.name}"

    def private_key(self) -> PrivateKey:
        with self._lock:
            if self._key is None:
                try:
                    data = self.path.read_bytes()
                except OSError as exc:
                    raise ConfigError(
                        f"Cannot read the CA key {self.path}: {exc.strerror}. Restore it "
                        f"from a backup or run the command where the key is.",
                        path=str(self.path),
                    ) from None
                self._key = _load_pem(data, self.passphrase, source=str(self.path))
            return self._key


@dataclass
class PEMSigner:
    """An encrypted PEM key held in the store."""

    pem: bytes = field(repr=False)
    passphrase: bytes | None = field(repr=False)
    source: str = "the stored CA key"
    _key: PrivateKey | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def ref(self) -> str:
        return STORE_KEY_REF

    def private_key(self) -> PrivateKey:
        with self._lock:
            if self._key is None:
                self._key = _load_pem(self.pem, self.passphrase, source=self.source)
            return self._key


def open_signer(
    ref: str, *, home: Path, key_pem: str | None, passphrase: bytes | None, what: str
) -> Signer:
    """Return the signer a ``key_ref`` names.

    Raises:
        ConfigError: An unknown scheme, ``store`` without a stored key, a bad
            PKCS#11 URI, or an ``offline`` key.

    .. versionchanged:: 0.3
       ``pkcs11:`` URIs and ``offline``.
    """
    if ref.startswith("file:"):
        return FileSigner(home / ref.removeprefix("file:"), passphrase)
    if ref == STORE_KEY_REF:
        if not key_pem:
            raise ConfigError(f"The key of {what} is missing from the store.")
        return PEMSigner(key_pem.encode(), passphrase, source=what)
    if is_pkcs11_ref(ref):
        return PKCS11Signer(PKCS11URI.parse(ref), what=what)
    if ref == OFFLINE_KEY_REF:
        raise ConfigError(
            f"The key of {what} is kept offline (not on this machine): sign with "
            f"'trustmesh ca root ...' where the root key is (see docs/hsm.md).",
            reason="offline",
        )
    scheme = ref.partition(":")[0]
    raise ConfigError(
        f"The key of {what} is in a {scheme!r} key backend, which this trustmesh does not "
        f"have: upgrade trustmesh, or run where that backend is available."
    )


def new_stored_key(key_type: KeyType, passphrase: bytes) -> tuple[PrivateKey, str]:
    """Generate a CA key and return it with its encrypted PEM (for ``key_ref`` ``store``).

    Raises:
        ConfigError: The passphrase is empty.
    """
    if not passphrase:
        raise ConfigError(
            "The CA passphrase is empty: set TRUSTMESH_CA_PASSPHRASE or pass "
            "--passphrase-file to create a CA key."
        )
    key = generate_private_key(key_type)
    return key, dump_private_key(key, passphrase).decode()

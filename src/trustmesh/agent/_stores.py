"""PKCS#12 keystore and Java truststore kept beside the PEM files, for Java and .NET.

The keystore holds the key, the leaf and its chain under one alias; the truststore
holds the CA roots as trusted certificate entries (a PKCS#12 truststore that Java's
``KeyStore.getInstance("PKCS12")`` and ``keytool`` read without extra providers).
Both are built by :func:`trustmesh.pki.pkcs12_keystore` and
:func:`trustmesh.pki.pkcs12_truststore`, the code ``trustmesh export`` uses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from trustmesh.errors import ConfigError
from trustmesh.pki import PrivateKey, pkcs12_keystore, pkcs12_truststore

__all__ = ["KEYSTORE_ALIAS", "PKCS12Stores"]

log = logging.getLogger("trustmesh.agent")

#: The alias (PKCS#12 friendly name) of the key entry in the keystore.
KEYSTORE_ALIAS = "trustmesh"


@dataclass(frozen=True, slots=True)
class PKCS12Stores:
    """The PKCS#12 keystore and/or Java truststore the agent rewrites on every renewal.

    Args:
        keystore: Where to write the keystore (key + leaf + chain, alias
            :data:`KEYSTORE_ALIAS`, mode 0600), or None.
        truststore: Where to write the truststore (the CA roots as trusted
            certificates, aliases ``trustmesh-ca-0``, ``trustmesh-ca-1``...), or None.
        password: The store password, for both files (never empty).
        legacy: 3DES/SHA-1 encryption for Java < 8u301, .NET Framework and OpenSSL 1.x
            instead of AES-256-CBC with PBKDF2-HMAC-SHA256.
        rekey: Rewrite existing stores that do not open with ``password`` (with a
            warning) instead of refusing them in :meth:`check_existing`
            (``--rekey-stores``).

    Raises:
        ConfigError: Neither file, an empty password, a path that is a directory, or
            one file for both.

    .. versionadded:: 0.1
    """

    keystore: Path | None = None
    truststore: Path | None = None
    password: bytes = field(default=b"", repr=False)
    legacy: bool = False
    rekey: bool = False

    def __post_init__(self) -> None:
        if self.keystore is None and self.truststore is None:
            raise ConfigError("Give --pkcs12 FILE, --truststore FILE or both.")
        if not self.password:
            raise ConfigError(
                "The store password is empty: put it in the --store-password-file "
                "(Java and .NET refuse empty ones; there is no default).",
                field="store_password_file",
            )
        for option, path in (("--pkcs12", self.keystore), ("--truststore", self.truststore)):
            if path is None:
                continue
            if path.is_dir():
                raise ConfigError(
                    f"{option} {path} is a directory: give a file name, e.g. {path / 'x.p12'}.",
                    path=str(path),
                )
        if self.keystore is not None and self.keystore == self.truststore:
            raise ConfigError("--pkcs12 and --truststore name the same file: give two files.")

    @property
    def paths(self) -> tuple[Path, ...]:
        """The files these stores are written to."""
        return tuple(p for p in (self.keystore, self.truststore) if p is not None)

    def check_existing(self) -> None:
        """Refuse store files already on disk that do not open with the password.

        Rewriting them would lock out the workload that reads them with its own
        password (issue 14). With ``rekey`` they are kept for rewriting instead,
        and a warning says so.

        Raises:
            ConfigError: A store exists but cannot be read, or does not open with
                the password (wrong password, or not a PKCS#12 file) and ``rekey``
                is False.

        .. versionadded:: 0.1
        """
        for option, path in (("--pkcs12", self.keystore), ("--truststore", self.truststore)):
            if path is None or not path.exists():
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"Cannot read {option} {path}: {exc.strerror}. Let the agent read the "
                    f"store, or give another path.",
                    path=str(path),
                ) from None
            try:
                pkcs12.load_pkcs12(data, self.password)
            except ValueError:
                if not self.rekey:
                    raise ConfigError(
                        f"{option} {path} exists but does not open with the password in "
                        f"--store-password-file (a different password, or not a PKCS#12 "
                        f"file): give the password it was written with, or pass "
                        f"--rekey-stores to rewrite it with this one.",
                        path=str(path),
                    ) from None
                log.warning(
                    "%s %s does not open with the password in --store-password-file; "
                    "--rekey-stores: rewriting it with that password (the workload must "
                    "use the new password)",
                    option,
                    path,
                    extra={"event": "store_rekey", "path": str(path)},
                )

    def prepare(self) -> None:
        """Create the stores' directories if needed and check that they are writable.

        Raises:
            ConfigError: A directory cannot be created or written.
        """
        for path in self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"Cannot create {path.parent} for {path}: {exc.strerror}. Give a store "
                    f"path the agent may write.",
                    path=str(path),
                ) from None
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"Cannot write {path}: {path.parent} is not writable. Give a store path "
                    f"the agent may write.",
                    path=str(path),
                )

    def render(
        self,
        key: PrivateKey,
        chain: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
    ) -> list[tuple[Path, bytes, int]]:
        """Build the files' contents as ``(path, data, mode)`` entries.

        Args:
            key: The workload key.
            chain: The leaf first, then its intermediates.
            roots: The trust anchors.

        Raises:
            PKIError: The key does not match the leaf.
        """
        files: list[tuple[Path, bytes, int]] = []
        if self.keystore is not None:
            data = pkcs12_keystore(
                key,
                chain[0],
                chain[1:],
                password=self.password,
                alias=KEYSTORE_ALIAS,
                legacy=self.legacy,
            )
            files.append((self.keystore, data, 0o600))
        if self.truststore is not None:
            data = pkcs12_truststore(roots, password=self.password, legacy=self.legacy)
            files.append((self.truststore, data, 0o644))
        return files

    def outdated(
        self, chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
    ) -> tuple[Path, ...]:
        """Return the store files that are missing, unreadable with the password, or
        that do not hold exactly ``chain`` (keystore) or ``roots`` (truststore)."""
        stale: list[Path] = []
        if self.keystore is not None:
            held = self._load(self.keystore)
            if (
                held is None
                or held.cert is None
                or held.key is None
                or [held.cert.certificate, *(c.certificate for c in held.additional_certs)]
                != list(chain)
            ):
                stale.append(self.keystore)
        if self.truststore is not None:
            held = self._load(self.truststore)
            if held is None or {c.certificate for c in held.additional_certs} != set(roots):
                stale.append(self.truststore)
        return tuple(stale)

    def _load(self, path: Path) -> pkcs12.PKCS12KeyAndCertificates | None:
        try:
            return pkcs12.load_pkcs12(path.read_bytes(), self.password)
        except (OSError, ValueError):
            return None

"""Token-signing keys: created, rotated, published and loaded from ``idp_signing_keys``.

A key's life (all times Unix seconds, UTC):

- ``published_at``: it appears in the JWKS, so verifiers can fetch it before it signs;
- ``active_at``: it starts signing (``published_at`` + the publish delay, default 5 min);
- ``retired_at``: it stops signing (the ``active_at`` of the key that replaced it);
- it leaves the JWKS once every token it signed has expired: ``retired_at`` + the
  access-token TTL + leeway (or at ``removed_at`` when that is set).

Private keys are PKCS#8, encrypted with the CA passphrase. The ``kid`` is the key's
RFC 7638 thumbprint.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import insert, select, update

from trustmesh.errors import ConfigError
from trustmesh.store import Store, idp_signing_keys

__all__ = [
    "DEFAULT_PUBLISH_DELAY",
    "SIGNING_ALGORITHMS",
    "KeyRing",
    "SigningKey",
    "SigningKeyInfo",
    "create_signing_key",
    "ensure_signing_key",
    "list_signing_keys",
    "rotate_signing_key",
]

log = logging.getLogger("trustmesh.idp")

#: Algorithms the identity server signs with.
SIGNING_ALGORITHMS = ("ES256", "RS256")
#: Seconds between publishing a new key and signing with it.
DEFAULT_PUBLISH_DELAY = 300


@dataclass(frozen=True)
class SigningKeyInfo:
    """A key's public facts (never the private key)."""

    kid: str
    alg: str
    public_jwk: dict[str, Any]
    published_at: int
    active_at: int
    retired_at: int | None
    removed_at: int | None

    def status(self, now: int, keep: int) -> str:
        """``pending``, ``signing``, ``retired`` (still published) or ``removed``."""
        if self.removed_at is not None and now >= self.removed_at:
            return "removed"
        if self.retired_at is not None and now >= self.retired_at:
            return "retired" if now < self.retired_at + keep else "removed"
        if now < self.active_at:
            return "pending" if now >= self.published_at else "unpublished"
        return "signing"

    def to_json(self, now: int, keep: int) -> dict[str, Any]:
        """JSON for ``idp keys list --json``."""

        def iso(value: int | None) -> str | None:
            if value is None:
                return None
            return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        return {
            "kid": self.kid,
            "alg": self.alg,
            "status": self.status(now, keep),
            "published_at": iso(self.published_at),
            "active_at": iso(self.active_at),
            "retired_at": iso(self.retired_at),
        }


@dataclass(frozen=True)
class SigningKey:
    """A loaded key: its facts and the joserfc key that signs."""

    info: SigningKeyInfo
    key: ECKey | RSAKey


def _info(row: Any) -> SigningKeyInfo:
    return SigningKeyInfo(
        kid=row.kid,
        alg=row.alg,
        public_jwk=json.loads(row.public_jwk),
        published_at=int(row.published_at),
        active_at=int(row.active_at),
        retired_at=None if row.retired_at is None else int(row.retired_at),
        removed_at=None if row.removed_at is None else int(row.removed_at),
    )


def _generate(alg: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ConfigError(
        f"Unsupported signing algorithm {alg!r}: use one of {', '.join(SIGNING_ALGORITHMS)}.",
        field="alg",
    )


def create_signing_key(
    store: Store, passphrase: bytes, *, alg: str, published_at: int, active_at: int
) -> SigningKeyInfo:
    """Generate a key and store it (private part encrypted with ``passphrase``).

    Raises:
        ConfigError: Unknown algorithm or empty passphrase.
    """
    if not passphrase:
        raise ConfigError("The CA passphrase is needed to encrypt identity-server keys.")
    private = _generate(alg)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    ).decode()
    jose_key: ECKey | RSAKey = (
        ECKey.import_key(private)
        if isinstance(private, ec.EllipticCurvePrivateKey)
        else RSAKey.import_key(private)
    )
    kid = jose_key.thumbprint()
    public = dict(jose_key.as_dict(private=False))
    public.update({"kid": kid, "alg": alg, "use": "sig"})
    with store.transaction() as conn:
        conn.execute(
            insert(idp_signing_keys).values(
                kid=kid,
                alg=alg,
                private_pem=pem,
                public_jwk=json.dumps(public, sort_keys=True),
                published_at=published_at,
                active_at=active_at,
                retired_at=None,
                removed_at=None,
            )
        )
    return SigningKeyInfo(kid, alg, public, published_at, active_at, None, None)


def list_signing_keys(store: Store) -> list[SigningKeyInfo]:
    """Every key, oldest first."""
    with store.reader() as conn:
        rows = conn.execute(
            select(idp_signing_keys).order_by(idp_signing_keys.c.active_at, idp_signing_keys.c.kid)
        ).all()
    return [_info(r) for r in rows]


def ensure_signing_key(store: Store, passphrase: bytes, *, alg: str = "ES256") -> bool:
    """Create a key that signs at once if no key signs now or later; True if created."""
    now = int(time.time())
    live = [k for k in list_signing_keys(store) if k.retired_at is None or k.retired_at > now]
    if live:
        return False
    create_signing_key(store, passphrase, alg=alg, published_at=now, active_at=now)
    log.info("created the first identity-server signing key", extra={"event": "idp_key_created"})
    return True


def rotate_signing_key(
    store: Store,
    passphrase: bytes,
    *,
    alg: str = "ES256",
    publish_delay: int = DEFAULT_PUBLISH_DELAY,
    now: int | None = None,
) -> SigningKeyInfo:
    """Publish a new key now that signs after ``publish_delay`` seconds.

    The keys signing until then retire at that moment (they stay published until
    their tokens expire).

    Raises:
        ConfigError: Bad algorithm or a negative delay.
    """
    if publish_delay < 0:
        raise ConfigError("--publish-delay must not be negative.", field="publish_delay")
    start = int(time.time()) if now is None else now
    info = create_signing_key(
        store, passphrase, alg=alg, published_at=start, active_at=start + publish_delay
    )
    with store.transaction() as conn:
        conn.execute(
            update(idp_signing_keys)
            .where(idp_signing_keys.c.kid != info.kid)
            .where(
                (idp_signing_keys.c.retired_at.is_(None))
                | (idp_signing_keys.c.retired_at > info.active_at)
            )
            .where(idp_signing_keys.c.active_at <= info.active_at)
            .values(retired_at=info.active_at)
        )
    return info


class KeyRing:
    """The server's view of ``idp_signing_keys``, reloaded every ``reload_interval`` s.

    Decrypted private keys are cached by ``kid``, so only new keys cost a decryption.

    Args:
        store: The database.
        passphrase: Decrypts the private keys.
        keep: Seconds a retired key stays published (access TTL + leeway).
        reload_interval: Seconds between database reloads.
    """

    def __init__(
        self, store: Store, passphrase: bytes, *, keep: int, reload_interval: float = 1.0
    ) -> None:
        self.store = store
        self.keep = keep
        self.reload_interval = reload_interval
        self._passphrase = passphrase
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._keys: dict[str, SigningKey] = {}

    def _load(self) -> dict[str, SigningKey]:
        if time.monotonic() - self._loaded_at < self.reload_interval:
            return self._keys
        with self._lock:
            if time.monotonic() - self._loaded_at < self.reload_interval:
                return self._keys
            with self.store.reader() as conn:
                rows = conn.execute(select(idp_signing_keys)).all()
            keys: dict[str, SigningKey] = {}
            for row in rows:
                info = _info(row)
                cached = self._keys.get(info.kid)
                if cached is not None:
                    keys[info.kid] = SigningKey(info, cached.key)
                    continue
                private = serialization.load_pem_private_key(
                    row.private_pem.encode(), self._passphrase
                )
                jose: ECKey | RSAKey
                if isinstance(private, ec.EllipticCurvePrivateKey):
                    jose = ECKey.import_key(private, {"kid": info.kid, "alg": info.alg})
                elif isinstance(private, rsa.RSAPrivateKey):
                    jose = RSAKey.import_key(private, {"kid": info.kid, "alg": info.alg})
                else:  # pragma: no cover - we only store EC and RSA keys
                    continue
                keys[info.kid] = SigningKey(info, jose)
            self._keys = keys
            self._loaded_at = time.monotonic()
            return keys

    def invalidate(self) -> None:
        """Reload from the database on next use."""
        self._loaded_at = float("-inf")

    def signing_key(self, now: int | None = None) -> SigningKey:
        """The key that signs now: the newest active one not yet retired.

        Raises:
            ConfigError: No key can sign (run ``idp serve`` once, or ``idp keys rotate``).
        """
        at = int(time.time()) if now is None else now
        keys = self._load().values()
        ready = [
            k
            for k in keys
            if k.info.active_at <= at
            and (k.info.retired_at is None or k.info.retired_at > at)
            and (k.info.removed_at is None or k.info.removed_at > at)
        ]
        if not ready:
            # A rotation whose successor is not active yet leaves the old key signing.
            ready = [k for k in keys if k.info.active_at <= at]
        if not ready:
            raise ConfigError(
                "No identity-server signing key is active: run `trustmesh idp keys rotate "
                "--publish-delay 0s`."
            )
        return max(ready, key=lambda k: (k.info.active_at, k.info.kid))

    def published(self, now: int | None = None) -> list[SigningKey]:
        """Keys in the JWKS now: published, and retired less than ``keep`` seconds ago."""
        at = int(time.time()) if now is None else now
        return sorted(
            (
                k
                for k in self._load().values()
                if k.info.published_at <= at and k.info.status(at, self.keep) != "removed"
            ),
            key=lambda k: (-k.info.active_at, k.info.kid),
        )

    def verification_key(self, kid: str, now: int | None = None) -> SigningKey | None:
        """The published key with this ``kid``, if any."""
        return next((k for k in self.published(now) if k.info.kid == kid), None)

    def jwks(self, now: int | None = None) -> dict[str, Any]:
        """The JWKS document (public keys only)."""
        return {"keys": [dict(k.info.public_jwk) for k in self.published(now)]}

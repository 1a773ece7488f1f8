"""External account binding keys (RFC 8555 7.3.4): made by the operator, sealed at rest.

The HMAC key must be known to check a binding, so it cannot be stored as a hash:
it is sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the CA's
intermediate signing key, which itself is encrypted on disk. A database dump alone
reveals no EAB key. An EAB key made before the intermediate key changes no longer
opens; make a new one then.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustmesh.authority import CertificateAuthority
from trustmesh.store import acme_eab_keys

from ._jws import b64url

__all__ = ["create_eab_key", "open_eab_key", "sealing_key"]

_INFO = b"trustmesh acme eab v1"


def sealing_key(ca: CertificateAuthority) -> bytes:
    """The AES key EAB keys are sealed with, derived from the CA's signing key."""
    secret = ca.signing_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return HKDF(hashes.SHA256(), 32, salt=None, info=_INFO).derive(secret)


def _seal(key: bytes, kid: str, hmac_key: bytes) -> str:
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, hmac_key, kid.encode())).decode()


def open_eab_key(key: bytes, kid: str, sealed: str) -> bytes | None:
    """Unseal a stored EAB key (None when it does not open: wrong CA key or altered)."""
    raw = base64.b64decode(sealed)
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], kid.encode())
    except InvalidTag:
        return None


def create_eab_key(
    ca: CertificateAuthority, provisioner: str, *, actor: str, now: datetime | None = None
) -> tuple[str, str]:
    """Make, seal, store and audit an EAB key for ``provisioner``.

    Returns:
        ``(kid, hmac_key)``, the key base64url as clients take it (certbot
        ``--eab-hmac-key``, lego ``--hmac``). It is shown once and never again.
    """
    at = (now or datetime.now(UTC)).replace(microsecond=0)
    kid = "eab_" + secrets.token_urlsafe(18)
    hmac_key = secrets.token_bytes(32)
    sealed = _seal(sealing_key(ca), kid, hmac_key)
    with ca.store.transaction() as conn:
        conn.execute(
            acme_eab_keys.insert().values(
                kid=kid, provisioner=provisioner, key_sealed=sealed, created_at=int(at.timestamp())
            )
        )
        ca.store.append_audit(
            conn,
            at=at,
            actor=actor,
            action="acme_eab_create",
            subject=kid,
            details={"provisioner": provisioner},
        )
    return kid, b64url(hmac_key)

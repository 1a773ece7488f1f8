"""Persistence: certificates, counters, join tokens and the audit chain (SQLite or PostgreSQL).

The identity server's tables (``idp_*``) are exported for :mod:`trustmesh.idp`, which
queries them with SQLAlchemy Core inside :meth:`Store.transaction`.
"""

from ._schema import (
    idp_assertion_jtis,
    idp_authorization_codes,
    idp_clients,
    idp_login_failures,
    idp_refresh_tokens,
    idp_revoked_tokens,
    idp_signing_keys,
    idp_users,
)
from ._snapshot import (
    RestoredDatabase,
    SnapshotInfo,
    describe_snapshot,
    restore_snapshot,
    snapshot_database,
)
from ._store import (
    REVOCATION_CHANNEL,
    CertificateRecord,
    RevocationEvent,
    Store,
    normalize_url,
    open_store,
)
from ._tokens import JoinToken, add_join_token, consume_join_token, token_hash

__all__ = [
    "REVOCATION_CHANNEL",
    "CertificateRecord",
    "JoinToken",
    "RestoredDatabase",
    "RevocationEvent",
    "SnapshotInfo",
    "Store",
    "add_join_token",
    "consume_join_token",
    "describe_snapshot",
    "idp_assertion_jtis",
    "idp_authorization_codes",
    "idp_clients",
    "idp_login_failures",
    "idp_refresh_tokens",
    "idp_revoked_tokens",
    "idp_signing_keys",
    "idp_users",
    "normalize_url",
    "open_store",
    "restore_snapshot",
    "snapshot_database",
    "token_hash",
]

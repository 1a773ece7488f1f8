"""Persistence: certificates, counters, join tokens, registration entries and the audit chain
(SQLite or PostgreSQL).

The identity server's tables (``idp_*``) are exported for :mod:`trustmesh.idp`, which
queries them with SQLAlchemy Core inside :meth:`Store.transaction`; the ACME
server's (``acme_*``) likewise for :mod:`trustmesh.acme`.
"""

from ._acme import (
    acme_accounts,
    acme_authorizations,
    acme_challenges,
    acme_eab_keys,
    acme_nonces,
    acme_orders,
)
from ._entries import RegistrationEntry, add_entry, delete_entry, find_entries, get_entry
from ._issuers import (
    CA_STATE_COUNTER,
    IssuerRow,
    LiveCertificates,
    advance_state,
    insert_issuer,
    live_certificates,
    load_issuers,
    read_state,
    update_issuer,
)
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
    "CA_STATE_COUNTER",
    "REVOCATION_CHANNEL",
    "CertificateRecord",
    "IssuerRow",
    "JoinToken",
    "LiveCertificates",
    "RegistrationEntry",
    "RestoredDatabase",
    "RevocationEvent",
    "SnapshotInfo",
    "Store",
    "acme_accounts",
    "acme_authorizations",
    "acme_challenges",
    "acme_eab_keys",
    "acme_nonces",
    "acme_orders",
    "add_entry",
    "add_join_token",
    "advance_state",
    "consume_join_token",
    "delete_entry",
    "describe_snapshot",
    "find_entries",
    "get_entry",
    "idp_assertion_jtis",
    "idp_authorization_codes",
    "idp_clients",
    "idp_login_failures",
    "idp_refresh_tokens",
    "idp_revoked_tokens",
    "idp_signing_keys",
    "idp_users",
    "insert_issuer",
    "live_certificates",
    "load_issuers",
    "normalize_url",
    "open_store",
    "read_state",
    "restore_snapshot",
    "snapshot_database",
    "token_hash",
    "update_issuer",
]

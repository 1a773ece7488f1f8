"""Persistence: certificates, counters, join tokens and the audit chain (SQLite or PostgreSQL).

The identity server's tables (``idp_*``) are exported for :mod:`trustmesh.idp`, which
queries them with SQLAlchemy Core inside :meth:`Store.transaction`.
"""

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
    "RevocationEvent",
    "Store",
    "add_join_token",
    "advance_state",
    "consume_join_token",
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
    "token_hash",
    "update_issuer",
]

"""The renewal agent: keeps one workload's key, certificate and bundle (and PKCS#12 stores,
and the chain CRL file) fresh on disk."""

from ._agent import MAX_SLEEP, RELOAD_TIMEOUT, Agent, Outcome, Reload
from ._bundle import BundleFollower
from ._crl import CRLKeeper, HAProxyRuntime
from ._identity import (
    IDENTITY_FILES,
    LocalIdentity,
    Unusable,
    inspect_identity,
    new_key_and_csr,
    write_identity,
)
from ._schedule import (
    JITTER_FRACTION,
    MAX_BACKOFF,
    RENEW_FRACTION,
    backoff_delay,
    next_renewal,
)
from ._stores import KEYSTORE_ALIAS, PKCS12Stores

__all__ = [
    "IDENTITY_FILES",
    "JITTER_FRACTION",
    "KEYSTORE_ALIAS",
    "MAX_BACKOFF",
    "MAX_SLEEP",
    "RELOAD_TIMEOUT",
    "RENEW_FRACTION",
    "Agent",
    "BundleFollower",
    "CRLKeeper",
    "HAProxyRuntime",
    "LocalIdentity",
    "Outcome",
    "PKCS12Stores",
    "Reload",
    "Unusable",
    "backoff_delay",
    "inspect_identity",
    "new_key_and_csr",
    "next_renewal",
    "write_identity",
]

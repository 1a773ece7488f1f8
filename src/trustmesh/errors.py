"""Exceptions raised by trustmesh.

Every exception of ours derives from :class:`TrustmeshError`, so one ``except``
catches them all. Core exceptions carry structured attributes and never an HTTP
status; the servers map classes to statuses by walking the MRO.

::

    TrustmeshError                  # root: one except catches all of ours
    ├── ConfigError                 # bad settings or CLI input (CLI exit code 2)
    │   └── BackupError             # a backup archive is damaged, truncated or locked
    ├── PKIError
    │   ├── CSRError                # unparsable, bad signature, too large
    │   ├── PolicyError             # profile forbids SAN/EKU/key/lifetime
    │   ├── SpiffeIDError           # not a valid SPIFFE ID
    │   └── VerificationError       # chain or identity check failed
    │       ├── CertificateExpiredError
    │       └── CertificateRevokedError
    ├── StoreError                  # database unreachable or failing
    │   ├── NotFoundError
    │   └── ConflictError
    ├── AuditError                  # the audit chain is broken
    ├── TokenError
    │   ├── TokenExpiredError
    │   └── ScopeError
    └── ClientError
        ├── TransportError
        └── APIError                # .status, .problem

Messages say what was refused, what was expected and what was found, and one way
to fix it. They never contain key material or token contents.
"""

from __future__ import annotations

__all__ = [
    "APIError",
    "AuditError",
    "BackupError",
    "CSRError",
    "CertificateExpiredError",
    "CertificateRevokedError",
    "ClientError",
    "ConfigError",
    "ConflictError",
    "NotFoundError",
    "PKIError",
    "PolicyError",
    "ScopeError",
    "SpiffeIDError",
    "StoreError",
    "TokenError",
    "TokenExpiredError",
    "TransportError",
    "TrustmeshError",
    "VerificationError",
]


class TrustmeshError(Exception):
    """Root of every exception trustmesh raises on purpose.

    Args:
        message: One line: what was refused, expected vs. actual, one fix.
        **details: Structured context (``field=``, ``profile=``, ...) kept in
            :attr:`details` for logs and problem documents.
    """

    def __init__(self, message: str, **details: str | int | None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, str | int | None] = dict(details)


class ConfigError(TrustmeshError):
    """Bad settings, bad command-line input, or a missing/invalid file."""


class BackupError(ConfigError):
    """A backup archive cannot be read: wrong passphrase, damaged, truncated, unknown format.

    ``details["reason"]`` is ``passphrase``, ``damaged``, ``truncated`` or ``format``.

    .. versionadded:: 0.1
    """


class PKIError(TrustmeshError):
    """A certificate, key, CSR or CRL operation failed."""


class CSRError(PKIError):
    """A certificate signing request is unparsable, too large or badly signed."""


class PolicyError(PKIError):
    """A profile forbids what was asked for (name, key, EKU, lifetime)."""


class SpiffeIDError(PKIError):
    """A string is not a valid SPIFFE ID."""


class VerificationError(PKIError):
    """A certificate chain or identity did not verify.

    ``details["reason"]`` names the failed check (``expired``, ``unknown_ca``,
    ``wrong_eku``, ...).
    """


class CertificateExpiredError(VerificationError):
    """A certificate in the chain is expired or not yet valid."""


class CertificateRevokedError(VerificationError):
    """The certificate was revoked."""


class StoreError(TrustmeshError):
    """The database could not be reached or refused an operation."""


class NotFoundError(StoreError):
    """A record that was asked for does not exist."""


class ConflictError(StoreError):
    """A record conflicts with an existing one (duplicate serial, existing CA)."""


class AuditError(TrustmeshError):
    """The audit log's hash chain is broken."""


class TokenError(TrustmeshError):
    """A token is malformed, badly signed or not acceptable."""


class TokenExpiredError(TokenError):
    """A token is expired or not yet valid."""


class ScopeError(TokenError):
    """A token lacks a required scope or role."""


class ClientError(TrustmeshError):
    """A call to a trustmesh server failed."""


class TransportError(ClientError):
    """The server could not be reached or the connection failed."""


class APIError(ClientError):
    """The server answered with an error.

    Args:
        message: One line describing the failure.
        status: The HTTP status code.
        problem: The RFC 9457 problem document, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        problem: dict[str, str | int | None] | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.status = status
        self.problem = problem or {}

"""What the policy is asked (:class:`PolicyRequest`) and what it answers (:class:`Decision`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from trustmesh.errors import ConfigError

__all__ = ["ANONYMOUS", "AUDIT", "ENFORCE", "Decision", "PolicyConfigError", "PolicyRequest"]

#: ``mode: enforce``: a deny refuses the request.
ENFORCE = "enforce"
#: ``mode: audit``: a deny is reported (``would_deny``) and the request goes through.
AUDIT = "audit"
#: The ``callers`` entry that admits requests without a client certificate.
ANONYMOUS = "anonymous"


class PolicyConfigError(ConfigError):
    """A policy file or mapping is invalid.

    The message is one line naming the source, the rule (index and name) and the
    field, and how to fix it; ``details`` holds ``path``, ``rule``, ``rule_name``
    and ``field``.

    (``trustmesh.errors.PolicyError`` is the certificate-profile refusal; this is
    the authorization policy's configuration error, a :class:`ConfigError`.)

    .. versionadded:: 0.1
    """


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """One request to decide on.

    Args:
        caller: The verified SPIFFE ID of the peer, or None when the request
            came without a client certificate.
        method: The HTTP method (any case).
        path: The request path without the query string, raw (``%2F`` kept) or
            decoded; the policy normalises it (see ``docs/policy.md``).
        claims: The verified end-user token's claims, or None when the request
            carries no token.
        scopes: The token's scopes (``AccessTokenClaims.scopes``).
        roles: The token's roles (``AccessTokenClaims.roles``).

    .. versionadded:: 0.1
    """

    caller: str | None
    method: str
    path: str
    claims: Mapping[str, object] | None = None
    scopes: frozenset[str] = frozenset()
    roles: tuple[str, ...] = ()

    @classmethod
    def from_token_claims(
        cls,
        caller: str | None,
        method: str,
        path: str,
        claims: Mapping[str, object] | None,
    ) -> PolicyRequest:
        """Build a request whose scopes and roles are read from raw token claims.

        ``scope`` (space-separated string, RFC 9068) or ``scp`` (list) gives the
        scopes, ``roles`` (list or string) the roles. Use it when all you have is
        the claims mapping (``trustmesh policy check --claims-json``); with a
        verified ``AccessTokenClaims`` pass its ``scopes`` and ``roles`` directly.

        Args:
            caller: See the class.
            method: See the class.
            path: See the class.
            claims: The claims, or None for no token.

        Returns:
            The request.
        """
        if claims is None:
            return cls(caller, method, path)
        scopes: set[str] = set()
        scope = claims.get("scope")
        if isinstance(scope, str):
            scopes.update(scope.split())
        scp = claims.get("scp")
        if isinstance(scp, list | tuple):
            scopes.update(s for s in scp if isinstance(s, str))
        raw_roles = claims.get("roles")
        roles: tuple[str, ...] = ()
        if isinstance(raw_roles, str):
            roles = (raw_roles,)
        elif isinstance(raw_roles, list | tuple):
            roles = tuple(r for r in raw_roles if isinstance(r, str))
        return cls(caller, method, path, claims, frozenset(scopes), roles)

    def describe(self) -> str:
        """Return ``caller METHOD path`` for messages, the path quoted and shortened."""
        who = self.caller if self.caller is not None else "anonymous caller (no certificate)"
        return f"{who} {self.method.upper()} {_shown_path(self.path)}"


def _shown_path(path: str) -> str:
    shown = path if len(path) <= 200 else path[:197] + "..."
    # repr() escapes control characters so a crafted path cannot forge log lines.
    return shown if shown.isprintable() and " " not in shown else repr(shown)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to a :class:`PolicyRequest`.

    Attributes:
        allowed: Whether the request may go through (always True in audit mode).
        mode: ``"enforce"`` or ``"audit"``.
        rule: The allow rule that let it through, the deny rule that refused
            it, or None (default deny, refused path).
        reason: One line: who asked for what, and why it was allowed or not.
            For a default deny it says, for the closest rules, what did not match.
        would_deny: True in audit mode when enforce mode would have refused.
        request: The request decided on.

    .. versionadded:: 0.1
    """

    allowed: bool
    mode: str
    rule: str | None
    reason: str
    would_deny: bool = False
    request: PolicyRequest | None = field(default=None, compare=False, repr=False)

    @property
    def outcome(self) -> str:
        """``"allow"``, ``"deny"`` or ``"would_deny"`` (audit mode)."""
        if self.would_deny:
            return "would_deny"
        return "allow" if self.allowed else "deny"

    def log_fields(self) -> dict[str, str | bool | None]:
        """Return structured fields for a log line or a metric label set.

        Keys: ``decision`` (:attr:`outcome`), ``allowed``, ``mode``, ``rule``,
        ``reason``, and from the request ``caller``, ``method``, ``path`` and
        ``user`` (the token's ``sub``, never the token).
        """
        fields: dict[str, str | bool | None] = {
            "decision": self.outcome,
            "allowed": self.allowed,
            "mode": self.mode,
            "rule": self.rule,
            "reason": self.reason,
        }
        if self.request is not None:
            fields["caller"] = self.request.caller
            fields["method"] = self.request.method.upper()
            fields["path"] = self.request.path
            sub = self.request.claims.get("sub") if self.request.claims is not None else None
            fields["user"] = sub if isinstance(sub, str) else None
        return fields

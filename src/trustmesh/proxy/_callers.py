"""Who may connect in TCP mode: the callers of the policy's rules, or ``--allow-id`` globs.

A TCP connection has no method, path or user token, so only a rule's ``callers`` can
apply. A rule that narrows ``methods``, ``paths`` or ``user`` cannot be honoured: a deny
rule for ``DELETE /admin`` would silently become a deny for nothing, an allow rule for
``GET /items`` an allow for every byte. Such policy files are refused (at start with a
one-line error, at a reload by keeping the previous policy and logging an error); serve
them with ``--http``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trustmesh.errors import ConfigError
from trustmesh.policy import AUDIT, Policy, PolicyFile, Rule

__all__ = ["CallerRules", "allow_ids_policy"]

log = logging.getLogger("trustmesh.proxy")


def allow_ids_policy(allow_ids: tuple[str, ...]) -> Policy:
    """The policy ``--allow-id`` means: one allow rule for those callers, any request.

    Raises:
        PolicyConfigError: A glob is not a SPIFFE ID pattern (the message names it).
    """
    return Policy.from_mapping(
        {"mode": "enforce", "rules": [{"name": "allow-id", "callers": list(allow_ids)}]},
        source="--allow-id",
    )


def _narrowed(rule: Rule) -> list[str]:
    found = []
    if rule.methods is not None:
        found.append("methods")
    if rule.paths is not None and "/**" not in rule.paths:
        found.append("paths")
    if rule.user is not None:
        found.append("user")
    return found


def _tcp_problem(policy: Policy) -> str | None:
    for rule in policy.rules:
        narrowed = _narrowed(rule)
        if narrowed:
            return (
                f"{policy.source}: rule {rule.label} narrows {' and '.join(narrowed)}, which "
                f"TCP mode cannot see (it only knows the caller); serve it with --http, or "
                f"split the rule so TCP mode gets a callers-only policy"
            )
    return None


class CallerRules:
    """Decides on a caller's SPIFFE ID alone (deny rules first, then allow rules)."""

    def __init__(self, policy: Path | None, allow_ids: tuple[str, ...]) -> None:
        if (policy is None) == (not allow_ids):
            raise ConfigError(
                "Give either --policy FILE or --allow-id GLOB (repeatable), not both and not "
                "neither: nobody is allowed in by default.",
                field="policy",
            )
        self._file = PolicyFile(policy) if policy is not None else None
        self._policy = self._file.policy if self._file is not None else allow_ids_policy(allow_ids)
        self._refused: Policy | None = None
        problem = _tcp_problem(self._policy)
        if problem is not None:
            raise ConfigError(f"{problem}.", field="policy")
        if self._policy.mode == AUDIT:
            log.warning(
                "TCP mode: policy %s is in audit mode: callers it would refuse are let in",
                self._policy.source,
                extra={"event": "policy_audit_mode"},
            )

    @property
    def policy(self) -> Policy:
        """The callers-only policy in force (a reloaded file that narrows rules is refused)."""
        if self._file is not None:
            current = self._file.policy
            if current is not self._policy and current is not self._refused:
                problem = _tcp_problem(current)
                if problem is None:
                    self._policy = current
                    log.info(
                        "TCP mode: policy %s reloaded",
                        current.source,
                        extra={"event": "policy_reloaded"},
                    )
                else:
                    self._refused = current
                    log.error(
                        "TCP mode: keeping the previous policy: %s",
                        problem,
                        extra={"event": "policy_reload_refused"},
                    )
        return self._policy

    def decide(self, caller: str) -> tuple[bool, str]:
        """Return (allowed, reason) for a verified caller."""
        policy = self.policy
        for rule in policy.rules:
            if rule.effect == "deny" and rule.caller_matches(caller):
                return self._outcome(policy, f"deny rule {rule.label} matches {caller}")
        for rule in policy.rules:
            if rule.effect == "allow" and rule.caller_matches(caller):
                return True, f"rule {rule.label} allows {caller}"
        return self._outcome(policy, f"no rule of {policy.source} allows {caller}")

    @staticmethod
    def _outcome(policy: Policy, reason: str) -> tuple[bool, str]:
        if policy.mode == AUDIT:
            log.warning(
                "audit: would refuse: %s",
                reason,
                extra={"event": "proxy_audit_deny", "reason": reason},
            )
            return True, f"audit mode, would deny: {reason}"
        return False, reason

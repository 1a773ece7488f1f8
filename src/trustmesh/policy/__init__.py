"""Authorization policy: who may call what, decided per request with an explanation.

::

    policy = PolicyFile("policy.yaml")          # reloaded when the file changes
    decision = policy.evaluate(PolicyRequest(caller, "GET", "/items/42",
                                             claims=user.claims, scopes=user.scopes))
    if not decision.allowed:
        log.warning("policy deny", extra=decision.log_fields())

Default deny; deny rules win over allow rules; ``mode: audit`` lets refused
requests through with ``would_deny=True``. The file format and the matching rules
are in ``docs/policy.md``. This package imports nothing of trustmesh but
``errors`` and ``pki``, and no web framework, HTTP client, database or CLI library.
"""

from ._file import DEFAULT_CHECK_INTERVAL, PolicyFile
from ._model import ANONYMOUS, AUDIT, ENFORCE, Decision, PolicyConfigError, PolicyRequest
from ._patterns import ANY_CALLER, HTTP_METHODS, MAX_PATH_LENGTH, PathRefused, normalize_path
from ._policy import MAX_POLICY_BYTES, Policy, Rule, UserRequirement

__all__ = [
    "ANONYMOUS",
    "ANY_CALLER",
    "AUDIT",
    "DEFAULT_CHECK_INTERVAL",
    "ENFORCE",
    "HTTP_METHODS",
    "MAX_PATH_LENGTH",
    "MAX_POLICY_BYTES",
    "Decision",
    "PathRefused",
    "Policy",
    "PolicyConfigError",
    "PolicyFile",
    "PolicyRequest",
    "Rule",
    "UserRequirement",
    "normalize_path",
]

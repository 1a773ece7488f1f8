"""SPIFFE IDs: parsing and validation per the SPIFFE-ID specification.

See https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md, sections
2.1 (trust domain) and 2.2 (path).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from trustmesh.errors import SpiffeIDError

__all__ = ["MAX_SPIFFE_ID_LENGTH", "SpiffeID", "glob_match", "match_spiffe_pattern"]

#: The spec caps the whole URI at 2048 bytes.
MAX_SPIFFE_ID_LENGTH = 2048

_SCHEME = "spiffe://"
# Spec 2.1: trust domain characters are lower-case letters, digits, '.', '-', '_'.
_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
# Spec 2.2: path segment characters are letters, digits, '.', '-', '_'.
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def _fail(value: str, problem: str) -> SpiffeIDError:
    shown = value if len(value) <= 120 else value[:117] + "..."
    return SpiffeIDError(
        f"Invalid SPIFFE ID {shown!r}: {problem}. Use the form "
        f"spiffe://<trust-domain>/<path>, e.g. spiffe://example.org/ns/prod/svc/orders.",
        value=shown,
    )


def _fail_trust_domain(value: str, problem: str) -> SpiffeIDError:
    shown = value if len(value) <= 120 else value[:117] + "..."
    return SpiffeIDError(
        f"Invalid trust domain {shown!r}: {problem}. Give a bare lower-case name such as "
        f"example.org.",
        value=shown,
    )


def _check_trust_domain(
    value: str, trust_domain: str, fail: Callable[[str, str], SpiffeIDError] = _fail
) -> None:
    if not trust_domain:
        raise fail(value, "the trust domain is empty")
    bad = sorted(set(trust_domain) - _TRUST_DOMAIN_CHARS)
    if bad:
        if ":" in bad:
            raise fail(value, "a port is not allowed in the trust domain")
        if "@" in bad:
            raise fail(value, "user info is not allowed in the trust domain")
        if any(c.isupper() for c in bad):
            raise fail(value, "the trust domain must be lower case")
        raise fail(
            value,
            f"the trust domain contains {''.join(bad)!r}; only a-z, 0-9, '.', '-' "
            f"and '_' are allowed",
        )


@dataclass(frozen=True, order=True, slots=True)
class SpiffeID:
    """A validated SPIFFE ID such as ``spiffe://example.org/ns/prod/svc/orders``.

    Build one with :meth:`parse` or :meth:`from_parts`; the constructor does
    not validate.

    .. versionadded:: 0.1
    """

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, value: str) -> SpiffeID:
        """Parse and validate a SPIFFE ID string.

        Args:
            value: The URI, e.g. ``spiffe://example.org/svc/orders``.

        Returns:
            The parsed ID.

        Raises:
            SpiffeIDError: The string breaks a rule of the SPIFFE-ID spec; the
                message names the rule.
        """
        if not isinstance(value, str):
            raise TypeError(f"SPIFFE ID must be str, not {type(value).__name__}")
        if not value:
            raise _fail(value, "it is empty")
        if len(value.encode()) > MAX_SPIFFE_ID_LENGTH:
            raise _fail(value, f"it is longer than {MAX_SPIFFE_ID_LENGTH} bytes")
        if not value.lower().startswith(_SCHEME):
            raise _fail(value, "the scheme must be 'spiffe://'")
        if not value.startswith(_SCHEME):
            raise _fail(value, "the scheme must be lower case 'spiffe'")
        if "?" in value:
            raise _fail(value, "a query is not allowed")
        if "#" in value:
            raise _fail(value, "a fragment is not allowed")
        rest = value[len(_SCHEME) :]
        trust_domain, slash, path = rest.partition("/")
        _check_trust_domain(value, trust_domain)
        path = slash + path
        _check_path(value, path)
        return cls(trust_domain, path)

    @classmethod
    def from_parts(cls, trust_domain: str, path: str) -> SpiffeID:
        """Build and validate a SPIFFE ID from a trust domain and a path.

        Args:
            trust_domain: e.g. ``example.org``.
            path: e.g. ``/ns/prod/svc/orders``; may be empty for the trust
                domain's own ID.

        Returns:
            The validated ID.

        Raises:
            SpiffeIDError: A part breaks a rule of the spec.
        """
        return cls.parse(f"{_SCHEME}{trust_domain}{path}")

    @classmethod
    def trust_domain_id(cls, trust_domain: str) -> SpiffeID:
        """Return the ID of a trust domain itself (``spiffe://example.org``).

        Raises:
            SpiffeIDError: The trust domain name is not valid (or holds a scheme or
                a path); the message is about the trust domain.
        """
        if not trust_domain:
            raise _fail_trust_domain(trust_domain, "it is empty")
        if trust_domain.lower().startswith(_SCHEME):
            raise _fail_trust_domain(trust_domain, "it starts with 'spiffe://'")
        if "/" in trust_domain:
            raise _fail_trust_domain(trust_domain, "a path is not part of a trust domain")
        _check_trust_domain(trust_domain, trust_domain, fail=_fail_trust_domain)
        return cls.from_parts(trust_domain, "")

    @property
    def uri(self) -> str:
        """The ID as a URI string."""
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    def member_of(self, trust_domain: str) -> bool:
        """Return whether this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return self.uri


def _check_path(value: str, path: str) -> None:
    if not path:
        return
    if path == "/":
        raise _fail(value, "the path must not end with '/'")
    segments = path.split("/")[1:]
    for segment in segments:
        if segment == "":
            raise _fail(value, "the path has an empty segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise _fail(value, f"the path segment {segment!r} is not allowed")
        bad = sorted(set(segment) - _SEGMENT_CHARS)
        if bad:
            raise _fail(
                value,
                f"the path contains {''.join(bad)!r}; only letters, digits, '.', '-' "
                f"and '_' are allowed in segments",
            )


def match_spiffe_pattern(spiffe_id: SpiffeID, pattern: str) -> bool:
    """Return whether ``spiffe_id`` matches a glob ``pattern``.

    ``*`` matches within one path segment and ``**`` across segments, so
    ``spiffe://example.org/ns/*/svc/*`` matches ``.../ns/prod/svc/orders`` but
    not ``.../ns/prod/svc/orders/v2``.

    Args:
        spiffe_id: The ID to test.
        pattern: A SPIFFE ID with ``*``/``**`` wildcards.

    Returns:
        True when the ID matches.
    """
    return glob_match(spiffe_id.uri, pattern, sep="/")


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str, sep: str) -> re.Pattern[str]:
    # fnmatch's '*' crosses separators; here '*' stays inside one segment and
    # '**' crosses them.
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append(f"[^{re.escape(sep)}]*")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts))


def glob_match(value: str, pattern: str, *, sep: str) -> bool:
    """Return whether ``value`` matches ``pattern`` (``*`` within a segment
    delimited by ``sep``, ``**`` across segments)."""
    return _glob_regex(pattern, sep).fullmatch(value) is not None

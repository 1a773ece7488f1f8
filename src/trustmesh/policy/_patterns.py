"""Path normalisation and the pattern languages of a policy: paths, callers, methods.

Paths (``docs/policy.md`` "Paths"): a request path is percent-decoded once, ``.``
and empty segments are dropped, ``..`` removes the segment before it, and a
trailing ``/`` is ignored. Encoded ``/`` or ``\\``, a literal ``\\``, control
characters, bad escapes, and ``..`` above the root are refused outright, so
``/items/../admin`` is matched as ``/admin`` and ``/items%2F..%2Fadmin`` never
matches anything. A pattern's ``*`` is exactly one segment, ``**`` zero or more
segments, and ``*`` inside a segment (``*.json``) any characters but ``/``.

Callers: the join-token glob of :func:`trustmesh.pki.glob_match` (``*`` within a
segment, ``**`` across segments), with the trust domain always literal.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from trustmesh.errors import SpiffeIDError
from trustmesh.pki import SpiffeID

__all__ = [
    "ANY_CALLER",
    "HTTP_METHODS",
    "MAX_PATH_LENGTH",
    "PathRefused",
    "caller_regex",
    "check_caller_pattern",
    "check_path_pattern",
    "normalize_path",
    "path_regex",
]

#: Longer request paths are refused (they are not URLs anyone routes).
MAX_PATH_LENGTH = 8192
#: Methods a rule may name; ``*`` means any.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
#: The ``callers`` entry that matches any verified SPIFFE ID.
ANY_CALLER = "*"

_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PATTERN_CHARS = frozenset(" \\?#%")


class PathRefused(Exception):  # noqa: N818 - an outcome, carried to the decision
    """A request path is ambiguous or malformed; ``str()`` says why."""


def _decode(path: str) -> str:
    if "%" in _ESCAPE.sub("", path):
        raise PathRefused("it contains a '%' that is not a valid percent-escape")
    for match in _ESCAPE.finditer(path):
        if int(match.group(1), 16) in (0x2F, 0x5C):
            raise PathRefused("it contains an encoded '/' or '\\' (%2F, %5C)")
    try:
        return unquote_to_bytes(path).decode()
    except UnicodeDecodeError:
        raise PathRefused("its percent-escapes are not UTF-8") from None


#: A ``.`` or ``..`` segment with ``;`` parameters (``..;``, ``.;jsessionid=1``).
_DOT_PARAMETERS = re.compile(r"(?:^|/)\.\.?;")


def normalize_path(path: str) -> str:
    """Return the canonical form of a request path (``/`` for the root).

    Args:
        path: The request path, raw or decoded, without the query string.

    Returns:
        The path with escapes decoded, ``.``/empty segments dropped, ``..``
        resolved and no trailing ``/``.

    Raises:
        PathRefused: The path cannot be matched safely; the message says why.
    """
    if not path.startswith("/"):
        raise PathRefused("it does not start with '/'")
    if len(path) > MAX_PATH_LENGTH:
        raise PathRefused(f"it is longer than {MAX_PATH_LENGTH} characters")
    if "%" in path:
        path = _decode(path)
    if _BAD_CHARS.search(path):
        raise PathRefused("it contains a control character or '\\'")
    if ";" in path and _DOT_PARAMETERS.search(path):
        # Java servers (Tomcat, Jetty) drop ';' parameters and then resolve the segment,
        # so '/public/..;/admin' would match /public here and serve /admin there.
        raise PathRefused(
            "a '.' or '..' segment carries ';' parameters, which some servers strip before "
            "resolving it"
        )
    if "//" not in path and "/." not in path and (path == "/" or not path.endswith("/")):
        return path
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise PathRefused("its '..' climbs above the root")
            segments.pop()
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def check_path_pattern(pattern: str) -> str | None:
    """Return what is wrong with a path pattern, or None when it is valid."""
    if not pattern.startswith("/"):
        return "must start with '/' (use '/**' for every path)"
    if pattern == "/":
        return None
    if pattern.endswith("/"):
        fixed = pattern.rstrip("/")
        return f"must not end with '/' (trailing slashes are ignored; write {fixed!r})"
    for segment in pattern[1:].split("/"):
        if segment == "":
            return "has an empty segment ('//')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment (paths are matched after '.' and '..' are resolved)"
        if "**" in segment and segment != "**":
            return f"has '**' inside the segment {segment!r}; '**' must be a whole segment"
        if "%" in segment:
            return f"has '%' in {segment!r}; write the decoded character (paths match decoded)"
        if not segment.isprintable() or _BAD_PATTERN_CHARS.intersection(segment):
            return f"has the segment {segment!r} with a space, control character, '\\', '?' or '#'"
    return None


def path_regex(pattern: str) -> str:
    """Translate a valid path pattern to a regex over the normalised path.

    The root is matched as the empty string, so ``/items/**`` (``/items`` then
    zero or more segments) is ``/items(?:/[^/]+)*`` and ``/`` is ``""``.
    """
    if pattern == "/":
        return ""
    parts: list[str] = []
    for segment in pattern[1:].split("/"):
        if segment == "**":
            parts.append("(?:/[^/]+)*")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + "[^/]*".join(re.escape(p) for p in segment.split("*")))
    return "".join(parts)


def check_caller_pattern(pattern: str) -> str | None:
    """Return what is wrong with a caller pattern, or None when it is valid."""
    if not pattern.startswith("spiffe://"):
        return (
            "must be a SPIFFE ID or glob such as 'spiffe://example.org/ns/*/svc/orders', "
            "'*' (any verified caller) or 'anonymous' (no certificate)"
        )
    trust_domain = pattern[len("spiffe://") :].partition("/")[0]
    if "*" in trust_domain:
        return "has a wildcard in the trust domain; name the trust domain exactly"
    for segment in pattern[len("spiffe://") + len(trust_domain) :].split("/")[1:]:
        if "**" in segment and segment != "**":
            return f"has '**' inside the segment {segment!r}; '**' must be a whole segment"
    try:
        SpiffeID.parse(pattern.replace("*", "x"))
    except SpiffeIDError as exc:
        # "Invalid SPIFFE ID '<value>': <problem>. Use the form ..." -> "<problem>"
        problem = exc.message.split("': ", 1)[-1].split(". Use the form", 1)[0]
        return f"is not a valid SPIFFE ID pattern: {problem}"
    return None


def caller_regex(pattern: str) -> str:
    """Translate a valid caller glob the way :func:`trustmesh.pki.glob_match` does."""
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return "".join(parts)

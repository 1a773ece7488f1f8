"""RFC 9457 problem documents: the one JSON body every trustmesh refusal carries.

The CA server, the middleware and the gateway/relay all answer refusals with
``application/problem+json``; they build the body here so its members stay the same.
Imports nothing of ours and no web framework.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["PROBLEM_CONTENT_TYPE", "problem_document"]

#: The media type of a problem document (RFC 9457 section 3).
PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_document(
    status: int, title: str, detail: str, *, type: str = "about:blank", **extra: Any
) -> bytes:
    """Return a problem document as JSON bytes.

    Args:
        status: The HTTP status the response carries.
        title: A short, fixed summary of the problem kind.
        detail: What happened in this case and how to fix it.
        type: The problem type URI (``about:blank``: the status says it all).
        **extra: Extension members (e.g. ``reason``); None values are left out.

    .. versionadded:: 0.1
    """
    doc: dict[str, Any] = {"type": type, "title": title, "status": status, "detail": detail}
    doc.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps(doc).encode()

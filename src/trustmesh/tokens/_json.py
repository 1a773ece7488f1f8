"""Strict JSON for everything the verifier parses: token parts and provider documents.

Python's :mod:`json` accepts ``NaN``, ``Infinity`` and ``-Infinity``, which RFC 8259
(§6) does not: a token or a provider answer carrying them is not JSON, and a
non-finite number must never reach a date comparison.
"""

from __future__ import annotations

import json

__all__ = ["MAX_DATE", "NonStandardJSONError", "loads"]

#: The latest NumericDate accepted (9999-12-31T23:59:59Z): beyond it no datetime exists.
MAX_DATE = 253_402_300_799


class NonStandardJSONError(ValueError):
    """The text holds a constant (``NaN``, ``Infinity``, ``-Infinity``) JSON does not allow."""

    def __init__(self, constant: str) -> None:
        super().__init__(f"{constant} is not JSON (RFC 8259 §6)")
        self.constant = constant


def _refuse_constant(constant: str) -> object:
    raise NonStandardJSONError(constant)


_decode = json.JSONDecoder(parse_constant=_refuse_constant).decode


def loads(data: str | bytes | bytearray) -> object:
    """Parse JSON as :func:`json.loads` does, refusing the non-standard constants.

    Raises:
        NonStandardJSONError: ``NaN``, ``Infinity`` or ``-Infinity`` appears.
        ValueError: Not JSON (or not text in a JSON encoding).
    """
    if not isinstance(data, str):
        data = bytes(data).decode(json.detect_encoding(data))
    return _decode(data)

"""The grammar of the shop's ids (users, items, events), shared by the API, the deny list and the CLI.

An id is 1..max_id_len bytes of UTF-8 that

- contains no control character (Unicode category Cc: C0 U+0000-U+001F including NUL, DEL U+007F,
  C1 U+0080-U+009F) and no line or paragraph separator (U+2028, U+2029), and
- neither starts nor ends with whitespace (Unicode White_Space, as ``str.isspace``).

Spaces inside an id are allowed. Why: ids are written to line-oriented files (the deny list), logs and
metrics labels, where a NUL or a line break splits or truncates them; and ``"SKU-1 "`` looking like
``"SKU-1"`` but never matching it is a bug in the sender that we would rather report than store.
Anything stricter (e.g. no ``#`` in the deny list's file format) is the business of that format.
"""

from __future__ import annotations

import re

from recsvc.errors import InvalidArgument

__all__ = ["check_id", "id_problem", "valid_id"]

# One C-speed scan instead of a Python loop per character: requests carry up to thousands of ids.
# Lone surrogates cannot come off the wire (protobuf rejects invalid UTF-8) but can from a command line.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def id_problem(value: str, max_len: int) -> str | None:
    """Why ``value`` is not a valid id (a message without the field name), or None when it is one."""
    if not value:
        return "must not be empty"
    if len(value) <= max_len:      # else too long whatever the encoding: UTF-8 has >= 1 byte a character
        bad = _FORBIDDEN.search(value)
        if bad is not None:
            code = ord(bad.group())
            if 0xD800 <= code <= 0xDFFF:
                return f"must be valid UTF-8, found a lone surrogate U+{code:04X} at {bad.start()}"
            return f"must not contain control characters, found U+{code:04X} at {bad.start()}"
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_len:
        return f"must be at most {max_len} bytes, got {size}"
    if value.isspace():
        return "must not be blank"
    if value[0].isspace() or value[-1].isspace():
        return "must not start or end with whitespace"
    return None


def valid_id(value: str, max_len: int) -> bool:
    """True when ``value`` follows the id grammar (see the module docstring)."""
    return id_problem(value, max_len) is None


def check_id(field: str, value: str, max_len: int) -> str:
    """``value`` when it is a valid id; otherwise InvalidArgument naming ``field``."""
    problem = id_problem(value, max_len)
    if problem is not None:
        raise InvalidArgument(field, problem)
    return value

"""The id grammar shared by the API, the deny list and the CLI."""

from __future__ import annotations

import pytest

from recsvc.errors import InvalidArgument
from recsvc.ids import check_id, id_problem, valid_id


@pytest.mark.parametrize("value", ["u", "SKU 42", "a#b", "ünï", "日本語", "🛒", "x" * 16, "é" * 8, "a\u200bb"])
def test_valid(value: str) -> None:
    assert valid_id(value, 16) and id_problem(value, 16) is None and check_id("f", value, 16) == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "must not be empty"),
        ("   ", "must not be blank"),
        ("x" * 17, "must be at most 16 bytes, got 17"),
        ("é" * 9, "must be at most 16 bytes, got 18"),
        ("🛒" * 5, "must be at most 16 bytes, got 20"),
        ("a\x00", "must not contain control characters, found U+0000 at 1"),
        ("\x1fa", "found U+001F at 0"),
        ("a\x7f", "found U+007F at 1"),
        ("a\x80b", "found U+0080 at 1"),
        ("a\x9f", "found U+009F at 1"),
        ("a\u2029b", "found U+2029 at 1"),
        ("a\udc80", "must be valid UTF-8, found a lone surrogate U+DC80 at 1"),     # from a command line
        (" a", "must not start or end with whitespace"),
        ("a\u3000", "must not start or end with whitespace"),                     # ideographic space
    ],
)
def test_invalid(value: str, problem: str) -> None:
    assert not valid_id(value, 16)
    assert problem in (id_problem(value, 16) or "")
    with pytest.raises(InvalidArgument) as info:
        check_id("events[2].item_id", value, 16)
    assert info.value.field == "events[2].item_id" and str(info.value).startswith("events[2].item_id: ")


def test_a_long_value_is_measured_not_scanned() -> None:
    # Too long whatever it holds: the size is what is reported.
    assert id_problem("\x00" * 100, 16) == "must be at most 16 bytes, got 100"

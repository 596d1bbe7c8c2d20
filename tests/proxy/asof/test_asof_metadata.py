"""The as-of metadata: parsing, validation and stripping (pure, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cloudstate_proxy.entity.asof import (
    AS_OF_SEQ,
    AS_OF_TIME,
    parse_seq_nr,
    parse_time,
    split_as_of,
)
from cloudstate_proxy.entity.model import AsOf
from cloudstate_proxy.errors import InvalidArgument


def test_metadata_without_as_of_is_an_ordinary_command() -> None:
    metadata = (("x-trace", "abc"), ("blob-bin", b"\x00"))
    assert split_as_of(metadata) == (metadata, None)


def test_as_of_seq_is_parsed_and_stripped() -> None:
    metadata = (("x-trace", "abc"), (AS_OF_SEQ, "7"), ("other", "1"))
    assert split_as_of(metadata) == ((("x-trace", "abc"), ("other", "1")), AsOf(seq_nr=7))


def test_as_of_time_is_parsed_and_stripped() -> None:
    rest, as_of = split_as_of(((AS_OF_TIME, "2026-11-27T13:45:00Z"), ("x", "y")))
    assert rest == (("x", "y"),)
    assert as_of == AsOf(time=datetime(2026, 11, 27, 13, 45, tzinfo=UTC))


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (((AS_OF_SEQ, "3"), (AS_OF_TIME, "2026-11-27T13:45:00Z")), "not both"),
        (((AS_OF_SEQ, "3"), (AS_OF_SEQ, "4")), "more than once"),
        (((AS_OF_TIME, "2026-11-27T13:45:00Z"),) * 2, "more than once"),
    ],
)
def test_conflicting_entries_are_invalid(metadata: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        split_as_of(metadata)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [("0", 0), ("12", 12), (" 5 ", 5), ("007", 7)])
def test_sequence_numbers(text: str, expected: int) -> None:
    assert parse_seq_nr(text) == expected


@pytest.mark.parametrize(
    "text", ["", "-1", "1.5", "abc", "+3", "1_000", "1e3", "٣", str(2**63), "0x10"]
)
def test_invalid_sequence_numbers(text: str) -> None:
    with pytest.raises(InvalidArgument, match="non-negative integer"):
        parse_seq_nr(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T13:45:00Z", datetime(2026, 11, 27, 13, 45, tzinfo=UTC)),
        ("2026-11-27t13:45:00z", datetime(2026, 11, 27, 13, 45, tzinfo=UTC)),
        ("2026-11-27 13:45:00Z", datetime(2026, 11, 27, 13, 45, tzinfo=UTC)),
        ("2026-11-27T14:45:00+01:00", datetime(2026, 11, 27, 13, 45, tzinfo=UTC)),
        ("2026-11-27T08:15:00-05:30", datetime(2026, 11, 27, 13, 45, tzinfo=UTC)),
        ("2026-11-27T13:45:00.5Z", datetime(2026, 11, 27, 13, 45, 0, 500_000, tzinfo=UTC)),
        # Past microseconds the digits are cut, never rounded up past the point.
        ("2026-11-27T13:45:00.123456999Z", datetime(2026, 11, 27, 13, 45, 0, 123456, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
    ],
)
def test_rfc3339_times(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2026-11-27T13:45:00",  # no offset: ambiguous
        "2026-11-27",
        "2026-11-27T13:45Z",
        "2026-13-27T13:45:00Z",
        "2026-11-27T25:00:00Z",
        "2026-11-27T13:45:00+1:00",
        "2026-11-27T13:45:00.Z",
        "1764251100",
    ],
)
def test_invalid_times(text: str) -> None:
    with pytest.raises(InvalidArgument, match="RFC 3339"):
        parse_time(text)

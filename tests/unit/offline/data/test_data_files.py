from __future__ import annotations

import gzip
import io
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsvc.errors import ConfigError, InvalidArgument
from recsvc.offline.data import Dataset, FileReport, load_files

CSV = """user_id,item_id,timestamp,event_type,extra
007,A-1,1700000300,view,x
bob,B-2,1700000100,PURCHASE,x
007,B-2,1700000200,Cart,x
007,C-3,1700000300,3,x
bob,A-1,1700000100,1,x
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _rows(ds: Dataset) -> list[tuple[str, str, int, int]]:
    return [
        (ds.user_ids[u], ds.item_ids[i], int(t), int(e))
        for u, i, t, e in zip(ds.users, ds.items, ds.timestamps, ds.event_types, strict=True)
    ]


def test_csv_ids_order_and_event_types(tmp_path: Path) -> None:
    ds = load_files(_write(tmp_path / "shop.csv", CSV))
    assert ds.name == "shop"
    assert ds.user_ids.tolist() == ["007", "bob"]           # first appearance; "007" kept verbatim
    assert ds.item_ids.tolist() == ["A-1", "B-2", "C-3"]
    assert ds.titles.tolist() == ["", "", ""] and ds.categories.tolist() == ["", "", ""]
    # Sorted by (user, time); the two ties keep file order.
    assert _rows(ds) == [
        ("007", "B-2", 1700000200, 2),
        ("007", "A-1", 1700000300, 1),
        ("007", "C-3", 1700000300, 3),
        ("bob", "B-2", 1700000100, 3),
        ("bob", "A-1", 1700000100, 1),
    ]


def test_gzipped_csv_and_default_event_type(tmp_path: Path) -> None:
    path = tmp_path / "events.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("user_id,item_id,timestamp\nu,i,5\nu,j,4\n")
    ds = load_files(path)
    assert ds.name == "events"
    assert _rows(ds) == [("u", "j", 4, 1), ("u", "i", 5, 1)]


def test_iso_and_fractional_timestamps(tmp_path: Path) -> None:
    text = (
        "user_id,item_id,timestamp\n"
        "u,a,2024-01-01T00:00:10Z\n"
        "u,b,2024-01-01 00:00:05\n"          # no zone: UTC
        "u,c,2024-01-01T02:00:07+02:00\n"    # = 00:00:07Z
        "u,d,1704067205.9\n"                 # 00:00:05.9Z: after b, though both truncate to :05
        "u,e,1704067205.2\n"
    )
    ds = load_files(_write(tmp_path / "iso.csv", text))
    midnight = 1704067200  # 2024-01-01T00:00:00Z
    assert ds.item_ids[ds.items].tolist() == ["b", "e", "d", "c", "a"]
    assert (ds.timestamps - midnight).tolist() == [5, 5, 5, 7, 10]


def test_parquet_round_trip_with_items(tmp_path: Path) -> None:
    inter = pd.DataFrame({
        "user_id": [10, 20, 10],                       # integer ids become "10", "20"
        "item_id": ["x", "new", "y"],
        "timestamp": pd.to_datetime(["2024-01-01T00:00:02Z", "2024-01-01T00:00:01Z",
                                     "2024-01-01T00:00:01Z"]),
        "event_type": [1, 2, 3],
    })
    catalog = pd.DataFrame({"item_id": ["y", "x", "unseen"], "title": ["Yak", None, "Umbrella"],
                            "category": ["pets", "toys", None]})
    inter.to_parquet(tmp_path / "inter.parquet")
    catalog.to_parquet(tmp_path / "items.pq")
    ds = load_files(tmp_path / "inter.parquet", tmp_path / "items.pq", name="mine")
    assert ds.name == "mine"
    # Catalog order first (unseen items stay), then items only seen in interactions.
    assert ds.items_frame().to_dict("list") == {
        "item_id": ["y", "x", "unseen", "new"],
        "title": ["Yak", "", "Umbrella", ""],
        "category": ["pets", "toys", "", ""],
    }
    assert ds.user_ids.tolist() == ["10", "20"]
    assert _rows(ds) == [
        ("10", "y", 1704067201, 3),
        ("10", "x", 1704067202, 1),
        ("20", "new", 1704067201, 2),
    ]


def test_csv_items_file_keeps_ids_verbatim(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.csv", "user_id,item_id,timestamp\n1,007,1\n1,7,2\n")
    items = _write(tmp_path / "items.csv", "item_id,title\n7,Seven\n007,Bond\n")
    ds = load_files(inter, items)
    assert ds.item_ids.tolist() == ["7", "007"]
    assert ds.titles.tolist() == ["Seven", "Bond"]
    assert ds.categories.tolist() == ["", ""]
    assert ds.items.tolist() == [1, 0]


def _error(tmp_path: Path, text: str, items: str | None = None) -> InvalidArgument:
    inter = _write(tmp_path / "bad.csv", text)
    catalog = _write(tmp_path / "bad_items.csv", items) if items is not None else None
    with pytest.raises(InvalidArgument) as info:
        load_files(inter, catalog)
    return info.value


def test_missing_column_names_it_and_lists_columns(tmp_path: Path) -> None:
    err = _error(tmp_path, "user,item_id,timestamp\nu,i,1\n")
    assert err.field == "interactions"
    assert str(err).endswith("missing column user_id (columns found: user, item_id, timestamp)")


def test_missing_items_column(tmp_path: Path) -> None:
    err = _error(tmp_path, "user_id,item_id,timestamp\nu,i,1\n", items="sku,title\ni,T\n")
    assert err.field == "items"
    assert "missing column item_id (columns found: sku, title)" in str(err)


def test_unparsable_timestamp_gives_row_and_value(tmp_path: Path) -> None:
    err = _error(tmp_path, "user_id,item_id,timestamp\nu,i,1\nu,i,2\nu,i,yesterday\n")
    assert err.field == "interactions.timestamp"
    assert "'yesterday' in row 3" in str(err)


def test_empty_timestamp(tmp_path: Path) -> None:
    err = _error(tmp_path, "user_id,item_id,timestamp\nu,i,\n")
    assert "unparsable timestamp '' in row 1" in str(err)


def test_millisecond_timestamps_are_rejected(tmp_path: Path) -> None:
    err = _error(tmp_path, "user_id,item_id,timestamp\nu,i,1700000000000\n")
    assert err.field == "interactions.timestamp"
    assert "1700000000000 in row 1" in str(err) and "milliseconds" in str(err)


def test_unknown_event_type_gives_value(tmp_path: Path) -> None:
    err = _error(tmp_path, "user_id,item_id,timestamp,event_type\nu,i,1,view\nu,i,2,wishlist\n")
    assert err.field == "interactions.event_type"
    assert "unknown event type" in str(err) and "'wishlist' in row 2" in str(err)


def test_unknown_numeric_event_type(tmp_path: Path) -> None:
    pd.DataFrame({"user_id": ["u"], "item_id": ["i"], "timestamp": [1], "event_type": [4]}).to_parquet(
        tmp_path / "e.parquet")
    with pytest.raises(InvalidArgument, match=r"unknown event type 4 in row 1"):
        load_files(tmp_path / "e.parquet")


def test_empty_id(tmp_path: Path) -> None:
    err = _error(tmp_path, "user_id,item_id,timestamp\nu,i,1\n,i,2\n")
    assert err.field == "interactions.user_id"
    assert "empty id '' in row 2" in str(err)


def test_duplicate_catalog_item(tmp_path: Path) -> None:
    err = _error(tmp_path, "user_id,item_id,timestamp\nu,i,1\n", items="item_id\ni\nj\ni\n")
    assert err.field == "items.item_id"
    assert "duplicate item_id 'i' in row 3" in str(err)


def test_empty_files(tmp_path: Path) -> None:
    err = _error(tmp_path, "")
    assert err.field == "interactions" and str(err).endswith("bad.csv is empty")
    err = _error(tmp_path, "user_id,item_id,timestamp\n")
    assert str(err).endswith("bad.csv has no rows")
    err = _error(tmp_path, "user_id,item_id,timestamp\nu,i,1\n", items="item_id,title\n")
    assert err.field == "items" and str(err).endswith("bad_items.csv has no rows")


def test_unsupported_suffix_and_corrupt_parquet(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"unsupported file type; expected one of \.csv, \.csv\.gz"):
        load_files(_write(tmp_path / "data.json", "{}"))
    with pytest.raises(InvalidArgument, match="cannot be read"):
        load_files(_write(tmp_path / "data.parquet", "not parquet"))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"interactions file .*nope\.csv does not exist"):
        load_files(tmp_path / "nope.csv")
    inter = _write(tmp_path / "ok.csv", "user_id,item_id,timestamp\nu,i,1\n")
    with pytest.raises(ConfigError, match=r"items file .*nope\.pq does not exist"):
        load_files(inter, tmp_path / "nope.pq")
    with pytest.raises(ConfigError, match=r"interactions file .* is a directory: give the CSV or Parquet file"):
        load_files(tmp_path)


def test_large_ids_are_not_mangled(tmp_path: Path) -> None:
    ids = np.array(["12345678901234567890", "1e5", "NA", "nan"])
    text = "user_id,item_id,timestamp\n" + "".join(f"u,{i},{n}\n" for n, i in enumerate(ids))
    ds = load_files(_write(tmp_path / "ids.csv", text))
    assert ds.item_ids.tolist() == ids.tolist()


DUPLICATED = """user_id,item_id,timestamp,event_type
u,A,1700000000,view
u,A,1700000000,1
u,A,2023-11-14T22:13:20Z,VIEW
u,A,1700000000,cart
v,A,1700000000,view
"""


def test_duplicate_rows_are_counted_and_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    report = FileReport()
    ds = load_files(_write(tmp_path / "dup.csv", DUPLICATED), report=report)
    # "view"/"1" and the ISO form of the same second are the same event: 2 duplicates of row 1.
    assert report.duplicates == 2 and not report.duplicates_kept
    assert sorted(_rows(ds)) == [("u", "A", 1700000000, 1), ("u", "A", 1700000000, 2), ("v", "A", 1700000000, 1)]
    assert "dup.csv: 2 duplicate rows dropped (--keep-duplicates keeps them)" in caplog.text


def test_duplicate_rows_can_be_kept(tmp_path: Path) -> None:
    report = FileReport()
    ds = load_files(_write(tmp_path / "dup.csv", DUPLICATED), keep_duplicates=True, report=report)
    assert report.duplicates == 2 and report.duplicates_kept
    assert ds.num_interactions == 5
    assert report.lines(tmp_path / "dup.csv") == [f"{tmp_path / 'dup.csv'}: 2 duplicate rows kept (--keep-duplicates)"]


def test_bad_rows_are_skipped_counted_and_the_first_few_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = ("user_id,item_id,timestamp,event_type\n"
            "u,A,1,view\n,A,2,view\nu,B,yesterday,view\nu,C,3,wishlist\nu,D,1700000000000,view\n"
            + "".join(f"u,X{n},zz{n},view\n" for n in range(10)) + "w,E,4,cart\n")  # fmt: skip
    report = FileReport()
    ds = load_files(_write(tmp_path / "bad.csv", text), skip_bad_rows=True, report=report)
    assert sorted(_rows(ds)) == [("u", "A", 1, 1), ("w", "E", 4, 2)]
    assert report.bad_rows == 14
    assert report.first_bad == [
        "row 2 interactions.user_id: empty id ''",
        "row 3 interactions.timestamp: unparsable timestamp 'yesterday' (want Unix seconds or ISO-8601)",
        "row 4 interactions.event_type: unknown event type 'wishlist' (want view/cart/purchase or 1/2/3)",
        "row 5 interactions.timestamp: timestamp out of range '1700000000000' (milliseconds? want Unix seconds)",
        "row 6 interactions.timestamp: unparsable timestamp 'zz0' (want Unix seconds or ISO-8601)",
    ]
    assert "bad.csv: skipped 14 bad rows; first: row 2 interactions.user_id" in caplog.text
    # Without the option the first bad row is the error, as before.
    with pytest.raises(InvalidArgument, match="empty id '' in row 2"):
        load_files(tmp_path / "bad.csv")


def test_skipping_bad_rows_from_parquet_with_null_ids(tmp_path: Path) -> None:
    pd.DataFrame({"user_id": [1.0, None, 3.0], "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3]}).to_parquet(
        tmp_path / "e.parquet")
    report = FileReport()
    ds = load_files(tmp_path / "e.parquet", skip_bad_rows=True, report=report)
    assert sorted(_rows(ds)) == [("1", "a", 1, 1), ("3", "c", 3, 1)] and report.bad_rows == 1


def test_a_file_of_only_bad_rows_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"no good row \(2 bad rows, first: row 1"):
        load_files(_write(tmp_path / "bad.csv", "user_id,item_id,timestamp\nu,i,x\nu,j,y\n"), skip_bad_rows=True)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("chunk_rows", [2, 1_000_000])
def test_reading_shows_progress_on_a_terminal_and_chunks_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    # Small chunks: the file is read in three pieces, which must give the very same dataset.
    monkeypatch.setattr("recsvc.offline.data._files._CHUNK_ROWS", chunk_rows)
    csv = _write(tmp_path / "events.csv", CSV)
    pd.read_csv(csv, dtype=str).to_parquet(tmp_path / "events.parquet")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    from_csv = load_files(csv)
    from_parquet = load_files(tmp_path / "events.parquet")
    assert _rows(from_csv) == _rows(from_parquet) == _rows(load_files(csv, name="again"))
    assert len(_rows(from_csv)) == 5
    # A bar per file (tqdm redraws at most every 0.1 s, so a tiny file shows its first frame only);
    # Parquet knows its row count up front.
    assert re.search(r"reading events\.csv: .* rows", terminal.getvalue()), terminal.getvalue()
    assert re.search(r"reading events\.parquet: .*/5\.00 ", terminal.getvalue()), terminal.getvalue()


def test_reading_is_silent_when_stderr_is_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_files(_write(tmp_path / "events.csv", CSV))
    assert "reading" not in capsys.readouterr().err


# ---- a shop's messy files: each is refused with the file, column and row, never a traceback or a silent change
def _parquet(tmp_path: Path, name: str, columns: dict[str, object]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.table(columns), path)  # type: ignore[arg-type]
    return path


def _refused(path: Path, items: Path | None = None) -> str:
    with pytest.raises(InvalidArgument) as info:
        load_files(path, items)
    return str(info.value).removeprefix(f"{info.value.field}: ")


@pytest.mark.parametrize("stamp", ["9999-12-31T23:59:59Z", "3000-01-01", "0001-01-01T00:00:00Z"])
def test_iso_timestamps_outside_pandas_nanosecond_range_are_refused_by_row(tmp_path: Path, stamp: str) -> None:
    path = _write(tmp_path / "e.csv", f"user_id,item_id,timestamp\nu,i,2024-05-01T12:00:00Z\nu,j,{stamp}\n")
    message = _refused(path)
    assert message.startswith(f"{path}: ") and f"{stamp!r} in row 2" in message
    assert ("in the future" in message) == (not stamp.startswith("0001")), message


def test_parquet_datetimes_beyond_2262_are_refused_by_row(tmp_path: Path) -> None:
    import pyarrow as pa

    stamps = pa.array([1_714_565_000_000_000, 32_503_680_000_000_000], pa.timestamp("us", tz="UTC"))  # year 3000
    path = _parquet(tmp_path, "e.parquet", {"user_id": ["u", "u"], "item_id": ["i", "j"], "timestamp": stamps})
    assert "timestamp in the future" in _refused(path) and "in row 2" in _refused(path)


def test_timestamps_before_1970_or_in_the_future_are_refused_as_the_api_does(tmp_path: Path) -> None:
    assert "timestamp before 1970 -86400 in row 2" in _refused(
        _write(tmp_path / "a.csv", "user_id,item_id,timestamp\nu,i,1700000000\nu,j,-86400\n"))
    assert "timestamp in the future 99999999999 in row 1" in _refused(
        _write(tmp_path / "b.csv", "user_id,item_id,timestamp\nu,i,99999999999\n"))
    # Milliseconds keep their own hint; within a day ahead (local time exported as UTC) is accepted.
    assert "milliseconds?" in _refused(_write(tmp_path / "c.csv", "user_id,item_id,timestamp\nu,i,-1700000000000\n"))
    import time

    soon = int(time.time()) + 3600
    assert _rows(load_files(_write(tmp_path / "d.csv", f"user_id,item_id,timestamp\nu,i,{soon}\n"))) == [
        ("u", "i", soon, 1)]


@pytest.mark.parametrize(("value", "problem"), [
    ("u1 ", "must not start or end with whitespace"),
    (" i1", "must not start or end with whitespace"),
    ('"u\tx"', "must not contain control characters, found U+0009 at 1"),
    ('"u\n1"', "must not contain control characters, found U+000A at 1"),
    ("x" * 129, "must be at most 128 bytes, got 129"),
])  # fmt: skip
def test_ids_the_api_would_refuse_are_refused(tmp_path: Path, value: str, problem: str) -> None:
    path = _write(tmp_path / "e.csv", f"user_id,item_id,timestamp\nu,i,1\n{value},i,2\n")
    message = _refused(path)
    assert f"invalid id {value.strip(chr(34))!r} in row 2 ({problem})" in message, message


def test_bad_ids_are_skipped_by_row_and_the_id_length_follows_the_setting(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu,i,1\nu ,i,2\nu,i ,3\nuuuu,i,4\n")
    report = FileReport()
    ds = load_files(path, skip_bad_rows=True, report=report, max_id_len=3)
    assert _rows(ds) == [("u", "i", 1, 1)] and report.bad_rows == 3
    assert report.first_bad[-1] == "row 4 interactions.user_id: invalid id 'uuuu' (must be at most 3 bytes, got 4)"


def test_items_file_ids_follow_the_grammar_too(tmp_path: Path) -> None:
    inter = _write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu,i1,1\n")
    items = _write(tmp_path / "items.csv", "item_id,title\ni1 ,T\n")
    assert "items.csv: invalid id 'i1 ' in row 1 (must not start or end with whitespace)" in _refused(inter, items)


def test_a_nul_byte_is_refused_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(b"user_id,item_id,timestamp\nu\x001,i,1\n")
    assert _refused(path) == f"{path}: a NUL byte at byte 27: a binary file or a broken export, not CSV text"
    gz = tmp_path / "e.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert "a NUL byte at byte 27" in _refused(gz)


def test_a_trailing_comma_on_every_row_does_not_shift_the_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu1,i1,1714565000,\nu2,i2,1714565001,\n")
    assert "rows have one field more than the header has names (a trailing comma on each line?)" in _refused(path)


def test_a_file_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes("user_id,item_id,timestamp\nRen\u00e9,i,1\n".encode("latin-1"))
    assert _refused(path) == f"{path} is not UTF-8 text (byte 0xe9 found): save it as UTF-8"


@pytest.mark.parametrize(("header", "name"), [
    ("user_id,item_id,timestamp,Event_Type", "event_type"),
    ("user_id,item_id,timestamp, event_type", "event_type"),
    ("User_ID,item_id,timestamp,event_type", "user_id"),
])  # fmt: skip
def test_a_column_named_almost_right_is_not_ignored(tmp_path: Path, header: str, name: str) -> None:
    path = _write(tmp_path / "e.csv", f"{header}\nu,i,1,purchase\n")
    found = header.split(",")[["user_id", "item_id", "timestamp", "event_type"].index(name)]
    assert _refused(path) == f"{path}: column {found!r} is not {name!r}: column names are exact, rename it"


def test_an_items_title_named_almost_right_is_not_ignored(tmp_path: Path) -> None:
    inter = _write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu,i,1\n")
    items = _write(tmp_path / "items.csv", "item_id,Title\ni,Hat\n")
    assert "column 'Title' is not 'title'" in _refused(inter, items)


def test_a_repeated_column_is_refused(tmp_path: Path) -> None:
    message = _refused(_write(tmp_path / "e.csv", "user_id,item_id,timestamp,user_id\nu,i,1,v\n"))
    assert "column user_id appears more than once" in message
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays([pa.array(["u"]), pa.array(["i"]), pa.array([1]), pa.array(["v"])],
                                 names=["user_id", "item_id", "timestamp", "user_id"])  # fmt: skip
    pq.write_table(table, tmp_path / "e.parquet")
    assert "column user_id appears more than once" in _refused(tmp_path / "e.parquet")


def test_parquet_integer_ids_with_a_null_stay_exact(tmp_path: Path) -> None:
    import pyarrow as pa

    users = pa.array([12345678901234567890, 12345678901234567891, None], pa.uint64())
    items = pa.array([9007199254740993, None, 9007199254740995], pa.int64())  # 2**53 + 1, + 3: floats round them
    path = _parquet(tmp_path, "e.parquet", {"user_id": users, "item_id": items, "timestamp": [1, 2, 3]})
    with pytest.raises(InvalidArgument, match=r"empty id None in row 3$") as info:
        load_files(path)
    assert info.value.field == "interactions.user_id"
    report = FileReport()
    ds = load_files(path, skip_bad_rows=True, report=report)
    assert _rows(ds) == [("12345678901234567890", "9007199254740993", 1, 1)] and report.bad_rows == 2


def test_parquet_float_ids_beyond_exact_integers_are_refused(tmp_path: Path) -> None:
    path = _parquet(tmp_path, "e.parquet", {"user_id": [1.0, 1.3e19], "item_id": ["i", "j"], "timestamp": [1, 2]})
    assert "id is a float too big to hold an integer exactly: 1.3e+19 in row 2" in _refused(path)


def test_parquet_binary_columns_are_decoded_or_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    good = _parquet(tmp_path, "good.parquet", {"user_id": pa.array([b"\xc3\xa9mile"], pa.binary()),
                                                "item_id": ["i"], "timestamp": [1]})  # fmt: skip
    assert _rows(load_files(good)) == [("\u00e9mile", "i", 1, 1)]
    bad = _parquet(tmp_path, "bad.parquet", {"user_id": pa.array([b"\xff\xfe"], pa.binary()), "item_id": ["i"],
                                              "timestamp": [1]})  # fmt: skip
    assert "not UTF-8: b'\\xff\\xfe' in row 1" in _refused(bad)
    inter = _write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu,i,1\n")
    items = _parquet(tmp_path, "items.parquet", {"item_id": ["i"], "title": pa.array([b"T\xe9l\xe9"], pa.binary())})
    assert "not UTF-8: b'T\\xe9l\\xe9' in row 1" in _refused(inter, items)


def test_boolean_ids_are_refused(tmp_path: Path) -> None:
    path = _parquet(tmp_path, "e.parquet", {"user_id": [True], "item_id": ["i"], "timestamp": [1]})
    assert "id must be a string or integer, got True in row 1" in _refused(path)


def test_row_errors_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "user_id,item_id,timestamp\nu,i,yesterday\n")
    assert _refused(path) == f"{path}: unparsable timestamp 'yesterday' in row 1 (want Unix seconds or ISO-8601)"

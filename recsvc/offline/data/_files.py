"""The user's own interactions (and optional catalog) from CSV or Parquet files."""

from __future__ import annotations

import gzip
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from recsvc.domain import EventType
from recsvc.errors import ConfigError, InvalidArgument
from recsvc.ids import id_problem
from recsvc.offline.data._dataset import Dataset, from_unsorted

__all__ = ["FileReport", "load_files", "read_catalog"]

log = logging.getLogger(__name__)

_CSV_SUFFIXES = (".csv", ".csv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_TEXT_COLUMNS = {"user_id": str, "item_id": str, "title": str, "category": str}
_EVENT_NAMES = {t.name.lower(): int(t) for t in EventType} | {str(int(t)): int(t) for t in EventType}
# Unix seconds beyond this (year ~5138) are almost surely milliseconds; failing beats silent nonsense.
_MAX_UNIX_S = 1e11
# An exported event later than now by more than this is a bug (a day covers local time exported as UTC).
_MAX_FUTURE_S = 86_400.0
# Floats hold integers exactly up to 2**53: a float id beyond it may already be another id.
_MAX_EXACT_FLOAT = 2.0**53
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# How many skipped rows a report names (all of them are counted).
_FIRST_BAD = 5


@dataclass
class FileReport:
    """What loading the interactions file found besides good rows (filled in by ``load_files``).

    ``duplicates``: rows identical to an earlier one in user, item, timestamp and event type (dropped
    unless ``keep_duplicates``). ``bad_rows``: rows skipped by ``skip_bad_rows``; ``first_bad`` names the
    first few (row, field, value, problem).
    """

    duplicates: int = 0
    duplicates_kept: bool = False
    bad_rows: int = 0
    first_bad: list[str] = field(default_factory=list)

    def lines(self, path: Path) -> list[str]:
        """One line per finding, for the user (empty when the file was clean)."""
        out = []
        if self.duplicates:
            fate = "kept (--keep-duplicates)" if self.duplicates_kept else "dropped (--keep-duplicates keeps them)"
            out.append(f"{path}: {self.duplicates:,} duplicate rows {fate}")
        if self.bad_rows:
            out.append(f"{path}: skipped {self.bad_rows:,} bad rows; first: " + "; ".join(self.first_bad))
        return out


class _Rows:
    """Where bad rows go: the first one raises, or with ``skip`` all are collected and dropped."""

    def __init__(self, n: int, skip: bool, path: Path) -> None:
        self.skip = skip
        self.path = path
        self.bad = np.zeros(n, dtype=bool)
        self.problems: list[tuple[int, str]] = []

    def reject(self, field: str, mask: npt.NDArray[np.bool_], values: pd.Series, what: str, hint: str = "") -> None:
        if not mask.any():
            return
        if not self.skip:
            raise _row_error(self.path, field, mask, values, what, hint)
        for row in np.flatnonzero(mask & ~self.bad)[:_FIRST_BAD]:
            self.problems.append((int(row), f"row {row + 1} {field}: {what} {values.iloc[row]!r}{hint}"))
        self.bad |= mask

    def first(self) -> list[str]:
        return [text for _, text in sorted(self.problems)[:_FIRST_BAD]]


def load_files(
    interactions: Path, items: Path | None = None, *, name: str | None = None, keep_duplicates: bool = False,
    skip_bad_rows: bool = False, report: FileReport | None = None, max_id_len: int = 128,
) -> Dataset:  # fmt: skip
    """Load interactions, and optionally a catalog, from CSV (``.csv``, ``.csv.gz``) or Parquet.

    Interactions need columns ``user_id``, ``item_id``, ``timestamp`` (Unix seconds as int/float, or
    ISO-8601 strings / datetimes; a timestamp without a zone is UTC) and may have ``event_type``
    (``view``/``cart``/``purchase`` in any case, or 1/2/3; all VIEW when the column is absent). The
    items file needs ``item_id`` and may have ``title`` and ``category``. Other columns are ignored.
    Ids are read as strings, verbatim ("007" stays "007"), and must follow the API's id grammar
    (``recsvc.ids``: no control characters, no leading or trailing whitespace, at most ``max_id_len``
    bytes), so every loaded user and item can be asked for.

    Dense item ids follow the items file's row order, then items only seen in interactions in order of
    first appearance (with empty title and category); catalog items nobody interacted with stay in the
    catalog, so they can still be retrieved. Dense user ids follow first appearance. Fractional seconds
    are truncated after sorting, so they still order a user's events.

    Raises ConfigError for a missing file and InvalidArgument (``field`` = ``"interactions"``/``"items"``
    or ``"<file>.<column>"``) for an unsupported suffix, an unreadable or empty file, a missing column,
    a repeated column, a column named like a known one but not exactly (``Event_Type``), an empty or
    invalid id, an unparsable timestamp, one before 1970 or over a day in the future, or an unknown
    event type; messages name the file, the row (1-based, header and blank lines excluded) and the
    offending value. With ``skip_bad_rows`` such interaction rows are dropped
    instead (the items file stays strict), and only a file with no good row is an error.

    Rows repeating an earlier row's user, item, timestamp and event type are dropped, unless
    ``keep_duplicates``. What was dropped or skipped is logged as a warning and, when ``report`` is
    given, counted in it.
    """
    interactions = Path(interactions)
    frame = _read(interactions, "interactions")
    _check_columns(frame, ("user_id", "item_id", "timestamp"), ("event_type",), "interactions", interactions)
    rows = _Rows(len(frame), skip_bad_rows, interactions)
    user_col = _ids(frame["user_id"], "interactions.user_id", rows, max_id_len)
    item_col = _ids(frame["item_id"], "interactions.item_id", rows, max_id_len)
    seconds = _timestamps(frame["timestamp"], rows)
    if "event_type" in frame.columns:
        event_types = _event_types(frame["event_type"], rows)
    else:
        event_types = np.full(len(frame), int(EventType.VIEW), dtype=np.int8)
    found = report if report is not None else FileReport()
    found.duplicates_kept = keep_duplicates
    keep = ~rows.bad
    found.bad_rows, found.first_bad = int(rows.bad.sum()), rows.first()
    if not keep.any():
        raise InvalidArgument("interactions", f"{interactions}: no good row ({found.bad_rows:,} bad rows, first: "
                                              f"{'; '.join(found.first_bad)})")  # fmt: skip
    # Duplicates after parsing: "view" and "1", or "1700000000" and its ISO form, are the same event.
    duplicated = pd.DataFrame({"u": user_col, "i": item_col, "t": seconds, "e": event_types})[keep].duplicated()
    found.duplicates = int(duplicated.sum())
    if found.duplicates and not keep_duplicates:
        keep[np.flatnonzero(keep)[duplicated.to_numpy()]] = False
    for line in found.lines(interactions):
        log.warning("%s", line)
    user_col, item_col, seconds, event_types = user_col[keep], item_col[keep], seconds[keep], event_types[keep]

    if items is not None:
        catalog = read_catalog(items, max_id_len=max_id_len)
        catalog_ids = catalog["item_id"].to_numpy(dtype=object)
        titles = _column(catalog, "title")
        categories = _column(catalog, "category")
    else:
        catalog_ids = np.empty(0, dtype=object)
        titles = categories = np.empty(0, dtype=object)

    # Catalog items first, in file order; items only seen in interactions appended after them.
    item_codes = pd.Index(catalog_ids).get_indexer(item_col)
    unknown = item_codes < 0
    extra_codes, extra_ids = pd.factorize(item_col[unknown])
    item_codes[unknown] = len(catalog_ids) + extra_codes
    extra = np.asarray(extra_ids, dtype=object)
    blank = np.full(len(extra), "", dtype=object)
    user_codes, user_ids = pd.factorize(user_col)

    return from_unsorted(
        name if name is not None else _stem(interactions),
        user_ids=np.asarray(user_ids, dtype=object),
        item_ids=np.concatenate([catalog_ids, extra]),
        titles=np.concatenate([titles, blank]),
        categories=np.concatenate([categories, blank]),
        users=user_codes,
        items=item_codes,
        timestamps=np.floor(seconds).astype(np.int64),
        event_types=event_types,
        sort_key=seconds,
    )


def read_catalog(path: Path, *, max_id_len: int = 128) -> pd.DataFrame:
    """A catalog file (``item_id`` and optionally ``title``, ``category``) as a frame of str columns.

    Checked as ``load_files`` checks the interactions (the file, the column names, ids in the API's
    grammar, UTF-8), and ``item_id`` must be unique. Only the columns the file has are returned, so a
    caller can tell a missing title from an empty one.
    """
    path = Path(path)
    catalog = _read(path, "items")
    _check_columns(catalog, ("item_id",), ("title", "category"), "items", path)
    strict = _Rows(len(catalog), False, path)
    ids = _ids(catalog["item_id"], "items.item_id", strict, max_id_len)
    duplicated = pd.Index(ids).duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise InvalidArgument("items.item_id", f"{path}: duplicate item_id {ids[row]!r} in row {row + 1}")
    out = {"item_id": ids} | {c: _text(catalog, c, strict) for c in ("title", "category") if c in catalog.columns}
    return pd.DataFrame(out, dtype=object)


def _column(frame: pd.DataFrame, name: str) -> npt.NDArray[np.object_]:
    if name not in frame.columns:
        return np.full(len(frame), "", dtype=object)
    values: npt.NDArray[np.object_] = frame[name].to_numpy(dtype=object)
    return values


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*_CSV_SUFFIXES, *_PARQUET_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# Rows per chunk of a file read: a progress step of a second or so, little extra memory.
_CHUNK_ROWS = 1_000_000


def _progress(path: Path, total: int | None = None) -> tqdm[Any]:
    # On a terminal only (disable=None): logs and pipes get the loader's summary line alone.
    return tqdm(desc=f"reading {path.name}", total=total, unit=" rows", unit_scale=True, file=sys.stderr,
                disable=None, leave=False)  # fmt: skip


def _read(path: Path, field: str) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{field} file {path} is a directory: give the CSV or Parquet file in it")
    if not path.is_file():
        raise ConfigError(f"{field} file {path} does not exist")
    lower = path.name.lower()
    try:
        if lower.endswith(_CSV_SUFFIXES):
            # Text columns as str with no NA conversion, so ids stay verbatim ("007", "NA", "1e5");
            # timestamp and event_type are inferred (ints parse far faster than strings) and checked later.
            # In chunks, so that a long load shows its progress on a terminal.
            _refuse_nul(path, field)
            chunks = []
            with _progress(path) as bar, pd.read_csv(path, dtype=_CSV_TEXT_COLUMNS, keep_default_na=False,
                                                     na_filter=False, chunksize=_CHUNK_ROWS) as reader:  # fmt: skip
                for chunk in reader:
                    # Rows with one field more than the header has names (a trailing comma on each
                    # line): pandas takes the first column as the index and shifts every name by one.
                    if not isinstance(chunk.index, pd.RangeIndex):
                        raise InvalidArgument(field, f"{path}: rows have one field more than the header has "
                                                     "names (a trailing comma on each line?): name the extra "
                                                     "column or remove it")  # fmt: skip
                    chunks.append(chunk)
                    bar.update(len(chunk))
            frame = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame()
        elif lower.endswith(_PARQUET_SUFFIXES):
            parquet = pq.ParquetFile(path)
            batches = []
            with _progress(path, total=parquet.metadata.num_rows) as bar:
                for batch in parquet.iter_batches(batch_size=_CHUNK_ROWS):
                    batches.append(batch)
                    bar.update(batch.num_rows)
            # integer_object_nulls: an integer column with a null stays Python ints (exact), where pandas
            # would make it float64 and round ids beyond 2**53.
            frame = pa.Table.from_batches(batches, schema=parquet.schema_arrow).to_pandas(integer_object_nulls=True)
        else:
            raise InvalidArgument(
                field,
                f"{path}: unsupported file type; expected one of "
                f"{', '.join(_CSV_SUFFIXES + _PARQUET_SUFFIXES)}",
            )
    except pd.errors.EmptyDataError as exc:
        raise InvalidArgument(field, f"{path} is empty") from exc
    except InvalidArgument:
        raise
    except UnicodeDecodeError as exc:
        raise InvalidArgument(field, f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} found): "
                                     "save it as UTF-8") from exc  # fmt: skip
    except (ValueError, OSError) as exc:
        # pandas' ParserError and pyarrow's ArrowInvalid are ValueErrors; a corrupt .gz is an OSError.
        raise InvalidArgument(field, f"{path} cannot be read: {exc}") from exc
    if len(frame) == 0:
        raise InvalidArgument(field, f"{path} has no rows")
    return frame


def _refuse_nul(path: Path, field: str) -> None:
    """A NUL byte in a CSV: pandas' parser would end the field there and drop the rest of it silently."""
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        offset = 0
        while block := fh.read(1 << 20):
            at = block.find(b"\0")
            if at >= 0:
                raise InvalidArgument(field, f"{path}: a NUL byte at byte {offset + at:,}: a binary file or a "
                                             "broken export, not CSV text")  # fmt: skip
            offset += len(block)


def _check_columns(frame: pd.DataFrame, required: tuple[str, ...], optional: tuple[str, ...], field: str,
                   path: Path) -> None:  # fmt: skip
    """The file's known columns each appear once and by their exact names; the required ones exist."""
    names = [str(c) for c in frame.columns]
    found = ", ".join(names)
    for name in (*required, *optional):
        # pandas renames a CSV's repeated column "name.1"; Parquet keeps both under one name.
        if names.count(name) > 1 or (name in names and f"{name}.1" in names):
            raise InvalidArgument(field, f"{path}: column {name} appears more than once (columns found: {found})")
        if name not in names:
            near = [c for c in names if c.strip().lower() == name]
            if near:
                raise InvalidArgument(field, f"{path}: column {near[0]!r} is not {name!r}: column names are exact, "
                                             "rename it")  # fmt: skip
    missing = [c for c in required if c not in names]
    if missing:
        raise InvalidArgument(field, f"{path}: missing column {', '.join(missing)} (columns found: {found})")


def _row_error(
    path: Path, field: str, mask: npt.NDArray[np.bool_], values: pd.Series, what: str, hint: str = ""
) -> InvalidArgument:
    """Name the file, the first offending row (1-based, header excluded) and its value."""
    row = int(np.flatnonzero(mask)[0])
    return InvalidArgument(field, f"{path}: {what} {values.iloc[row]!r} in row {row + 1}{hint}")


def _ids(column: pd.Series, field: str, rows: _Rows, max_len: int) -> npt.NDArray[np.object_]:
    """Ids as Python str; integer columns (Parquet) become their decimal strings. Bad rows go to ``rows``."""
    original = column
    if pd.api.types.is_bool_dtype(column.dtype):
        rows.reject(field, np.ones(len(column), dtype=bool), column, "id must be a string or integer, got")
    elif pd.api.types.is_float_dtype(column.dtype):
        # Whole floats are taken as the integers they hold (pandas writes 1.0 for an int column with a
        # null); fractions and floats too big to hold an integer exactly are refused.
        x = column.fillna(0).to_numpy(dtype=np.float64)
        bad = column.isna().to_numpy() | (x % 1 != 0)
        rows.reject(field, bad, column, "id must be a string or integer, got")
        inexact = ~bad & (np.abs(x) > _MAX_EXACT_FLOAT)
        rows.reject(field, inexact, column, "id is a float too big to hold an integer exactly:",
                    " (write ids as text or integers)")  # fmt: skip
        column = column.where(~(bad | inexact), 0).astype(np.int64)
    elif column.dtype == object:
        column = _decoded(column, field, rows)
    null = column.isna().to_numpy()
    rows.reject(field, null, original, "empty id")
    values: npt.NDArray[np.object_] = column.astype(str).to_numpy(dtype=object)
    empty = (values == "") & ~null
    rows.reject(field, empty, original, "empty id")
    # The API's grammar (recsvc.ids), checked once per distinct id: a user or item the API would
    # refuse could be stored but never asked for ("u1 " is not "u1").
    ok = ~(null | empty)
    problems = {v: p for v in pd.unique(values[ok]) if (p := id_problem(v, max_len)) is not None}
    if problems:
        shown = pd.Series(values)
        found = shown.map(problems)
        flagged = found.notna().to_numpy() & ok
        for problem in dict.fromkeys(found[flagged]):      # in order of first appearance
            rows.reject(field, flagged & (found == problem).to_numpy(), shown, "invalid id", f" ({problem})")
    return values


def _decoded(column: pd.Series, field: str, rows: _Rows) -> pd.Series:
    """An object column with Parquet ``binary`` values (bytes) as text; bytes that are not UTF-8 are bad rows."""
    is_bytes = np.fromiter((isinstance(v, bytes) for v in column), dtype=bool, count=len(column))
    if not is_bytes.any():
        return column

    def text(value: bytes) -> str | None:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None

    decoded = column.copy()
    decoded[is_bytes] = [text(v) for v in column[is_bytes]]
    undecodable = is_bytes & decoded.isna().to_numpy()
    rows.reject(field, undecodable, column, "not UTF-8:")
    return decoded.where(~undecodable, "")


def _text(frame: pd.DataFrame, column: str, rows: _Rows) -> npt.NDArray[np.object_]:
    values = frame[column]
    if values.dtype == object:
        values = _decoded(values, f"items.{column}", rows)
    text: npt.NDArray[np.object_] = values.astype(object).where(values.notna(), "").astype(str).to_numpy(
        dtype=object
    )
    return text


def _timestamps(column: pd.Series, rows: _Rows) -> npt.NDArray[np.float64]:
    """Unix seconds (float, so sub-second order survives until sorting) from numbers or ISO-8601."""
    field = "interactions.timestamp"
    seconds: npt.NDArray[np.float64]
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        utc = column.dt.tz_localize("UTC") if column.dt.tz is None else column.dt.tz_convert("UTC")
        seconds = _epoch_seconds(utc)
    elif pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        seconds = column.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        seconds = _text_timestamps(_as_text(column).str.strip())
    bad = ~np.isfinite(seconds)
    rows.reject(field, bad, column, "unparsable timestamp", " (want Unix seconds or ISO-8601)")
    value = np.where(bad, 0.0, seconds)
    millis = np.abs(value) > _MAX_UNIX_S
    if millis.any():                                 # only numbers: "9999-12-31" is in the future below
        millis &= _numeric(column, millis)
    rows.reject(field, millis, column, "timestamp out of range", " (milliseconds? want Unix seconds)")
    # As the API refuses them (RecordEvents): an event before 1970 or in the future is a bug upstream.
    now = time.time()
    future = value > now + _MAX_FUTURE_S
    latest = pd.Timestamp(now + _MAX_FUTURE_S, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    rows.reject(field, future, column, "timestamp in the future", f" (later than {latest}, a day from now)")
    past = value < 0
    rows.reject(field, past, column, "timestamp before 1970", " (want Unix seconds or ISO-8601)")
    return np.where(bad | millis | future | past, 0.0, seconds)


def _numeric(column: pd.Series, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Which of the ``mask`` rows hold a number (not ISO-8601 text)."""
    if pd.api.types.is_numeric_dtype(column.dtype):
        return mask
    out = np.zeros(len(column), dtype=bool)
    out[mask] = _as_text(column[mask]).str.strip().str.fullmatch(_NUMBER).to_numpy(dtype=bool)
    return out


def _epoch_seconds(utc: pd.Series) -> npt.NDArray[np.float64]:
    """Unix seconds of zone-aware datetimes, NaN for NaT.

    In microseconds, which hold years 1 to 9999 (pandas parses those at that unit; nanoseconds, as a
    subtraction of the epoch would use, end in 2262).
    """
    naive = utc.dt.tz_convert("UTC").dt.tz_localize(None)
    micros = naive.to_numpy(dtype="datetime64[us]").astype(np.int64)
    return np.where(naive.isna().to_numpy(), np.nan, micros / 1e6)


def _as_text(column: pd.Series) -> pd.Series:
    """The column as strings, nulls as ""; a no-op for CSV's null-free str columns (saves copies)."""
    if pd.api.types.is_string_dtype(column.dtype) and not column.isna().any():
        return column.astype(str)
    return column.astype(object).where(column.notna(), "").astype(str)


def _text_timestamps(text: pd.Series) -> npt.NDArray[np.float64]:
    """Seconds from numeric or ISO-8601 strings; NaN where neither parses."""
    # Whole-column strict parses first: they fail fast on the first odd value, while the element-wise
    # coercing path below is several times slower on millions of rows.
    try:
        return np.array(pd.to_numeric(text).to_numpy(dtype=np.float64, na_value=np.nan))
    except (ValueError, TypeError):
        pass
    try:
        return _epoch_seconds(pd.to_datetime(text, utc=True, format="ISO8601"))
    except (ValueError, TypeError):
        pass
    # Mixed or bad values: parse each form where it applies; what neither parses stays NaN.
    # np.array copies: pandas' copy-on-write hands out read-only views, and this one is filled in.
    seconds = np.array(pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
    iso = np.isnan(seconds) & (text != "").to_numpy()
    if iso.any():
        parsed = pd.to_datetime(text[iso], utc=True, format="ISO8601", errors="coerce")
        ok = parsed.notna().to_numpy()
        seconds[np.flatnonzero(iso)[ok]] = _epoch_seconds(parsed[ok])
    return seconds


def _event_types(column: pd.Series, rows: _Rows) -> npt.NDArray[np.int8]:
    field = "interactions.event_type"
    hint = " (want view/cart/purchase or 1/2/3)"
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        text = _as_text(column).str.strip().str.lower()
        values = text.map(_EVENT_NAMES).to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isin(values, [int(t) for t in EventType])
    rows.reject(field, bad, column, "unknown event type", hint)
    return np.asarray(np.where(bad, int(EventType.VIEW), values), dtype=np.int8)

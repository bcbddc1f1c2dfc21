"""Generic event-log converter: a CSV (with header) or Parquet file with a column mapping.

Required columns: user id, item id, timestamp. Optional: request id (missing -> one request per
user), action (missing -> ACTION_ENGAGE = 1), surface (missing -> 0). Ids must be non-negative
integers (any range; they are remapped dense). Timestamps: integer unix seconds, float seconds
(floored) or an Arrow/Parquet timestamp type (converted to seconds). Actions must already use the
vocabulary of ``schema.py`` (0 view, 1 engage, 2 save, 3 hide; larger values = custom types).

Errors name the file and, for CSV, the 1-based physical line (header = line 1); for Parquet the
0-based row.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .convert import locate_input, read_input_bytes
from .schema import DataFormatError, DatasetMeta, write_prepared


@dataclass
class ColumnMapping:
    """Which source column holds which event field ("" = absent, use the default)."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    request_id: str = ""
    action: str = ""
    surface: str = ""
    delimiter: str = ","  # CSV only


_ID_FIELDS = ("user_id", "item_id", "request_id", "action", "surface")


def _mapped(m: ColumnMapping) -> List[Tuple[str, str]]:
    """[(event field, source column)] for the columns present in the mapping."""
    out = [(f, getattr(m, f)) for f in ("user_id", "item_id", "timestamp", "request_id", "action", "surface")]
    missing = [f for f, c in out[:3] if not c]
    if missing:
        raise ValueError(f"column mapping must name columns for {missing}")
    return [(f, c) for f, c in out if c]


def _timestamp_seconds(col: pa.ChunkedArray, where: str) -> np.ndarray:
    t = col.type
    if pa.types.is_timestamp(t):
        return pc.cast(col, pa.timestamp("s")).cast(pa.int64()).to_numpy()
    if pa.types.is_integer(t):
        return col.cast(pa.int64()).to_numpy()
    if pa.types.is_floating(t):
        return np.floor(col.to_numpy()).astype(np.int64)
    raise DataFormatError(f"{where}: timestamp column has type {t}; expected integer/float unix seconds or a timestamp")


def _scan_csv(data: bytes, name: str, mapping: ColumnMapping) -> None:
    """Raise DataFormatError at the first bad CSV line (field count, non-integer id, negative id)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace")), delimiter=mapping.delimiter)
    header = next(reader, None)
    if not header:
        raise DataFormatError(f"{name}: empty file (expected a header line)")
    fields = _mapped(mapping)
    idx = {f: header.index(c) for f, c in fields}
    ends_nl = data.endswith(b"\n")
    for row in reader:
        if not row:
            continue
        line = reader.line_num
        hint = "" if ends_nl else " (last line has no trailing newline: file truncated?)"
        if len(row) != len(header):
            raise DataFormatError(f"{name}:{line}: expected {len(header)} fields, got {len(row)}: "
                                  f"{mapping.delimiter.join(row)!r}{hint}")
        for f, _ in fields:
            v = row[idx[f]].strip()
            try:
                num = float(v) if f == "timestamp" else int(v)
            except ValueError:
                raise DataFormatError(f"{name}:{line}: field {f} ({header[idx[f]]}) is not numeric: {v!r}") from None
            if num < 0 and f in _ID_FIELDS:
                raise DataFormatError(f"{name}:{line}: negative {f} ({header[idx[f]]}) {v}")


def _read_csv(path: str, mapping: ColumnMapping, progress: bool) -> Tuple[pa.Table, bytes, str]:
    data, name = read_input_bytes(path, progress=progress)
    if not data.strip():
        raise DataFormatError(f"{name}: empty file (expected a header line)")
    header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8", errors="replace")),
                             delimiter=mapping.delimiter))
    for f, c in _mapped(mapping):
        if c not in header:
            raise DataFormatError(f"{name}:1: header has no column {c!r} (for {f}); columns: {header}")
    types = {c: pa.int64() for f, c in _mapped(mapping) if f != "timestamp"}
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=mapping.delimiter),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=[c for _, c in _mapped(mapping)]),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        _scan_csv(data, name, mapping)
        raise DataFormatError(f"{name}: cannot parse: {e}") from e
    return table, data, name


def convert_event_log(path: str, out_dir: str, *, mapping: ColumnMapping, fmt: str, source: str,
                      min_events: int = 1, progress: bool = True) -> DatasetMeta:
    """Generic CSV (``fmt="csv"``) or Parquet (``fmt="parquet"``) event log -> prepared dir.

    Events of a request are ordered by timestamp, ties in file order.
    """
    src = locate_input(path, ["events.parquet"] if fmt == "parquet" else ["events.csv"])
    data = b""
    if fmt == "csv":
        table, data, name = _read_csv(src, mapping, progress)
    elif fmt == "parquet":
        name = src
        try:
            schema_names = pq.read_schema(src).names
        except pa.ArrowInvalid as e:
            raise DataFormatError(f"{src}: not a parquet file: {e}") from e
        for f, c in _mapped(mapping):
            if c not in schema_names:
                raise DataFormatError(f"{src}: no column {c!r} (for {f}); columns: {schema_names}")
        table = pq.read_table(src, columns=[c for _, c in _mapped(mapping)])
    else:
        raise ValueError(f"fmt must be csv or parquet, got {fmt!r}")
    if table.num_rows == 0:
        raise DataFormatError(f"{name}: empty file (no event rows)")

    cols: Dict[str, np.ndarray] = {}
    for f, c in _mapped(mapping):
        col = table.column(c)
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataFormatError(f"{_where(name, fmt, row)}: column {c} ({f}) is empty/null")
        if f == "timestamp":
            cols[f] = _timestamp_seconds(col, name)
            continue
        if not pa.types.is_integer(col.type):
            raise DataFormatError(f"{name}: column {c} ({f}) has type {col.type}, expected integers")
        cols[f] = col.cast(pa.int64()).to_numpy()
        if (cols[f] < 0).any():
            if fmt == "csv":
                _scan_csv(data, name, mapping)
            row = int(np.flatnonzero(cols[f] < 0)[0])
            raise DataFormatError(f"{_where(name, fmt, row)}: negative {f} ({c}) {int(cols[f][row])}")
    return write_prepared(out_dir, user_id=cols["user_id"], item_id=cols["item_id"], timestamp=cols["timestamp"],
                          action=cols.get("action"), surface=cols.get("surface"), request_id=cols.get("request_id"),
                          source=source, min_events=min_events,
                          provenance={"input": src, "input_bytes": int(os.path.getsize(src)),
                                      "columns": {f: c for f, c in _mapped(mapping)}})


def _where(name: str, fmt: str, row: int) -> str:
    return f"{name}:{row + 2}" if fmt == "csv" else f"{name} row {row}"

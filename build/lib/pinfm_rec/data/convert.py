"""Shared pieces of the source converters: path resolution, file reading, strict text parsing.

Converters (``convert_movielens.py``, ``convert_csv.py``) parse a public/raw file into numpy event
columns and hand them to ``schema.write_prepared``. Parsing is two-speed:

* fast path: pyarrow's C++ CSV reader with every column typed int64 (1M lines in ~0.1 s);
* on any failure (wrong field count, non-numeric field, negative id) a line-by-line rescan finds the
  first bad line and raises ``DataFormatError`` as ``<file>:<line>: <problem>: <line text>``, so
  errors are exact without slowing down good files. A truncated file (last line cut mid-row) shows
  up as a wrong field count on its last line and the message says the line has no newline.
"""
from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from .schema import DataFormatError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "PINFM_DATA_DIR"
_INT_RE = re.compile(rb"[ \t]*-?\d+[ \t]*")  # pyarrow also accepts padding


def resolve_data_path(path: str) -> str:
    """Absolute path of a data input. Relative paths resolve against ``$PINFM_DATA_DIR`` when set,
    else against the working directory. ``~`` is expanded."""
    if not path:
        raise ValueError("empty data path")
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        base = os.environ.get(DATA_DIR_ENV) or os.getcwd()
        path = os.path.join(base, path)
    return os.path.abspath(path)


def locate_input(path: str, candidates: Sequence[str]) -> str:
    """``path`` resolved; if it is a directory, the first of ``candidates`` (relative names) inside it.

    A ``.zip`` path is returned as is (read with ``read_input_bytes(path, member=...)``).
    """
    full = resolve_data_path(path)
    if os.path.isdir(full):
        for c in candidates:
            p = os.path.join(full, c)
            if os.path.isfile(p):
                return p
        raise FileNotFoundError(f"{full}: directory has none of {list(candidates)}")
    if not os.path.exists(full):
        hint = "" if os.environ.get(DATA_DIR_ENV) else f" (set ${DATA_DIR_ENV} to resolve relative paths)"
        raise FileNotFoundError(f"{full}: no such file{hint}")
    return full


def read_input_bytes(path: str, members: Sequence[str] = (), progress: bool = True) -> Tuple[bytes, str]:
    """(content, display name) of a file, or of the first existing ``members`` entry of a zip."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for m in members:
                if m in names:
                    return zf.read(m), f"{path}:{m}"
        raise FileNotFoundError(f"{path}: zip has none of {list(members)}")
    size = os.path.getsize(path)
    buf = bytearray()
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"read {os.path.basename(path)}",
                                     disable=not progress, leave=False) as bar:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                break
            buf += chunk
            bar.update(len(chunk))
    return bytes(buf), path


def _line_error(name: str, lineno: int, problem: str, line: bytes, last: bool, ends_nl: bool) -> DataFormatError:
    text = line.decode("latin-1")
    if len(text) > 120:
        text = text[:117] + "..."
    hint = " (last line has no trailing newline: file truncated?)" if last and not ends_nl else ""
    return DataFormatError(f"{name}:{lineno}: {problem}: {text!r}{hint}")


def scan_lines_for_error(
    data: bytes, name: str, sep: bytes, columns: Sequence[str], nonneg: Sequence[str], progress: bool = True
) -> None:
    """Walk ``data`` line by line (1-based numbers, blank lines skipped) and raise ``DataFormatError``
    on the first line with the wrong field count, a non-integer field or a negative value in a
    ``nonneg`` column. Returns None when every line is fine."""
    lines = data.split(b"\n")
    ends_nl = data.endswith(b"\n")
    if ends_nl:
        lines.pop()
    nonneg_idx = [columns.index(c) for c in nonneg]
    expect = f"{len(columns)} fields ({' '.join(columns)}) separated by {sep.decode()!r}"
    for i, raw in enumerate(tqdm(lines, desc=f"check {os.path.basename(name)}", disable=not progress, leave=False)):
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        last = i == len(lines) - 1
        fields = line.split(sep)
        if len(fields) != len(columns):
            raise _line_error(name, i + 1, f"expected {expect}, got {len(fields)} fields", line, last, ends_nl)
        for j, fld in enumerate(fields):
            if not _INT_RE.fullmatch(fld):
                raise _line_error(name, i + 1, f"field {columns[j]} is not an integer ({fld.decode('latin-1')!r})",
                                  line, last, ends_nl)
        for j in nonneg_idx:
            if int(fields[j]) < 0:
                raise _line_error(name, i + 1, f"negative {columns[j]} {int(fields[j])}", line, last, ends_nl)


def parse_int_table(
    data: bytes,
    name: str,
    sep: str,
    columns: Sequence[str],
    nonneg: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> Dict[str, np.ndarray]:
    """Parse headerless ``sep``-separated integer rows into int64 columns (each [E], file order).

    ``nonneg`` (default: all columns) must be >= 0. Errors name ``name`` and the 1-based line.
    """
    nonneg = tuple(columns if nonneg is None else nonneg)
    if not data.strip():
        raise DataFormatError(f"{name}: empty file (expected lines of {' '.join(columns)})")
    if not data.endswith(b"\n"):
        logger.warning("%s does not end with a newline: if it was cut inside the last field, that row is wrong", name)
    bsep = sep.encode()
    fast = data
    delim = sep
    if len(bsep) > 1:  # pyarrow wants one character; rewrite "::" etc. to a tab
        if b"\t" in data:
            scan_lines_for_error(data, name, bsep, columns, nonneg, progress)
        fast, delim = data.replace(bsep, b"\t"), "\t"
    try:
        table = pacsv.read_csv(
            io.BytesIO(fast),
            read_options=pacsv.ReadOptions(column_names=list(columns), block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delim, quote_char=False, escape_char=False,
                                             ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.int64() for c in columns}, strings_can_be_null=False,
                                                 null_values=[]),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        scan_lines_for_error(data, name, bsep, columns, nonneg, progress)
        raise DataFormatError(f"{name}: cannot parse as {sep!r}-separated integers: {e}") from e
    out = {c: table.column(c).to_numpy().astype(np.int64, copy=False) for c in columns}
    if any((out[c] < 0).any() for c in nonneg):
        scan_lines_for_error(data, name, bsep, columns, nonneg, progress)
    return out

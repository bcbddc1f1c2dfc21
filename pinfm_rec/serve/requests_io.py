"""Request-grouped Parquet for ``pinfm score``: one row per request, its history and candidates.

Input schema (``REQUEST_SCHEMA``; one row per request, any order):

    request_id    int64            your id of the request (echoed in the output)
    time          int64            request time, unix s (the candidates' "gap to now" feature)
    hist_item     list<int64>      history item ids (the fine-tuning data's ids: dense, or raw int64
                                   source ids when the run trained with data.raw_ids=true),
    hist_action   list<int64>        chronological, aligned; any length (the scorer keeps the last
    hist_surface  list<int64>        ``data.max_len`` events of the run's spec, as training did)
    hist_ts       list<int64>      event times, unix s
    cand_item     list<int64>      candidate item ids of the request (C_r of them, C_r >= 0)
    cand_dense    list<list<float32>>  [C_r][F] per-candidate dense features (F = the run's
                                   ``num_dense``; the column may be absent when F = 0)
    cand_label    list<int8>       optional: labels, carried into the output for offline metrics

Output (``write_scores``): one row per candidate, in input order: request_id int64, cand_index
int32 (position in the request's ``cand_item`` list), item_id int64, score float32 (the ranker's
probability, sigmoid of the logit), logit float32, and label int8 when the input had ``cand_label``.

``RequestFile.check_item_ids`` refuses ids the model cannot take (``pinfm score`` calls it with the
run's rule, ``model_io.Loaded.item_id_rule``): a DataError naming the file, column, row and id.
``write_request_file`` converts a split of a prepared ranking dir (``pinfm prepare-ranking``) into
this schema (raw ids with ``raw_ids=True``), so tests and benchmarks can make inputs. Batches are built by the training loader's
own code (``RankingBatchDataset`` in request order), so histories are cut exactly as in training.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pinfm_rec.data.ranking import RankingBatchDataset
from pinfm_rec.data.ranking_batch import RankingBatch
from pinfm_rec.data.ranking_store import (HISTORY_COLUMNS, SPLIT_IDS, RankingStore, RankingTables,
                                          load_ranking_store)
from pinfm_rec.errors import DataError

LIST_I64 = pa.list_(pa.int64())
REQUEST_SCHEMA = pa.schema([
    ("request_id", pa.int64()), ("time", pa.int64()),
    *[(c, LIST_I64) for c in HISTORY_COLUMNS],
    ("cand_item", LIST_I64), ("cand_dense", pa.list_(pa.list_(pa.float32()))), ("cand_label", pa.list_(pa.int8())),
])
REQUIRED = ("request_id", "time", *HISTORY_COLUMNS, "cand_item")


def _lists(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), pa.array(values, typ))


def write_request_file(ranking_dir: str, split: str, out_path: str, max_requests: Optional[int] = None,
                       raw_ids: bool = False) -> int:
    """Write requests of ``split`` (train | valid | test) of a prepared ranking dir as request-grouped
    Parquet (module doc; labels included), item ids raw (the dir's item map) when ``raw_ids``.
    Returns the number of requests written."""
    st = load_ranking_store(ranking_dir)
    rows = np.flatnonzero(st.tables.split == SPLIT_IDS[split])
    if max_requests is not None:
        rows = rows[:max_requests]
    t = st.tables.take(rows)
    if raw_ids:
        from dataclasses import replace

        from pinfm_rec.data.ranking import read_item_map

        raw = read_item_map(ranking_dir)
        t = replace(t, hist_item=raw[t.hist_item], cand_item=raw[t.cand_item])
    cidx = np.concatenate([np.arange(st.tables.cand_offsets[r], st.tables.cand_offsets[r + 1]) for r in rows]
                          ) if rows.size else np.zeros(0, np.int64)
    dense = st.dense[cidx.astype(np.int64)]  # [C, F]
    f = dense.shape[1]
    inner = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1), pa.float32()), f) if f else None
    cols = {"request_id": pa.array(rows.astype(np.int64)), "time": pa.array(t.time.astype(np.int64)),
            **{c: _lists(t.hist_offsets, getattr(t, c), pa.int64()) for c in HISTORY_COLUMNS},
            "cand_item": _lists(t.cand_offsets, t.cand_item, pa.int64())}
    if inner is not None:
        inner = inner.cast(pa.list_(pa.float32()))
        cols["cand_dense"] = pa.ListArray.from_arrays(pa.array(t.cand_offsets.astype(np.int32), pa.int32()), inner)
    cols["cand_label"] = _lists(t.cand_offsets, t.label.astype(np.int8), pa.int8())
    pq.write_table(pa.table(cols), out_path, compression="zstd")
    return int(rows.size)


def _jagged(table: pa.Table, col: str) -> Tuple[np.ndarray, np.ndarray]:
    arr = table.column(col).combine_chunks()
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.r_[0, np.cumsum(lengths)].astype(np.int64), pc.list_flatten(arr).to_numpy(zero_copy_only=False)


class RequestFile:
    """A request-grouped Parquet file in memory: ``batches(n, max_len)`` yields (RankingBatch of n
    requests, request ids [U]) in file order."""

    def __init__(self, path: str, num_dense: int) -> None:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such request file (Parquet, one row per request; "
                            f"pinfm_rec/serve/requests_io.py)")
        table = pq.read_table(path)
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; a request file has {list(REQUEST_SCHEMA.names)}")
        self.path, self.request_id = path, table.column("request_id").to_numpy().astype(np.int64)
        hist = {c: _jagged(table, c) for c in HISTORY_COLUMNS}
        h_off = hist["hist_item"][0]
        for c, (off, _) in hist.items():
            if not np.array_equal(off, h_off):
                raise DataError(f"{path}: column {c} has other list lengths than hist_item (row "
                                f"{int(np.flatnonzero(np.diff(off) != np.diff(h_off))[0])}); history lists are aligned")
        c_off, c_item = _jagged(table, "cand_item")
        n_c = int(c_off[-1])
        dense = np.zeros((n_c, num_dense), np.float32)
        if num_dense:
            if "cand_dense" not in table.column_names:
                raise DataError(f"{path}: no column cand_dense; the model takes {num_dense} dense features "
                                f"per candidate")
            d_off, flat = _jagged(table, "cand_dense")
            inner = pc.list_flatten(table.column("cand_dense").combine_chunks())
            sizes = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
            if not np.array_equal(d_off, c_off) or np.any(sizes != num_dense):
                raise DataError(f"{path}: cand_dense must hold {num_dense} floats for each candidate of cand_item")
            dense = pc.list_flatten(inner).to_numpy(zero_copy_only=False).astype(np.float32).reshape(n_c, num_dense)
        self.labels = None
        if "cand_label" in table.column_names:
            self.labels = _jagged(table, "cand_label")[1].astype(np.int8)
        r = self.request_id.size
        tables = RankingTables(
            user_id=np.zeros(r, np.int64), time=table.column("time").to_numpy().astype(np.int64), hist_offsets=h_off,
            **{c: v.astype(np.int64) for c, (_, v) in hist.items()}, cand_offsets=c_off,
            cand_item=c_item.astype(np.int64),
            label=self.labels if self.labels is not None else np.zeros(n_c, np.int8),
            split=np.full(r, SPLIT_IDS["test"], np.int8))
        self.store = RankingStore(path, None, tables, dense, np.zeros(n_c, bool))
        self.cand_offsets = c_off

    @property
    def num_requests(self) -> int:
        return int(self.request_id.size)

    def check_item_ids(self, upper: Optional[int], what: str) -> None:
        """DataError naming the file, column, row (0-based, of the file) and id for the first item id
        < 0 or >= ``upper`` (None: no upper bound) in hist_item / cand_item; ``what``: the ids the
        model takes, for the message."""
        t = self.store.tables
        for col, ids, off in (("hist_item", t.hist_item, t.hist_offsets), ("cand_item", t.cand_item, t.cand_offsets)):
            bad = ids < 0 if upper is None else (ids < 0) | (ids >= upper)
            if bad.any():
                pos = int(np.flatnonzero(bad)[0])
                row = int(np.searchsorted(off, pos, side="right") - 1)
                rng = "ids >= 0" if upper is None else f"ids in [0, {upper})"
                raise DataError(f"{self.path}: row {row} (request_id {int(self.request_id[row])}): {col} id "
                                f"{int(ids[pos])} is not one the model takes ({int(bad.sum())} such id(s) in "
                                f"{col}); it takes {what}: {rng}")

    def batches(self, requests_per_batch: int, max_len: int) -> Iterator[Tuple[RankingBatch, np.ndarray]]:
        """(batch, the file rows of its requests [U]) in file order; histories cut to the last
        ``max_len`` events (the training loader's code)."""
        if self.num_requests == 0:
            return
        ds = RankingBatchDataset(self.store, "test", batch_size=requests_per_batch, max_len=max_len, rank=0,
                                 world_size=1, seed=0)
        for step in range(len(ds)):
            b = ds[(0, step)]
            yield b, b.history.request_ids.numpy()


def write_scores(path: str, req: RequestFile, rows: np.ndarray, logits: np.ndarray) -> None:
    """One row per candidate of the file rows ``rows`` [U'] (in order), ``logits`` [C'] aligned."""
    off = req.cand_offsets
    n = off[rows + 1] - off[rows]
    cidx = np.concatenate([np.arange(off[r], off[r + 1]) for r in rows]) if rows.size else np.zeros(0, np.int64)
    cols = {"request_id": np.repeat(req.request_id[rows], n),
            "cand_index": (cidx - np.repeat(off[rows], n)).astype(np.int32),
            "item_id": req.store.tables.cand_item[cidx],
            "score": (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32),
            "logit": logits.astype(np.float32)}
    if req.labels is not None:
        cols["label"] = req.labels[cidx]
    pq.write_table(pa.table(cols), path)

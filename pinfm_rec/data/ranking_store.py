"""On-disk format of request-deduplicated ranking data: writer, reader, flat layout, storage report.

A prepared ranking directory (built by ``ranking.prepare_ranking``):

    requests.parquet    one row per request, sorted by request_id (= rank of (time, source order), so the
                        splits are contiguous id ranges): request_id int64, user_id int64 (the source's
                        user id), time int64 (unix s), split int8 (0 train, 1 valid, 2 test), and the
                        history stored ONCE per request as list columns hist_item, hist_action,
                        hist_surface, hist_ts (list<int64>, chronological, full length; the loader keeps
                        the last max_len).
    candidates.parquet  one row per candidate, sorted by request_id: request_id int64, item_id int64,
                        label int8, dense_0..dense_{F-1} float32 (``DENSE_FEATURES``), is_new bool.
    pretrain/           a normal prepared event dir (``schema.write_prepared``) in the SAME dense item-id
                        space (``num_items`` covers candidate-only items too), holding only events
                        strictly before the first valid request (checked when writing).
    ranking_meta.json   RankingMeta: sizes, vocab sizes, split cutoffs, per-split counts, provenance.

Dense features (F = 3, no look-ahead): log1p(number of pretraining-corpus events of the item strictly
before the request time; for valid/test requests that is the whole corpus, for train requests it excludes
the request's own and later events, so a train label never feeds its own feature), log1p(full history
length), log1p(#candidates of the request). ``is_new``: the item never occurs in the pretraining corpus
(the item's embedding row is untrained), whatever the request time.

Engagement counters (``engagement_counters=True``, F = 6, spec key ``data.engagement_counters``): per
candidate, the impressions and clicks of its item in every request strictly earlier than its own (all
splits: what a serving system's real-time counters hold when the request arrives; labels of the request
itself and of later ones never count), as log1p(impressions), log1p(clicks) and the CTR smoothed towards
the train split's click rate with ``CTR_PRIOR_WEIGHT`` impressions: fresh items (news) get a signal
that item ids cannot give them. Clicks are counted at their impression's time (a click logged after the
next request's arrival would leak a little in production; the sources here carry no click times).

Cold items (spec key ``data.cold_item_min_count`` = k > 0, computed at load time by
``train_impressions_before``, nothing stored): a candidate's item is "cold" at its request when it was
impressed fewer than k times in the candidate rows of strictly earlier TRAIN-split requests, the data the
model's id rows are trained on. For a train request that excludes its own and later impressions (no
look-ahead); for a valid/test request it is the whole train split (what a model trained on the train
split holds at serving time; valid/test impressions never train an id row, so they never make an item
warm). The loader marks cold candidates (``RankingBatch.cand_cold``) and the models withhold their id
signal (ranker: empty candidate-id bag; encoder: zeroed candidate item embedding).

Shapes: R requests, H history events over all requests (jagged by ``hist_offsets [R+1]``), C
candidates (jagged by ``cand_offsets [R+1]``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import ITEM_MAP_FILE, NUM_ACTIONS, DataFormatError, write_prepared
from .splits import gather_index

logger = logging.getLogger(__name__)

RANKING_SCHEMA_VERSION = 1
REQUESTS_FILE = "requests.parquet"
CANDIDATES_FILE = "candidates.parquet"
RANKING_META_FILE = "ranking_meta.json"
PRETRAIN_DIR = "pretrain"
SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}
DENSE_FEATURES = ("log1p_item_count_before_request", "log1p_history_len", "log1p_num_candidates")
# data.engagement_counters: real-time counters of the candidate's item over earlier requests
ENGAGEMENT_FEATURES = ("log1p_item_impressions_before_request", "log1p_item_clicks_before_request",
                       "item_ctr_before_request")
CTR_PRIOR_WEIGHT = 10.0  # impressions' worth of the train-split click rate in the smoothed CTR
HISTORY_COLUMNS = ("hist_item", "hist_action", "hist_surface", "hist_ts")
USER_COLUMNS = ("user_id", "time", "split") + HISTORY_COLUMNS  # request-level ("user-heavy") columns
PARQUET_OPTIONS = {"compression": "zstd", "row_group_size": 1 << 16}  # same for dedup and flat files


@dataclass
class RankingTables:
    """In-memory ranking data, one entry per request (R) plus jagged histories [H] and candidates [C]."""

    user_id: np.ndarray  # [R] int64
    time: np.ndarray  # [R] int64
    hist_offsets: np.ndarray  # [R+1] int64
    hist_item: np.ndarray  # [H] int64 dense item ids
    hist_action: np.ndarray  # [H] int64
    hist_surface: np.ndarray  # [H] int64
    hist_ts: np.ndarray  # [H] int64
    cand_offsets: np.ndarray  # [R+1] int64
    cand_item: np.ndarray  # [C] int64 dense item ids
    label: np.ndarray  # [C] int8 in {0, 1}
    split: Optional[np.ndarray] = None  # [R] int8

    @property
    def num_requests(self) -> int:
        return int(self.time.size)

    def take(self, rows: np.ndarray) -> "RankingTables":
        """Requests ``rows`` [R'] (any order), histories and candidates gathered along."""
        hs, he = self.hist_offsets[rows], self.hist_offsets[rows + 1]
        cs, ce = self.cand_offsets[rows], self.cand_offsets[rows + 1]
        hidx, cidx = gather_index(hs, he), gather_index(cs, ce)
        return RankingTables(
            user_id=self.user_id[rows], time=self.time[rows],
            hist_offsets=np.r_[0, np.cumsum(he - hs)].astype(np.int64),
            hist_item=self.hist_item[hidx], hist_action=self.hist_action[hidx], hist_surface=self.hist_surface[hidx],
            hist_ts=self.hist_ts[hidx], cand_offsets=np.r_[0, np.cumsum(ce - cs)].astype(np.int64),
            cand_item=self.cand_item[cidx], label=self.label[cidx],
            split=None if self.split is None else self.split[rows])


def time_cutoffs(time: np.ndarray, valid_frac: float, test_frac: float) -> Tuple[int, int]:
    """(t_valid, t_test): requests with time < t_valid are train, t_valid <= time < t_test valid, the rest
    test. Taken at the request-count quantiles 1 - valid - test and 1 - test; requests tied with a
    cutoff go to the later split, so every train time < t_valid <= every valid time < t_test <= test."""
    if not (0 <= valid_frac and 0 <= test_frac and valid_frac + test_frac < 1):
        raise ValueError(f"need 0 <= valid_frac, test_frac and valid_frac + test_frac < 1, "
                         f"got {valid_frac}, {test_frac}")
    ts = np.sort(time, kind="stable")
    n = ts.size
    n_test = int(round(test_frac * n))
    n_train = n - int(round(valid_frac * n)) - n_test
    big = np.iinfo(np.int64).max
    t_valid = int(ts[n_train]) if n_train < n else big
    t_test = int(ts[n - n_test]) if n_test > 0 else big
    return t_valid, max(t_valid, t_test)


def counts_before(item: np.ndarray, ts: np.ndarray, query_item: np.ndarray, query_time: np.ndarray,
                  num_items: int) -> np.ndarray:
    """[Q] number of events (item [E], ts [E] >= 0) with item == query_item[q] and ts < query_time[q]."""
    span = int(ts.max(initial=0)) + 2  # composite key item * span + time, exact while it fits in int64
    if num_items * span >= 1 << 62:
        raise ValueError(f"timestamps up to {span - 2} with {num_items} items overflow the composite key")
    keys = np.sort(item * span + ts)
    q = query_item * span
    return np.searchsorted(keys, q + np.clip(query_time, 0, span - 1)) - np.searchsorted(keys, q)


def engagement_counters(cand_item: np.ndarray, cand_time: np.ndarray, label: np.ndarray, split: np.ndarray,
                        num_items: int) -> np.ndarray:
    """[C, 3] float32 ``ENGAGEMENT_FEATURES`` of each candidate row (cand_item, cand_time = its request's
    time, label, split of its request; each [C]): impressions and clicks of the same item in candidate rows
    of strictly earlier requests, and the smoothed CTR (module doc)."""
    ts = np.maximum(cand_time.astype(np.int64), 0)
    imps = counts_before(cand_item, ts, cand_item, ts, num_items)
    clicked = label > 0
    clicks = counts_before(cand_item[clicked], ts[clicked], cand_item, ts, num_items)
    train = split == 0
    p0 = float(clicked[train].mean()) if train.any() else 0.0
    ctr = (clicks + CTR_PRIOR_WEIGHT * p0) / (imps + CTR_PRIOR_WEIGHT)
    return np.stack([np.log1p(imps), np.log1p(clicks), ctr], axis=1).astype(np.float32)


def train_impressions_before(cand_item: np.ndarray, cand_time: np.ndarray, split: np.ndarray,
                             num_items: int) -> np.ndarray:
    """[C] int64: impressions of each candidate row's item (cand_item, cand_time = its request's time,
    split of its request; each [C]) in candidate rows of strictly earlier train-split requests (module
    doc, "Cold items"). Every train time < every valid/test time, so a valid/test row counts the whole
    train split."""
    ts = np.maximum(cand_time.astype(np.int64), 0)
    train = split == 0
    return counts_before(cand_item[train], ts[train], cand_item, ts, num_items).astype(np.int64)


def cold_candidates(store: "RankingStore", min_count: int) -> np.ndarray:
    """[C] bool: candidate rows of ``store`` whose item had fewer than ``min_count`` earlier train-split
    impressions (``train_impressions_before``); all False when min_count == 0."""
    t = store.tables
    if min_count <= 0:
        return np.zeros(t.cand_item.size, dtype=bool)
    cached = store.cold_cache.get(min_count)
    if cached is None:
        req = np.repeat(np.arange(t.num_requests, dtype=np.int64), np.diff(t.cand_offsets))
        cached = store.cold_cache[min_count] = (
            train_impressions_before(t.cand_item, t.time[req], t.split[req], store.meta.num_items) < min_count)
    return cached


def split_of(time: np.ndarray, t_valid: int, t_test: int) -> np.ndarray:
    """[R] int8 split id of each request time (see ``time_cutoffs``)."""
    return ((time >= t_valid).astype(np.int8) + (time >= t_test).astype(np.int8)).astype(np.int8)


@dataclass
class RankingMeta:
    """Contents of ``ranking_meta.json``."""

    source: str
    num_items: int
    num_actions: int
    num_surfaces: int
    num_requests: Dict[str, int]
    num_candidates: Dict[str, int]
    new_item_fraction: Dict[str, float]  # fraction of candidates (per split) with is_new
    t_valid: int
    t_test: int
    pretrain_events: int
    dense_features: Tuple[str, ...] = DENSE_FEATURES
    schema_version: int = RANKING_SCHEMA_VERSION
    provenance: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str) -> "RankingMeta":
        path = os.path.join(root, RANKING_META_FILE)
        if not os.path.isfile(path):
            raise DataFormatError(f"{path}: missing; {root!r} is not a prepared ranking directory")
        with open(path) as f:
            raw = json.load(f)
        if raw.get("schema_version") != RANKING_SCHEMA_VERSION:
            raise DataFormatError(f"{path}: schema_version {raw.get('schema_version')}, this code reads "
                                  f"{RANKING_SCHEMA_VERSION}; re-prepare")
        raw["dense_features"] = tuple(raw["dense_features"])
        return cls(**raw)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """list<int64> array of jagged ``values`` [H] with ``offsets`` [R+1] (int32 list offsets: H < 2**31)."""
    if int(offsets[-1]) >= 1 << 31:
        raise ValueError(f"{int(offsets[-1])} list values exceed Parquet list<int64> int32 offsets; write in parts")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), pa.array(values, pa.int64()))


def write_ranking(out_dir: str, tables: RankingTables, *, pretrain: Dict[str, np.ndarray], num_items: int,
                  item_original: np.ndarray, t_valid: int, t_test: int, source: str,
                  provenance: Optional[dict] = None, engagement: bool = False) -> RankingMeta:
    """Write a prepared ranking dir (see module doc) from request-sorted ``tables`` (``split`` set) and the
    pretraining events ``pretrain`` (columns user_id, item_id, action, surface, timestamp, each [E], item ids
    already dense in [0, num_items)). ``item_original`` [num_items] = source id of each dense item id.
    engagement: add the ``ENGAGEMENT_FEATURES`` (module doc)."""
    t = tables
    if t.split is None or np.any(np.diff(t.time) < 0):
        raise ValueError("tables must be sorted by time and have split set")
    if pretrain["timestamp"].size and int(pretrain["timestamp"].max()) >= t_valid:
        raise ValueError(f"{source}: pretraining event at {int(pretrain['timestamp'].max())} >= first valid "
                         f"request time {t_valid} (leakage)")
    os.makedirs(out_dir, exist_ok=True)
    pre_dir = os.path.join(out_dir, PRETRAIN_DIR)
    # One action / surface vocabulary for histories and pretraining events, so an encoder pretrained on
    # pre_dir has exactly the rows the ranking batches need.
    num_actions = max(NUM_ACTIONS, int(max(t.hist_action.max(initial=0), pretrain["action"].max(initial=0))) + 1)
    num_surfaces = int(max(t.hist_surface.max(initial=0), pretrain["surface"].max(initial=0))) + 1
    pmeta = write_prepared(pre_dir, **pretrain, source=f"{source}-pretrain", num_items=num_items,
                           num_actions=num_actions, num_surfaces=num_surfaces,
                           provenance={"ranking_source": source, "before_time": t_valid, **(provenance or {})})
    pq.write_table(pa.table({"item_id": np.arange(num_items, dtype=np.int64),
                             "original_id": item_original.astype(np.int64)}), os.path.join(pre_dir, ITEM_MAP_FILE))
    counts = np.bincount(pretrain["item_id"], minlength=num_items)
    r, hist_len = t.num_requests, np.diff(t.hist_offsets)
    ncand = np.diff(t.cand_offsets)
    cand_req = np.repeat(np.arange(r, dtype=np.int64), ncand)
    seen = counts_before(pretrain["item_id"], pretrain["timestamp"], t.cand_item, t.time[cand_req], num_items)
    dense = np.stack([np.log1p(seen), np.log1p(hist_len[cand_req]), np.log1p(ncand[cand_req])],
                     axis=1).astype(np.float32)  # [C, F]
    if engagement:
        dense = np.concatenate([dense, engagement_counters(t.cand_item, t.time[cand_req], t.label, t.split[cand_req],
                                                           num_items)], axis=1)
    is_new = counts[t.cand_item] == 0
    req = pa.table({"request_id": np.arange(r, dtype=np.int64), "user_id": t.user_id.astype(np.int64),
                    "time": t.time.astype(np.int64), "split": pa.array(t.split, pa.int8()),
                    **{c: _list_array(t.hist_offsets, getattr(t, c)) for c in HISTORY_COLUMNS}})
    cand = pa.table({"request_id": cand_req, "item_id": t.cand_item.astype(np.int64),
                     "label": pa.array(t.label.astype(np.int8), pa.int8()),
                     **{f"dense_{j}": dense[:, j] for j in range(dense.shape[1])}, "is_new": is_new})
    pq.write_table(req, os.path.join(out_dir, REQUESTS_FILE), **PARQUET_OPTIONS)
    pq.write_table(cand, os.path.join(out_dir, CANDIDATES_FILE), **PARQUET_OPTIONS)
    cand_split = t.split[cand_req]
    meta = RankingMeta(
        source=source, num_items=int(num_items), num_actions=pmeta.num_actions, num_surfaces=pmeta.num_surfaces,
        num_requests={s: int((t.split == i).sum()) for s, i in SPLIT_IDS.items()},
        num_candidates={s: int((cand_split == i).sum()) for s, i in SPLIT_IDS.items()},
        new_item_fraction={s: float(is_new[cand_split == i].mean()) if (cand_split == i).any() else 0.0
                           for s, i in SPLIT_IDS.items()},
        t_valid=int(t_valid), t_test=int(t_test), pretrain_events=pmeta.num_events, provenance=provenance or {},
        dense_features=DENSE_FEATURES + (ENGAGEMENT_FEATURES if engagement else ()))
    with open(os.path.join(out_dir, RANKING_META_FILE), "w") as f:
        json.dump(asdict(meta), f, indent=2, sort_keys=True)
        f.write("\n")
    return meta


@dataclass
class RankingStore:
    """A prepared ranking dir held in memory (see ``RankingTables``) plus per-candidate features."""

    root: str
    meta: RankingMeta
    tables: RankingTables  # split set, request_id = position
    dense: np.ndarray  # [C, F] float32
    is_new: np.ndarray  # [C] bool
    # data.cold_item_min_count k -> [C] bool cold mask (``cold_candidates``), computed once per process
    cold_cache: Dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)


def _jagged(col: pa.ChunkedArray) -> Tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.r_[0, np.cumsum(lengths)].astype(np.int64), pc.list_flatten(arr).to_numpy().astype(np.int64)


def _check_item_ids(path: str, column: str, ids: np.ndarray, offsets: Optional[np.ndarray], num_items: int) -> None:
    """Stored item ids are dense rows of the item table: DataFormatError naming the file, row and column
    for the first id outside [0, num_items) (raw ids live in the corpus's item_map.parquet, not here).
    offsets [R+1]: ``ids`` is a list column (row = request), None: one id per row."""
    bad = (ids < 0) | (ids >= num_items)
    if not bad.any():
        return
    pos = int(np.flatnonzero(bad)[0])
    row = pos if offsets is None else int(np.searchsorted(offsets, pos, side="right") - 1)
    raise DataFormatError(f"{path}: row {row}: {column} {int(ids[pos])} outside the dense item ids [0, {num_items}) "
                          f"({int(bad.sum())} such id(s)); a prepared ranking dir stores dense ids and maps them "
                          f"to raw ids in {PRETRAIN_DIR}/{ITEM_MAP_FILE} (data.raw_ids=true emits those)")


@functools.lru_cache(maxsize=4)
def _load(root: str, mtime_ns: int) -> RankingStore:
    meta = RankingMeta.load(root)
    req = pq.read_table(os.path.join(root, REQUESTS_FILE))
    cand = pq.read_table(os.path.join(root, CANDIDATES_FILE))
    r = req.num_rows
    if not np.array_equal(req.column("request_id").to_numpy(), np.arange(r)):
        raise DataFormatError(f"{os.path.join(root, REQUESTS_FILE)}: request_id must be 0..{r - 1} in order")
    cand_req = cand.column("request_id").to_numpy()
    if cand_req.size and (np.any(np.diff(cand_req) < 0) or cand_req[0] < 0 or cand_req[-1] >= r):
        raise DataFormatError(f"{os.path.join(root, CANDIDATES_FILE)}: request_id not sorted or outside [0, {r})")
    hist = {c: _jagged(req.column(c)) for c in HISTORY_COLUMNS}
    offsets = hist["hist_item"][0]
    tables = RankingTables(
        user_id=req.column("user_id").to_numpy(), time=req.column("time").to_numpy(), hist_offsets=offsets,
        **{c: v for c, (_, v) in hist.items()},
        cand_offsets=np.r_[0, np.cumsum(np.bincount(cand_req, minlength=r))].astype(np.int64),
        cand_item=cand.column("item_id").to_numpy(), label=cand.column("label").to_numpy(),
        split=req.column("split").to_numpy())
    f = len(meta.dense_features)
    dense = np.stack([cand.column(f"dense_{j}").to_numpy() for j in range(f)], axis=1) if f else \
        np.zeros((cand.num_rows, 0), np.float32)
    is_new = cand.column("is_new").to_numpy(zero_copy_only=False)
    _check_item_ids(os.path.join(root, REQUESTS_FILE), "hist_item", tables.hist_item, offsets, meta.num_items)
    _check_item_ids(os.path.join(root, CANDIDATES_FILE), "item_id", tables.cand_item, None, meta.num_items)
    return RankingStore(root, meta, tables, dense.astype(np.float32), is_new)


def load_ranking_store(root: str) -> RankingStore:
    """Read a prepared ranking dir once per process (cached on path + mtime of requests.parquet)."""
    root = os.path.abspath(root)
    return _load(root, os.stat(os.path.join(root, REQUESTS_FILE)).st_mtime_ns)


def write_flat_layout(ranking_dir: str, out_path: str, chunk_requests: int = 4096,
                      shuffle_seed: Optional[int] = None) -> int:
    """Write the flat layout of ``ranking_dir``: one row per candidate with every request column (history
    lists included) repeated, same column types and ``PARQUET_OPTIONS``. Returns the file size in bytes.

    Rows are in request order (a request's candidates adjacent: the best case for the flat layout's
    compression) unless ``shuffle_seed`` is given: then rows are globally shuffled, as flat training
    tables usually are so that reading them is IID. Written in chunks (bounded memory)."""
    st = load_ranking_store(ranking_dir)
    t, f = st.tables, st.dense.shape[1]
    ncand_all = t.cand_offsets[1:] - t.cand_offsets[:-1]
    cand_req = np.repeat(np.arange(t.num_requests), ncand_all)  # [C] request of each candidate
    if shuffle_seed is None:
        order = np.arange(cand_req.size)
        bounds = [int(t.cand_offsets[min(lo, t.num_requests)]) for lo in range(0, t.num_requests, chunk_requests)]
    else:
        order = np.random.default_rng(shuffle_seed).permutation(cand_req.size)
        step = max(1, int(chunk_requests * max(1.0, cand_req.size / max(t.num_requests, 1))))
        bounds = list(range(0, cand_req.size, step))
    bounds.append(cand_req.size)
    writer: Optional[pq.ParquetWriter] = None
    try:
        for a, b in zip(bounds[:-1], bounds[1:]):
            cidx = order[a:b]
            req = cand_req[cidx]  # [C'] request of each flat row
            hs, he = t.hist_offsets[req], t.hist_offsets[req + 1]
            hidx = gather_index(hs, he)
            hoff = np.r_[0, np.cumsum(he - hs)]
            table = pa.table({
                "request_id": req, "user_id": t.user_id[req], "time": t.time[req],
                "split": pa.array(t.split[req], pa.int8()),
                **{c: _list_array(hoff, getattr(t, c)[hidx]) for c in HISTORY_COLUMNS},
                "item_id": t.cand_item[cidx], "label": pa.array(t.label[cidx].astype(np.int8), pa.int8()),
                **{f"dense_{j}": st.dense[cidx, j] for j in range(f)}, "is_new": st.is_new[cidx]})
            if writer is None:
                writer = pq.ParquetWriter(out_path, table.schema, compression=PARQUET_OPTIONS["compression"])
            writer.write_table(table, row_group_size=PARQUET_OPTIONS["row_group_size"])
    finally:
        if writer is not None:
            writer.close()
    return os.path.getsize(out_path)


def _column_bytes(path: str, compressed: bool = True) -> Dict[str, int]:
    """Compressed (or encoded but uncompressed) bytes per top-level column of a Parquet file."""
    md = pq.ParquetFile(path).metadata
    out: Dict[str, int] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + int(col.total_compressed_size if compressed else col.total_uncompressed_size)
    return out


def storage_report(ranking_dir: str, flat_path: Optional[str] = None) -> Dict[str, object]:
    """Bytes of the deduplicated layout (requests + candidates files) vs the flat layout, and ratio
    flat / dedup: whole files, the request-level ("user-heavy") columns ``USER_COLUMNS`` only (compressed
    column-chunk bytes), all columns before compression ("uncompressed": encoded page bytes), and against a
    flat file whose rows are shuffled ("shuffled_flat"). The request-ordered flat file is written to
    ``flat_path`` when given (kept), else to a temporary file (deleted)."""
    req_path, cand_path = (os.path.join(ranking_dir, n) for n in (REQUESTS_FILE, CANDIDATES_FILE))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(ranking_dir))) as tmp:
        path = flat_path or os.path.join(tmp, "flat.parquet")
        flat_bytes = write_flat_layout(ranking_dir, path)
        flat_cols = _column_bytes(path)
        flat_raw = sum(_column_bytes(path, compressed=False).values())
        shuf_path = os.path.join(tmp, "flat_shuffled.parquet")
        shuf_bytes = write_flat_layout(ranking_dir, shuf_path, shuffle_seed=0)
        shuf_cols = _column_bytes(shuf_path)
    req_bytes, cand_bytes = os.path.getsize(req_path), os.path.getsize(cand_path)
    req_cols = _column_bytes(req_path)
    dedup_raw = sum(sum(_column_bytes(p, compressed=False).values()) for p in (req_path, cand_path))
    user_dedup = sum(req_cols[c] for c in USER_COLUMNS)
    user_flat = sum(flat_cols[c] for c in USER_COLUMNS)
    t = load_ranking_store(ranking_dir).tables
    return {
        "num_requests": t.num_requests, "num_candidates": int(t.cand_item.size),
        "mean_candidates_per_request": float(t.cand_item.size / max(t.num_requests, 1)),
        "mean_history_len": float(t.hist_item.size / max(t.num_requests, 1)),
        "requests_bytes": req_bytes, "candidates_bytes": cand_bytes, "dedup_bytes": req_bytes + cand_bytes,
        "flat_bytes": flat_bytes, "ratio": flat_bytes / (req_bytes + cand_bytes),
        "uncompressed": {"dedup_bytes": dedup_raw, "flat_bytes": flat_raw, "ratio": flat_raw / max(dedup_raw, 1)},
        "user_columns": {"columns": list(USER_COLUMNS), "dedup_bytes": user_dedup, "flat_bytes": user_flat,
                         "ratio": user_flat / max(user_dedup, 1)},
        "shuffled_flat": {"flat_bytes": shuf_bytes, "ratio": shuf_bytes / (req_bytes + cand_bytes),
                          "user_columns_ratio": sum(shuf_cols[c] for c in USER_COLUMNS) / max(user_dedup, 1)},
    }


def sort_by_time(tables: RankingTables, t_valid: int, t_test: int) -> RankingTables:
    """Requests reordered by (time, current order) with ``split`` set: request_id = position."""
    order = np.argsort(tables.time, kind="stable")
    out = tables.take(order)
    return replace(out, split=split_of(out.time, t_valid, t_test))

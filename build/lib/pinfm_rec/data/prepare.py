"""Data spec sections and ``prepare_dataset``: any supported source -> a cached, validated prepared dir.

``prepare_dataset(spec)`` converts ``spec.source`` into
``<cache_dir>/<source>-<hash>/`` (hash of the content-affecting spec fields, the converter version
and the input file's size/mtime), unless that directory already exists. Building happens in a
private temp dir that is validated and then ``os.rename``d into place, so a crash or several ranks
racing never expose a half-written dir (a rank that loses the rename race discards its copy; each
racing rank does the conversion work once). ``source="prepared"`` uses ``path`` as is, validated.
Stale ``.tmp-*`` dirs left by a crash are never read and may be deleted.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, get_args

import numpy as np
import pyarrow.parquet as pq

from .convert import locate_input, resolve_data_path
from .convert_csv import ColumnMapping, convert_event_log
from .convert_movielens import convert_ml1m_raw, convert_ml1m_sasrec, convert_ml100k
from .convert_sasrec import convert_sasrec
from .schema import EVENTS_FILE, ITEM_MAP_FILE, META_FILE, DatasetMeta, read_event_columns, validate_prepared
from .splits import request_offsets, train_item_counts
from .synthetic import write_synthetic
from pinfm_rec.spec import bounds

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when a converter's output changes, to invalidate caches
Source = Literal["synthetic", "prepared", "sasrec", "ml-1m-sasrec", "ml-1m-raw", "ml-100k", "csv", "parquet"]
SOURCES = get_args(Source)
_INPUT_CANDIDATES = {
    "sasrec": [],  # a file: any SASRec-format `user item` file (convert_sasrec.py)
    "ml-1m-sasrec": ["ml-1m.txt", "sasrec/ml-1m.txt"],
    "ml-1m-raw": ["ratings.dat", "ml-1m/ratings.dat", "ml-1m.zip"],
    "ml-100k": ["u.data", "ml-100k/u.data", "ml-100k.zip"],
    "csv": ["events.csv"],
    "parquet": ["events.parquet"],
}


@dataclass
class SyntheticSpec:
    """Parameters of ``synthetic.generate_events`` (see its module doc)."""

    num_users: int = field(default=2000, metadata=bounds(ge=1))
    num_items: int = field(default=1000, metadata=bounds(ge=1))
    mean_len: int = field(default=60, metadata=bounds(ge=1))
    num_actions: int = field(default=4, metadata=bounds(ge=1))
    num_surfaces: int = field(default=4, metadata=bounds(ge=1))
    num_clusters: int = field(default=20, metadata=bounds(ge=1))
    zipf_a: float = field(default=1.1, metadata=bounds(gt=0))
    seed: int = field(default=0, metadata=bounds(ge=0))


@dataclass
class DataSpec:
    source: Source = "synthetic"
    path: str = ""  # input file or dir (prepared: the dir); relative -> $PINFM_DATA_DIR
    cache_dir: str = "runs/data_cache"
    max_len: int = field(default=200, metadata=bounds(ge=1))  # N: keep the last max_len tokens
    batch_size: int = field(default=128, metadata=bounds(ge=1))  # rows (requests) per rank per step
    eval_batch_size: int = field(default=256, metadata=bounds(ge=1))
    # sampled negatives added per row under key neg_item_id
    num_negatives_per_row: int = field(default=8, metadata=bounds(ge=0))
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    # users with fewer events are dropped (need train + valid + test)
    min_events: int = field(default=3, metadata=bounds(ge=1))
    # train on every max_len window of a long history (each next-token target once), not only the
    # last one (SASRec's protocol drops the rest: 35% of ML-1M's events)
    train_windows: bool = False
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    # batches carry the source's raw item ids (item_map.parquet original_id, any int64) instead of the
    # dense 0..N-1 remap: for embedding.id_mode=managed (or hash); eval ranks the catalogue of raw ids
    raw_ids: bool = False
    columns: ColumnMapping = field(default_factory=ColumnMapping)  # source = csv | parquet only


@dataclass
class DatasetInfo:
    """What the model and the loader need to know about a prepared dataset."""

    root: str
    num_users: int
    num_items: int
    num_actions: int
    num_surfaces: int
    num_events: int
    item_counts: np.ndarray  # [num_items] int64 counts in the TRAIN split (for logQ correction)
    item_raw_ids: Optional[np.ndarray] = None  # [num_items] raw id of each dense id (data.raw_ids)


@dataclass
class EventStore:
    """Event columns of a prepared dir held in memory (each [E] int64, request-sorted) plus the
    per-request offsets [U + 1]. The user_id column is not loaded (the loader does not need it)."""

    root: str
    meta: DatasetMeta
    item_id: np.ndarray
    action: np.ndarray
    surface: np.ndarray
    timestamp: np.ndarray
    offsets: np.ndarray


@functools.lru_cache(maxsize=4)
def _load_store(root: str, mtime_ns: int) -> EventStore:
    meta = DatasetMeta.load(root)
    cols = read_event_columns(root, ("request_id", "item_id", "action", "surface", "timestamp"))
    offsets = request_offsets(cols["request_id"], meta.num_requests)
    return EventStore(root, meta, cols["item_id"], cols["action"], cols["surface"], cols["timestamp"], offsets)


def load_event_store(root: str) -> EventStore:
    """Read a prepared dir once per process (cached on path + mtime; shared by train/valid/test)."""
    root = os.path.abspath(root)
    return _load_store(root, os.stat(os.path.join(root, EVENTS_FILE)).st_mtime_ns)


def _cache_key(spec: DataSpec) -> dict:
    key = {"converter_version": CONVERTER_VERSION, "source": spec.source, "min_events": spec.min_events}
    if spec.source == "synthetic":
        key["synthetic"] = asdict(spec.synthetic)
    else:
        src = locate_input(spec.path, _INPUT_CANDIDATES[spec.source])
        st = os.stat(src)
        key.update(input=src, input_size=int(st.st_size), input_mtime_ns=int(st.st_mtime_ns))
        if spec.source in ("csv", "parquet"):
            key["columns"] = asdict(spec.columns)
    return key


def _convert(spec: DataSpec, out_dir: str, progress: bool) -> DatasetMeta:
    s, kw = spec.source, {"min_events": spec.min_events}
    if s == "synthetic":
        return write_synthetic(out_dir, **asdict(spec.synthetic), **kw)
    if s == "sasrec":
        return convert_sasrec(spec.path, out_dir, progress=progress, **kw)
    if s == "ml-1m-sasrec":
        return convert_ml1m_sasrec(spec.path, out_dir, progress=progress, **kw)
    if s == "ml-1m-raw":
        return convert_ml1m_raw(spec.path, out_dir, progress=progress, **kw)
    if s == "ml-100k":
        return convert_ml100k(spec.path, out_dir, progress=progress, **kw)
    return convert_event_log(spec.path, out_dir, mapping=spec.columns, fmt=s, source=s, progress=progress, **kw)


def prepared_dir(spec: DataSpec) -> str:
    """Where ``prepare_dataset`` puts (or finds) the prepared dir of ``spec``."""
    if spec.source == "prepared":
        return resolve_data_path(spec.path)
    if spec.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {spec.source!r}")
    if spec.source != "synthetic" and not spec.path:
        raise ValueError(f"data.source={spec.source!r} needs data.path")
    digest = hashlib.sha256(json.dumps(_cache_key(spec), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.abspath(os.path.join(spec.cache_dir, f"{spec.source}-{digest}"))


def prepare_dataset(spec: DataSpec) -> DatasetInfo:
    """Convert (if needed), validate, load and summarise the dataset of ``spec``. Idempotent.

    ``item_counts`` counts items over the train rows the loader emits (depends on ``max_len`` and
    ``min_events``), computed on each call (cheap) rather than cached.
    """
    root = prepared_dir(spec)
    if spec.source == "prepared":
        validate_prepared(root)
    elif not os.path.isfile(os.path.join(root, META_FILE)):
        progress = os.environ.get("RANK", "0") == "0"
        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(root)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _convert(spec, tmp, progress)
            validate_prepared(tmp)
            with open(os.path.join(tmp, "spec.json"), "w") as f:
                json.dump(_cache_key(spec), f, indent=2, sort_keys=True)
            try:
                os.rename(tmp, root)
                logger.info("prepared dataset %s", root)
            except OSError:
                if not os.path.isfile(os.path.join(root, META_FILE)):
                    raise
                logger.info("%s was prepared concurrently by another process; using it", root)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        logger.info("using cached prepared dataset %s", root)
    store = load_event_store(root)
    meta = store.meta
    counts = train_item_counts(store.item_id, store.offsets, meta.num_items, spec.max_len, spec.min_events,
                               spec.train_windows)
    raw = None
    if spec.raw_ids:
        path = os.path.join(root, meta.files.get("item_map", ITEM_MAP_FILE))
        raw = pq.read_table(path, columns=["original_id"]).column("original_id").to_numpy().astype(np.int64)
    return DatasetInfo(root=root, num_users=meta.num_users, num_items=meta.num_items, num_actions=meta.num_actions,
                       num_surfaces=meta.num_surfaces, num_events=meta.num_events, item_counts=counts,
                       item_raw_ids=raw)

"""Request-deduplicated ranking data: spec, ``prepare_ranking`` (cached) and the ``RankingBatch`` loader.

    info = prepare_ranking(spec)                            # RankingDataSpec -> RankingInfo
    loader = build_ranking_loader(spec, info, "train", rank=r, world_size=w, seed=s)
    for epoch in range(E):
        loader.set_epoch(epoch)
        for batch in loader: ...                            # RankingBatch (ranking_batch.py)
    # pretraining on the same item ids:  pinfm pretrain data.source=prepared data.path=<info.pretrain_dir>

Sources: ``synthetic`` (ranking_synthetic.py), ``mind`` (convert_mind.py: behaviors.tsv),
``movielens`` (ranking_movielens.py: ML-100K u.data / ML-1M ratings.dat). On-disk format, features and
the flat-layout comparison: ranking_store.py. Splits are by request time (valid/test = the latest
``valid_frac`` / ``test_frac`` of requests); the pretraining corpus holds only pre-valid events.

Loader (same design as loader.py: a batch is a pure function of (seed, epoch, step, rank, world_size);
``state_dict`` / ``load_state_dict`` resume mid-epoch). A batch holds ``batch_size`` (train) or
``eval_batch_size`` requests of this rank, each history once (last ``max_len`` events) and all its
candidates. Train: requests permuted per epoch with ``default_rng([seed, epoch])``, cut to a multiple of
world_size (at most world_size - 1 dropped per epoch) and dealt round-robin; weights 1. Valid / test:
request order, padded (repeating requests from the start, weight 0) to a multiple of world_size and cut
into contiguous per-rank blocks, so every request appears exactly once with weight 1 over all ranks.
Every rank has the same number of batches with the same numbers of requests (candidate counts vary).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, Literal, Optional, Tuple, get_args

import numpy as np
import torch
from torch.utils.data import Dataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .batch import SEQUENCE_KEYS, SequenceBatch
from .convert import locate_input
from .convert_mind import MIND_INPUTS, convert_mind
from .loader import EpochBatchSampler, SequenceDataLoader, _identity
from .ranking_batch import RankingBatch, flatten_batch  # flatten_batch re-exported: flat layout of a batch
from .ranking_movielens import MOVIELENS_INPUTS, convert_movielens_ranking
from .ranking_store import (PRETRAIN_DIR, RANKING_META_FILE, SPLIT_IDS, RankingStore, cold_candidates,
                            load_ranking_store, storage_report, write_flat_layout)
from .ranking_synthetic import write_synthetic_ranking
from .schema import DataFormatError, DatasetMeta
from .splits import gather_index
from pinfm_rec.spec import FieldError, bounds

logger = logging.getLogger(__name__)

RANKING_CONVERTER_VERSION = 1  # bump when a converter's output changes, to invalidate caches
RankingSource = Literal["synthetic", "mind", "movielens"]
RANKING_SOURCES = get_args(RankingSource)
__all__ = ["MovieLensRankingSpec", "RankingDataSpec", "RankingInfo", "SyntheticRankingSpec", "build_ranking_loader",
           "flatten_batch", "prepare_ranking", "ranking_dir", "storage_report", "write_flat_layout"]


@dataclass
class MovieLensRankingSpec:
    """Requests cut from MovieLens rating timelines (ranking_movielens.py)."""

    # next rated items used as candidates (label: rating >= 4)
    candidates_next: int = field(default=5, metadata=bounds(ge=0))
    # sampled items the user never rated (label 0)
    negatives_per_request: int = field(default=20, metadata=bounds(ge=0))
    # cut points per user, evenly spaced over the timeline
    requests_per_user: int = field(default=4, metadata=bounds(ge=1))
    min_history: int = field(default=1, metadata=bounds(ge=0))  # events before the first cut point
    seed: int = field(default=0, metadata=bounds(ge=0))


@dataclass
class SyntheticRankingSpec:
    """Synthetic requests (ranking_synthetic.py); candidates per request = candidates_next + negatives."""

    num_requests: int = field(default=2000, metadata=bounds(ge=1))
    num_items: int = field(default=1000, metadata=bounds(ge=1))
    mean_len: int = field(default=40, metadata=bounds(ge=1))
    requests_per_user: int = field(default=4, metadata=bounds(ge=1))
    candidates_next: int = field(default=5, metadata=bounds(ge=0))
    negatives_per_request: int = field(default=15, metadata=bounds(ge=0))
    seed: int = field(default=0, metadata=bounds(ge=0))
    # > 0: item k's source id is raw_id_offset + k * 7919 (sparse int64 ids, e.g. 2**40), stored in the
    # item map; data.raw_ids=true feeds them to the model (ranking_synthetic.raw_item_ids)
    raw_id_offset: int = field(default=0, metadata=bounds(ge=0))


@dataclass
class RankingDataSpec:
    source: RankingSource = "synthetic"
    path: str = ""  # input file or dir; relative -> $PINFM_DATA_DIR
    cache_dir: str = "runs/data_cache"
    max_len: int = field(default=200, metadata=bounds(ge=1))  # N: keep the last max_len events
    batch_size: int = field(default=64, metadata=bounds(ge=1))  # requests per rank per train step
    eval_batch_size: int = field(default=256, metadata=bounds(ge=1))  # requests per rank per eval step
    # latest requests by time, before test
    valid_frac: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    test_frac: float = field(default=0.1, metadata=bounds(ge=0, lt=1))  # latest requests by time
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    # batches carry the source's raw int64 item ids (the pretraining corpus's item_map.parquet
    # original_id) in histories and candidates instead of the dense remap; needs an encoder with
    # model.embedding.id_mode managed or hash; the ranker's own item tables hash them
    raw_ids: bool = False
    # three more dense features per candidate: impressions, clicks and smoothed CTR of its item in
    # strictly earlier requests (real-time counters; ranking_store.engagement_counters); impression
    # logs only (mind): a label must be observed at its request's time
    engagement_counters: bool = False
    # k > 0: a candidate whose item had fewer than k impressions in strictly earlier train-split requests
    # (valid/test: in the whole train split, what the model trained on) is "cold": the loader marks it
    # (RankingBatch.cand_cold) and the ranker's candidate-id bag is empty, the encoder's candidate item
    # embedding zero (ranking_store.train_impressions_before; computed at load, no re-prepare). 0 = off
    cold_item_min_count: int = field(default=0, metadata=bounds(ge=0))
    movielens: MovieLensRankingSpec = field(default_factory=MovieLensRankingSpec)
    synthetic: SyntheticRankingSpec = field(default_factory=SyntheticRankingSpec)

    def __post_init__(self) -> None:
        if self.engagement_counters and self.source != "mind":
            raise FieldError("engagement_counters", f"needs an impression log (data.source=mind), not "
                                                    f"{self.source!r}: a timeline source's labels are the user's "
                                                    f"next events, and counted at the request time they would "
                                                    f"reach the user's later requests before they happen")
        if self.valid_frac + self.test_frac >= 1:
            raise FieldError("test_frac", f"{self.test_frac} + valid_frac {self.valid_frac} must be < 1 "
                                          f"(the rest is the train split)")


@dataclass
class RankingInfo:
    """What the model and the loader need to know about a prepared ranking dir."""

    root: str
    num_items: int  # embedding rows: every item of the source, candidate-only items included
    num_actions: int
    num_surfaces: int
    num_dense: int  # F
    pretrain_dir: str  # prepared event dir (same item ids) for `pinfm pretrain data.source=prepared`
    num_requests: Dict[str, int]  # per split
    num_candidates: Dict[str, int]
    new_item_fraction: Dict[str, float]  # fraction of candidates whose item is not in pretrain_dir
    dense_features: Tuple[str, ...] = ()
    t_valid: int = 0  # first valid request time (every pretraining event is earlier)
    t_test: int = 0
    item_raw_ids: Optional[np.ndarray] = None  # [num_items] raw id of each dense id (data.raw_ids)


def _cache_key(spec: RankingDataSpec) -> dict:
    key: dict = {"converter_version": RANKING_CONVERTER_VERSION, "source": spec.source,
                 "valid_frac": spec.valid_frac, "test_frac": spec.test_frac}
    if spec.engagement_counters:  # caches prepared before the option keep their key
        key["engagement_counters"] = True
    if spec.source == "synthetic":
        key["synthetic"] = asdict(spec.synthetic)
        if not spec.synthetic.raw_id_offset:  # caches prepared before the option keep their key
            del key["synthetic"]["raw_id_offset"]
        return key
    src = locate_input(spec.path, MIND_INPUTS if spec.source == "mind" else MOVIELENS_INPUTS)
    st = os.stat(src)
    key.update(input=src, input_size=int(st.st_size), input_mtime_ns=int(st.st_mtime_ns))
    if spec.source == "movielens":
        key["movielens"] = asdict(spec.movielens)
    return key


def ranking_dir(spec: RankingDataSpec) -> str:
    """Where ``prepare_ranking`` puts (or finds) the prepared ranking dir of ``spec``."""
    if spec.source not in RANKING_SOURCES:
        raise ValueError(f"data.source must be one of {RANKING_SOURCES}, got {spec.source!r}")
    if spec.source != "synthetic" and not spec.path:
        raise ValueError(f"data.source={spec.source!r} needs data.path")
    digest = hashlib.sha256(json.dumps(_cache_key(spec), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.abspath(os.path.join(spec.cache_dir, f"ranking-{spec.source}-{digest}"))


def _convert(spec: RankingDataSpec, out_dir: str, progress: bool) -> None:
    kw = {"valid_frac": spec.valid_frac, "test_frac": spec.test_frac, "progress": progress,
          "engagement": spec.engagement_counters}
    if spec.source == "synthetic":
        write_synthetic_ranking(out_dir, **asdict(spec.synthetic), **kw)
    elif spec.source == "mind":
        convert_mind(spec.path, out_dir, **kw)
    else:
        convert_movielens_ranking(spec.path, out_dir, **asdict(spec.movielens), **kw)


def prepare_ranking(spec: RankingDataSpec) -> RankingInfo:
    """Convert (if not cached), load and summarise the ranking data of ``spec``. Idempotent; built in a
    private temp dir renamed into place (crash- and race-safe, as ``prepare.prepare_dataset``)."""
    root = ranking_dir(spec)
    if not os.path.isfile(os.path.join(root, RANKING_META_FILE)):
        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{os.path.basename(root)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _convert(spec, tmp, progress=os.environ.get("RANK", "0") == "0")
            DatasetMeta.load(os.path.join(tmp, PRETRAIN_DIR))
            with open(os.path.join(tmp, "spec.json"), "w") as f:
                json.dump(_cache_key(spec), f, indent=2, sort_keys=True)
            try:
                os.rename(tmp, root)
                logger.info("prepared ranking data %s", root)
            except OSError:
                if not os.path.isfile(os.path.join(root, RANKING_META_FILE)):
                    raise
                logger.info("%s was prepared concurrently by another process; using it", root)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    else:
        logger.info("using cached ranking data %s", root)
    m = load_ranking_store(root).meta
    raw = read_item_map(root) if spec.raw_ids else None
    return RankingInfo(root=root, num_items=m.num_items, num_actions=m.num_actions, num_surfaces=m.num_surfaces,
                       num_dense=len(m.dense_features), pretrain_dir=os.path.join(root, PRETRAIN_DIR),
                       num_requests={s: m.num_requests[s] for s in SPLIT_IDS},
                       num_candidates={s: m.num_candidates[s] for s in SPLIT_IDS},
                       new_item_fraction={s: m.new_item_fraction[s] for s in SPLIT_IDS},
                       dense_features=tuple(m.dense_features),
                       t_valid=m.t_valid, t_test=m.t_test, item_raw_ids=raw)


def read_item_map(root: str) -> np.ndarray:
    """[num_items] int64 raw (source) id of each dense item id of a prepared ranking dir (its pretraining
    corpus's item_map.parquet); DataFormatError naming the file if it is missing, short or negative."""
    import pyarrow.parquet as pq

    from .schema import ITEM_MAP_FILE

    path = os.path.join(root, PRETRAIN_DIR, ITEM_MAP_FILE)
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: missing; data.raw_ids=true reads the raw item ids from it")
    t = pq.read_table(path, columns=["item_id", "original_id"])
    dense, raw = (t.column(c).to_numpy().astype(np.int64) for c in ("item_id", "original_id"))
    n = load_ranking_store(root).meta.num_items
    if not np.array_equal(dense, np.arange(n)):
        raise DataFormatError(f"{path}: item_id must be 0..{n - 1} in order (got {dense.size} rows)")
    if raw.size and int(raw.min()) < 0:
        row = int(np.flatnonzero(raw < 0)[0])
        raise DataFormatError(f"{path}: row {row}: original_id {int(raw[row])} < 0; raw item ids are int64 >= 0")
    if np.unique(raw).size != raw.size:
        raise DataFormatError(f"{path}: original_id has duplicates; each raw id names one item")
    return raw


class RankingBatchDataset(Dataset):
    """Map-style dataset whose item ``(epoch, step)`` is this rank's ``RankingBatch`` number ``step``."""

    def __init__(self, store: RankingStore, split: str, *, batch_size: int, max_len: int, rank: int,
                 world_size: int, seed: int, item_ids: Optional[np.ndarray] = None,
                 cold_item_min_count: int = 0) -> None:
        """item_ids: [num_items] the id each stored (dense) item id is emitted as (raw ids, data.raw_ids);
        None emits the stored ids. cold_item_min_count: k > 0 sets ``RankingBatch.cand_cold``
        (``ranking_store.cold_candidates``); 0 leaves it None."""
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        self.store, self.split, self.train = store, split, split == "train"
        self.requests = np.flatnonzero(store.tables.split == SPLIT_IDS[split]).astype(np.int64)  # [R]
        self.batch_size, self.max_len = batch_size, max_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.item_ids = item_ids
        self.cold = cold_candidates(store, cold_item_min_count) if cold_item_min_count > 0 else None  # [C_all]
        r = self.requests.size
        self.per_rank = r // world_size if self.train else math.ceil(r / world_size)
        if self.per_rank == 0:
            raise ValueError(f"{split}: {r} requests cannot give every one of {world_size} ranks a request")
        self.num_batches = math.ceil(self.per_rank / batch_size)
        self._plan: Optional[Tuple[int, np.ndarray, np.ndarray]] = None

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(request ids [per_rank], weights [per_rank]) of this rank in ``epoch``."""
        if self._plan is None or self._plan[0] != epoch:
            r, w, k = self.requests.size, self.world_size, self.per_rank
            if self.train:
                pos, weight = np.random.default_rng([self.seed, epoch]).permutation(r)[: k * w][self.rank::w], \
                    np.ones(k, np.float32)
            else:
                pos = (np.arange(k * w) % r)[self.rank * k:(self.rank + 1) * k]
                weight = (np.arange(self.rank * k, (self.rank + 1) * k) < r).astype(np.float32)
            self._plan = (epoch, self.requests[pos], weight)
        return self._plan[1], self._plan[2]

    def __getitem__(self, key: Tuple[int, int]) -> RankingBatch:
        epoch, step = key
        if not 0 <= step < self.num_batches:
            raise IndexError(f"step {step} not in [0, {self.num_batches})")
        reqs, weight = self.plan(epoch)
        sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
        reqs, weight = reqs[sl], weight[sl]  # [U], [U]
        t = self.store.tables
        he = t.hist_offsets[reqs + 1]
        hs = np.maximum(t.hist_offsets[reqs], he - self.max_len)
        lengths = he - hs  # [U]
        hidx = gather_index(hs, he)  # [L]
        cs, ce = t.cand_offsets[reqs], t.cand_offsets[reqs + 1]
        cidx = gather_index(cs, ce)  # [C]
        ncand = ce - cs  # [U]
        hist_item, cand_item = t.hist_item[hidx], t.cand_item[cidx]
        if self.item_ids is not None:  # dense -> raw ids
            hist_item, cand_item = self.item_ids[hist_item], self.item_ids[cand_item]
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=list(SEQUENCE_KEYS),
            values=torch.from_numpy(np.concatenate([hist_item, t.hist_action[hidx], t.hist_surface[hidx]])),
            lengths=torch.from_numpy(np.tile(lengths, len(SEQUENCE_KEYS))))
        history = SequenceBatch(
            features=features, timestamps=torch.from_numpy(t.hist_ts[hidx]), request_ids=torch.from_numpy(reqs),
            max_len=int(lengths.max(initial=0)), target_timestamp=torch.from_numpy(t.time[reqs]),
            weights=torch.from_numpy(weight))
        return RankingBatch(
            history=history, cand_item=torch.from_numpy(cand_item),
            cand_offsets=torch.from_numpy(np.r_[0, np.cumsum(ncand)].astype(np.int64)),
            labels=torch.from_numpy(t.label[cidx].astype(np.float32)),
            dense=torch.from_numpy(np.ascontiguousarray(self.store.dense[cidx])),
            cand_new=torch.from_numpy(self.store.is_new[cidx]), weights=torch.from_numpy(np.repeat(weight, ncand)),
            max_cands=int(ncand.max(initial=0)),
            cand_cold=None if self.cold is None else torch.from_numpy(self.cold[cidx]))


def build_ranking_loader(spec: RankingDataSpec, info: RankingInfo, split: str, *, rank: int = 0, world_size: int = 1,
                         seed: int = 0) -> SequenceDataLoader:
    """Loader of ``split`` (train | valid | test) ``RankingBatch``es for ``rank`` of ``world_size`` (module doc).

    Yields on CPU: history SequenceBatch [U rows] (KJT item_id/action/surface, timestamps [L], request_ids
    [U], target_timestamp [U] = request time, weights [U]); cand_item [C], cand_offsets [U+1], labels [C],
    dense [C, F], cand_new [C], weights [C], cand_cold [C] bool (data.cold_item_min_count > 0, else None). Same resumable ``SequenceDataLoader`` as ``build_loader``.
    """
    dataset = RankingBatchDataset(
        load_ranking_store(info.root), split, batch_size=spec.batch_size if split == "train" else spec.eval_batch_size,
        max_len=spec.max_len, rank=rank, world_size=world_size, seed=seed,
        item_ids=info.item_raw_ids if spec.raw_ids else None, cold_item_min_count=spec.cold_item_min_count)
    return SequenceDataLoader(dataset, batch_size=None, sampler=EpochBatchSampler(len(dataset)), collate_fn=_identity,
                              num_workers=spec.num_workers, persistent_workers=spec.num_workers > 0)

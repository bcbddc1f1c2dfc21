"""Deterministic, resumable, rank-sharded loaders of ``SequenceBatch`` over a prepared dataset.

Design: the event columns are read once per process (``prepare.load_event_store``) and a split is
a set of event ranges (``splits.leave_one_out``). A stateful sampler yields batch keys
``(epoch, step)``; the map-style dataset turns a key into a whole ``SequenceBatch`` of this rank
(vectorised gather + ``KeyedJaggedTensor.from_lengths_sync``), so every batch is a pure function of
(seed, epoch, step, rank, world_size) and resuming only needs (epoch, next step).

Train (``split="train"``): one row per request (history e[:-2], last N events), or with
``train_windows`` several rows per long request (``splits`` module doc). Each epoch the R
rows are permuted with ``np.random.default_rng([seed, epoch])``; the permutation is cut to a
multiple of ``world_size`` (at most world_size - 1 rows dropped per epoch, different ones each
epoch) and dealt round-robin, so every rank has exactly ``R // world_size`` rows and the same
number of batches, with the same batch sizes (only the last batch of an epoch may be smaller).
Each row gets ``num_negatives_per_row`` item ids drawn uniformly from [0, num_items) (no rejection
of positives: the model should mask collisions) with ``default_rng([seed, epoch, step *
world_size + rank, 1])``. Call ``loader.set_epoch(epoch)`` before each epoch, as with
``DistributedSampler``; without it every pass repeats the same permutation.

Eval (``valid`` / ``test``): rows in request order, every request exactly once over all ranks: the
R rows are padded (repeating rows from the start, weight 0) to ``world_size * ceil(R /
world_size)`` and split into contiguous per-rank blocks; batches carry ``target_item``,
``target_timestamp`` and ``weights`` (1 real, 0 padding). Requests whose eval history would be
empty (only with min_events < 3) are dropped and counted in a log line.

Resume: ``state = loader.state_dict()`` mid-epoch (it holds the epoch and the next step), then
``new_loader.load_state_dict(state)``: iterating ``new_loader`` yields exactly the batches that
would have come next, for ``num_workers`` = 0 or > 0.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .batch import NEG_ITEM_KEY, SEQUENCE_KEYS, SequenceBatch
from .prepare import DatasetInfo, DataSpec, EventStore, load_event_store
from .splits import SPLITS, SplitRows, gather_index, leave_one_out

logger = logging.getLogger(__name__)

BatchKey = Tuple[int, int]  # (epoch, step)


class SequenceBatchDataset(Dataset):
    """Map-style dataset whose item ``(epoch, step)`` is this rank's ``SequenceBatch`` number ``step``."""

    def __init__(self, store: EventStore, rows: SplitRows, *, batch_size: int, num_items: int,
                 num_negatives: int, rank: int, world_size: int, seed: int,
                 item_ids: Optional[np.ndarray] = None) -> None:
        """item_ids: [num_items] the id each dense item id is emitted as (raw ids, data.raw_ids); None
        emits the dense ids."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store, self.rows = store, rows
        self.train = rows.split == "train"
        self.batch_size, self.num_items, self.num_negatives = batch_size, num_items, num_negatives
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.item_ids = item_ids
        r = len(rows)
        self.rows_per_rank = r // world_size if self.train else math.ceil(r / world_size)
        if self.rows_per_rank == 0:
            raise ValueError(f"{rows.split}: {r} rows cannot give every one of {world_size} ranks a row")
        self.num_batches = math.ceil(self.rows_per_rank / batch_size)
        self._plan_epoch: Optional[int] = None
        self._plan: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def __len__(self) -> int:
        return self.num_batches

    def plan(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """(row positions [rows_per_rank] into ``self.rows``, weights [rows_per_rank]) of this rank."""
        if self._plan_epoch != epoch or self._plan is None:
            r, w, k = len(self.rows), self.world_size, self.rows_per_rank
            if self.train:
                perm = np.random.default_rng([self.seed, epoch]).permutation(r)[: k * w]
                pos, weight = perm[self.rank::w], np.ones(k, np.float32)
            else:
                padded = np.arange(k * w) % r
                pos = padded[self.rank * k:(self.rank + 1) * k]
                weight = (np.arange(self.rank * k, (self.rank + 1) * k) < r).astype(np.float32)
            self._plan_epoch, self._plan = epoch, (pos.astype(np.int64), weight)
        return self._plan

    def __getitem__(self, key: BatchKey) -> SequenceBatch:
        epoch, step = key
        if not 0 <= step < self.num_batches:
            raise IndexError(f"step {step} not in [0, {self.num_batches})")
        pos, weight = self.plan(epoch)
        sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
        pos, weight = pos[sl], weight[sl]
        rows, st = self.rows, self.store
        start, end = rows.start[pos], rows.end[pos]
        lengths = end - start  # [B]
        idx = gather_index(start, end)  # [L]
        b = int(pos.size)
        emit = (lambda x: x) if self.item_ids is None else (lambda x: self.item_ids[x])  # noqa: E731
        values = [emit(st.item_id[idx]), st.action[idx], st.surface[idx]]
        all_lengths = [lengths] * len(SEQUENCE_KEYS)
        keys = list(SEQUENCE_KEYS)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, step * self.world_size + self.rank, 1])
            values.append(emit(rng.integers(0, self.num_items, size=b * self.num_negatives, dtype=np.int64)))
            all_lengths.append(np.full(b, self.num_negatives, np.int64))
            keys.append(NEG_ITEM_KEY)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(all_lengths).astype(np.int64, copy=False)),
        )
        batch = SequenceBatch(
            features=features,
            timestamps=torch.from_numpy(st.timestamp[idx]),
            request_ids=torch.from_numpy(rows.request_id[pos]),
            max_len=int(lengths.max()),
        )
        if not self.train:
            tgt = rows.target[pos]
            batch.target_item = torch.from_numpy(emit(st.item_id[tgt]))
            batch.target_timestamp = torch.from_numpy(st.timestamp[tgt])
            batch.weights = torch.from_numpy(weight)
        return batch


class _EpochStepIterator(Iterator[BatchKey]):
    """Yields (epoch, step) for step = next_step .. num_batches - 1. Stateful (torchdata protocol)."""

    def __init__(self, epoch: int, num_batches: int) -> None:
        self.epoch, self.num_batches, self.next_step = epoch, num_batches, 0

    def __iter__(self) -> "_EpochStepIterator":
        return self

    def __next__(self) -> BatchKey:
        if self.next_step >= self.num_batches:
            raise StopIteration
        self.next_step += 1
        return self.epoch, self.next_step - 1

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "next_step": self.next_step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.next_step = int(state["epoch"]), int(state["next_step"])


class EpochBatchSampler(Sampler[BatchKey]):
    """Sampler of batch keys for one rank; ``set_epoch`` selects the shuffle. Stateful."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches, self.epoch = num_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> _EpochStepIterator:
        return _EpochStepIterator(self.epoch, self.num_batches)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state["epoch"])


def _identity(x: Any) -> Any:
    return x


class SequenceDataLoader(StatefulDataLoader):
    """``StatefulDataLoader`` with ``set_epoch`` / ``epoch`` and the epoch inside ``state_dict``.

    ``state_dict()`` = ``{"epoch": int, "loader": <StatefulDataLoader state>}``. After
    ``load_state_dict``, ``set_epoch`` with the saved epoch keeps the restored mid-epoch position;
    a different epoch discards it (with a warning) and starts that epoch from its first batch.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored_epoch: Optional[int] = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        if self._restored_epoch is not None and self.next_iter_state is not None and epoch != self._restored_epoch:
            logger.warning("set_epoch(%d) discards the restored position inside epoch %d", epoch, self._restored_epoch)
            self.next_iter_state = None
        self._restored_epoch = None
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.sampler.epoch, "loader": super().state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.sampler.set_epoch(state_dict["epoch"])
        self._restored_epoch = int(state_dict["epoch"])
        super().load_state_dict(state_dict["loader"])


def build_loader(spec: DataSpec, info: DatasetInfo, split: str, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> SequenceDataLoader:
    """Loader of ``split`` (train | valid | test) batches for ``rank`` of ``world_size``; see module doc.

    Batch sizes: ``spec.batch_size`` rows (train) / ``spec.eval_batch_size`` rows (eval) per rank.
    Every rank gets the same number of batches (``len(loader)``) with equal sizes.
    Yields ``SequenceBatch`` on CPU (features KJT: item_id, action, surface [+ neg_item_id for train];
    timestamps [L]; request_ids [B]; eval: target_item [B], target_timestamp [B], weights [B]).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    store = load_event_store(info.root)
    rows = leave_one_out(store.offsets, split, spec.max_len, spec.min_events, spec.train_windows)
    if rows.num_empty_dropped or rows.num_short_dropped:
        logger.warning("%s: dropped %d requests with an empty history and %d with < %d events; %d rows remain",
                       split, rows.num_empty_dropped, rows.num_short_dropped, spec.min_events, len(rows))
    train = split == "train"
    dataset = SequenceBatchDataset(
        store, rows, batch_size=spec.batch_size if train else spec.eval_batch_size, num_items=info.num_items,
        num_negatives=spec.num_negatives_per_row, rank=rank, world_size=world_size, seed=seed,
        item_ids=info.item_raw_ids if spec.raw_ids else None)
    return SequenceDataLoader(
        dataset, batch_size=None, sampler=EpochBatchSampler(len(dataset)), collate_fn=_identity,
        num_workers=spec.num_workers, persistent_workers=spec.num_workers > 0)

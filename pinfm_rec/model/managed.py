"""``embedding.id_mode=managed``: raw 64-bit item ids through TorchRec's zero-collision tables.

The item table (``t_item``: features ``item_id`` and ``neg_item_id``) sits in a TorchRec
``ManagedCollisionEmbeddingCollection``: an ``MCHManagedCollisionModule`` maps each raw int64 id to
a slot of its own (zero collisions among admitted ids) and admits the ids seen in training every
``eviction_interval`` steps, evicting the least recently (``lru``) or least frequently (``lfu``)
used ones when the table is full. An id not (yet, or no longer) admitted reads the table's last
slot, shared by all such ids (per shard when sharded): the "unknown item" row. The other tables
stay in a plain ``EmbeddingCollection``. ``ManagedTables`` runs both in one call and returns what
an EC returns plus the slot ids of the item features.

A slot given to a new id: under DMP (every recipe shards, one rank too) TorchRec re-initialises
its row and optimizer state (``ShardedManagedCollisionEmbeddingCollection._evict``); the unsharded
module keeps the evicted id's row (TorchRec's ``mc_embedding_modules.evict`` is a no-op).

Sharding: TorchRec shards managed-collision tables ``row_wise`` only; raw ids are routed to the
rank owning ``[r, r+1) * input_hash_size / buckets``, so ``buckets`` must be a multiple of the world
size (0: the world size of the process group when the model is built) and the slots per table a
multiple of ``buckets`` (rounded up). Slot state (raw ids, access metadata) is part of the state
dict and checkpointed with the weights (same world size to resume).

Full-ranking eval over raw ids scores every id of the catalogue by the slot it maps to (its own,
or the unknown row); ``slot_ids`` lists which raw id holds which slot (per rank), for exports and
to score all slots of the table and map them back.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from pinfm_rec.features import FEATURE_TABLE, ITEM_KEY, TABLE_FEATURES
from pinfm_rec.spec import bounds

ITEM_TABLE = FEATURE_TABLE[ITEM_KEY]
ITEM_FEATURES: List[str] = list(TABLE_FEATURES[ITEM_TABLE])
EMPTY_SLOT = torch.iinfo(torch.int64).max  # raw id of a free slot in TorchRec's MCH buffers


@dataclass
class ManagedSpec:
    """The managed item table (``embedding.id_mode=managed``; owned by model/managed.py)."""

    eviction: Literal["lru", "lfu"] = "lru"
    # training steps between two admissions of the new ids seen (and evictions when full)
    eviction_interval: int = field(default=1, metadata=bounds(ge=1))
    # raw ids are expected in [0, input_hash_size); rank r owns the r-th of ``buckets`` equal ranges
    input_hash_size: int = field(default=2**62, metadata=bounds(ge=2))
    buckets: int = field(default=0, metadata=bounds(ge=0))  # 0: the world size at build time


def resolved_buckets(spec: ManagedSpec) -> int:
    """``spec.buckets``, or the world size of the default process group (1 without one)."""
    if spec.buckets > 0:
        return spec.buckets
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def managed_rows(rows: int, spec: ManagedSpec) -> int:
    """Slots of the managed table: ``rows`` rounded up to a multiple of the buckets."""
    b = resolved_buckets(spec)
    return -(-rows // b) * b


def _policy(name: str):
    if name == "lru":
        return LRU_EvictionPolicy()
    if name == "lfu":
        return LFU_EvictionPolicy()
    raise ValueError(f"embedding.managed.eviction must be lru or lfu, got {name!r}")


class ManagedTables(nn.Module):
    """The registry's tables with ``t_item`` managed: ``forward(kjt)`` takes a KJT with the EC's
    features in the EC's order (``pinfm.to_ec_kjt``), item ids raw int64, and returns
    ({feature: JaggedTensor} like an EmbeddingCollection, slot ids [L_item] of the item features
    in their KJT order)."""

    def __init__(self, configs: List[EmbeddingConfig], spec: ManagedSpec, device: torch.device) -> None:
        super().__init__()
        item = [c for c in configs if c.name == ITEM_TABLE]
        self.n_item_features = len(ITEM_FEATURES)
        self.spec = spec
        mc_device = torch.device("cpu") if device.type == "meta" else device  # buffers are real
        # ``buckets`` (the planner's check that ranks own whole buckets) is newer than torchrec 1.6
        params = inspect.signature(MCHManagedCollisionModule).parameters
        kw = {"buckets": resolved_buckets(spec)} if "buckets" in params else {}
        mch = MCHManagedCollisionModule(
            zch_size=item[0].num_embeddings, device=mc_device, eviction_policy=_policy(spec.eviction),
            eviction_interval=spec.eviction_interval, input_hash_size=spec.input_hash_size, **kw,
        )
        self.items = ManagedCollisionEmbeddingCollection(
            EmbeddingCollection(tables=item, device=device),
            ManagedCollisionCollection({ITEM_TABLE: mch}, item),
            return_remapped_features=True,
        )
        self.rest = EmbeddingCollection(tables=[c for c in configs if c.name != ITEM_TABLE], device=device)

    def forward(self, kjt: KeyedJaggedTensor) -> Tuple[Dict[str, JaggedTensor], KeyedJaggedTensor]:
        item_kjt, rest_kjt = kjt.split([self.n_item_features, len(kjt.keys()) - self.n_item_features])
        emb, slots = self.items(item_kjt)
        out = dict(self.rest(rest_kjt))
        out.update(emb)
        return out, slots

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return list(self.items._embedding_module.embedding_configs()) + list(self.rest.embedding_configs())


def with_slots(kjt: KeyedJaggedTensor, slots: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``kjt`` with its item features' raw ids replaced by their slot ids (``slots``: the KJT
    ``ManagedTables`` returns); other features unchanged."""
    jts = kjt.to_dict()
    for k, jt in slots.to_dict().items():
        if k in jts:
            jts[k] = JaggedTensor(values=jt.values(), lengths=jts[k].lengths())
    return KeyedJaggedTensor.from_jt_dict(jts)


def _mch_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MCHManagedCollisionModule)]


@torch.no_grad()
def slot_ids(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(raw ids [S], slots [S]) admitted in the managed item table(s) of ``model`` held by this
    rank (all of it unsharded; this rank's slot range under DMP); the unknown-item slot excluded."""
    raws, slots = [], []
    for m in _mch_modules(model):
        raw, slot = m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping
        keep = raw != EMPTY_SLOT
        raws.append(raw[keep])
        slots.append(slot[keep])
    if not raws:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(raws), torch.cat(slots)


@torch.no_grad()
def resort_slots(model: nn.Module) -> int:
    """Re-sort the slot state of every managed table of an UNSHARDED ``model`` after loading weights a
    sharded run saved: each rank kept its own slice sorted (free slots, raw id int64 max, at its end),
    so the concatenated slices are not one sorted array, which the remap's binary search needs.
    TorchRec's MCH load_state_dict post-hook (``validate_state``) already re-sorts in the versions
    tested here; this makes serving independent of that hook (idempotent on sorted state).
    Returns the number of tables re-sorted."""
    mods = _mch_modules(model)
    for m in mods:
        if hasattr(m, "_sort_mch_buffers"):
            m._sort_mch_buffers()
        else:  # pragma: no cover - TorchRec without the helper
            order = torch.argsort(m._mch_sorted_raw_ids, stable=True)
            m._mch_sorted_raw_ids.copy_(m._mch_sorted_raw_ids[order])
            m._mch_remapped_ids_mapping.copy_(m._mch_remapped_ids_mapping[order])
            for buf in getattr(m, "_mch_metadata", {}).values():
                buf.copy_(buf[order])
    return len(mods)


def managed_stats(model: nn.Module) -> Dict[str, int]:
    """This rank's managed-table counters: ``slots`` (rows), ``occupied`` (admitted raw ids)."""
    n = sum(int(m._zch_size) for m in _mch_modules(model))
    return {"slots": n, "occupied": int(slot_ids(model)[0].numel())}

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

Routing and ``id_hash``: TorchRec's sharded module routes a raw id to the rank owning
``[r, r+1) * input_hash_size / buckets`` before any hashing of its own, so a real catalogue's ids
(a shared offset such as ``2**40 + k * 7919``, snowflake ids sharing their high bits) would all land
on one rank. With ``id_hash=mix`` (the default) ``ManagedTables`` first maps every item id through
``id_mix.mix``, a bijection on ``[0, input_hash_size)`` (a power of two then) that spreads them over
the whole range, so the ranks get equal shares of any catalogue; ``id_hash=none`` hands the raw ids
over as they are (for ids already uniform over the range, and the rule for specs saved before the
option existed: ``legacy_spec_defaults``). The slot state (``_mch_*`` buffers: checkpoints, delta
exports) holds the mixed ids; everything that reads raw ids out of it goes through ``slot_ids``,
which returns the ORIGINAL raw ids (``unmix``). An id outside ``[0, input_hash_size)`` is a
ValueError naming it (either mode: mixed, masking would alias it to another id; unmixed, it would be
routed to no rank's range).

Sharding: TorchRec shards managed-collision tables ``row_wise`` only, so ``buckets`` must be a
multiple of the world size (0: the world size of the process group when the model is built) and
the slots per table a multiple of ``buckets`` (rounded up). Slot state (ids, access metadata) is
part of the state dict and checkpointed with the weights (same world size to resume).

Full-ranking eval over raw ids scores every id of the catalogue by the slot it maps to (its own,
or the unknown row: the forward mixes the catalogue's ids like the batches'); ``slot_ids`` lists
which raw id holds which slot (per rank), for exports and to score all slots of the table and map
them back.
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
from pinfm_rec.model.id_mix import check_range, hash_bits, mix, unmix
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
    # (of the mixed ids with id_hash=mix: then a power of two)
    input_hash_size: int = field(default=2**62, metadata=bounds(ge=2))
    buckets: int = field(default=0, metadata=bounds(ge=0))  # 0: the world size at build time
    # mix: ids through a bijection on [0, input_hash_size) before routing (any catalogue spreads
    # evenly over the ranks); none: as they are (ids already uniform; specs saved before this key)
    id_hash: Literal["mix", "none"] = "mix"


# what a spec saved before ``id_hash`` existed ran with (its slot state holds unmixed ids)
LEGACY_ID_HASH = "none"


def legacy_spec_defaults(model: dict | None) -> dict | None:
    """The ``model`` section of a spec SAVED beside a checkpoint or export (a plain mapping, before
    validation) with ``embedding.managed.id_hash: none`` added when a managed embedding lacks the
    key: such a spec was written before the option existed and its slot state holds raw ids as they
    were. Returns the (copied where changed) mapping; other sections and new specs are left alone.
    Loaders of saved specs call it (``pretrained.read_pretrained``, ``serve.model_io``,
    ``checkpoint.check_resume_compatible``, ``cli`` for a run's spec.yaml)."""
    if not isinstance(model, dict):
        return model
    emb = model.get("embedding")
    if not isinstance(emb, dict) or emb.get("id_mode") != "managed":
        return model
    managed = emb.get("managed")
    managed = dict(managed) if isinstance(managed, dict) else {}
    if "id_hash" in managed:
        return model
    managed["id_hash"] = LEGACY_ID_HASH
    return {**model, "embedding": {**emb, "managed": managed}}


def id_bits(spec: ManagedSpec) -> int:
    """``k`` with ``input_hash_size == 2**k`` for ``id_hash=mix`` (ValueError otherwise), 0 for none."""
    if spec.id_hash == "none":
        return 0
    if spec.id_hash != "mix":
        raise ValueError(f"embedding.managed.id_hash must be mix or none, got {spec.id_hash!r}")
    return hash_bits(spec.input_hash_size)


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
        self.bits = id_bits(spec)  # 0: ids handed over unmixed
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
        check_range(item_kjt.values(), self.spec.input_hash_size, what=f"raw item id (features {item_kjt.keys()})")
        if self.bits:
            item_kjt = self._mixed(item_kjt)
        emb, slots = self.items(item_kjt)
        out = dict(self.rest(rest_kjt))
        out.update(emb)
        return out, slots

    def _mixed(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``kjt`` (ids checked in ``[0, input_hash_size)``) with its values [L_item] mixed (``id_mix.mix``)."""
        return KeyedJaggedTensor(
            keys=kjt.keys(), values=mix(kjt.values(), self.bits), weights=kjt.weights_or_none(),
            lengths=kjt.lengths(), offsets=kjt.offsets(), stride=kjt.stride(),
            length_per_key=kjt.length_per_key(), offset_per_key=kjt.offset_per_key(),
        )

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


def _mch_with_bits(model: nn.Module) -> List[Tuple[nn.Module, int]]:
    """(MCH module, id mix bits of the ``ManagedTables`` holding it, 0: unmixed) of ``model``."""
    bits = {}
    for mt in model.modules():
        if isinstance(mt, ManagedTables):
            bits.update({id(m): mt.bits for m in _mch_modules(mt)})
    return [(m, bits.get(id(m), 0)) for m in _mch_modules(model)]


@torch.no_grad()
def slot_ids(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(raw ids [S], slots [S]) admitted in the managed item table(s) of ``model`` held by this
    rank (all of it unsharded; this rank's slot range under DMP); the unknown-item slot excluded.
    The raw ids are the ORIGINAL ids the batches carried (the slot state's mixed ids unmixed with
    ``id_hash=mix``), int64."""
    raws, slots = [], []
    for m, bits in _mch_with_bits(model):
        raw, slot = m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping
        keep = raw != EMPTY_SLOT  # free slots: never unmixed
        raws.append(unmix(raw[keep], bits) if bits else raw[keep])
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

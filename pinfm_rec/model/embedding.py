"""Sparse embedding tables of PinFM (one TorchRec ``EmbeddingCollection``).

Tables and their features come from the feature registry (``pinfm_rec/features.py``):
    t_item    features ``item_id`` (history) and ``neg_item_id`` (sampled negatives / candidates)
    t_action  feature  ``action``
    t_surface feature  ``surface``
Table sizes are looked up by the registry's vocabulary keys (``num_items``, ...) in a mapping or
dataset info (``features.vocab_sizes``).

``EmbeddingCollection`` requires one embedding dim for all of its tables, so ``EmbeddingSpec.dim``
is shared by the three tables.

Id modes: ``error`` (dense ids, an out-of-range id raises), ``hash`` (id modulo the table size;
raw ids collide) and ``managed`` (raw int64 item ids through TorchRec's zero-collision managed
tables with eviction, ``model/managed.py``; the item table is then sharded row_wise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, get_args

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.features import (  # noqa: F401  (EC_FEATURES, TABLE_FEATURES re-exported)
    EC_FEATURES,
    FEATURE_TABLE,
    ITEM_KEY,
    TABLE_FEATURES,
    TABLE_SECTION,
    TABLE_VOCAB,
    vocab_sizes,
)
from pinfm_rec.model.managed import ManagedSpec, ManagedTables, managed_rows
from pinfm_rec.spec import bounds

ITEM_TABLE = FEATURE_TABLE[ITEM_KEY]
Sharding = Literal["auto", "table_wise", "row_wise", "column_wise"]  # auto: the planner decides
# error: an out-of-range id raises | hash: id modulo table size | managed: raw ids, zero-collision item table
IdMode = Literal["error", "hash", "managed"]
SHARDING_CHOICES = get_args(Sharding)
ID_MODES = get_args(IdMode)


@dataclass
class TableSpec:
    num_embeddings: int = field(default=0, metadata=bounds(ge=0))  # 0 -> the dataset's count
    sharding: Sharding = "auto"


@dataclass
class EmbeddingSpec:
    dim: int = field(default=64, metadata=bounds(gt=0))  # one dim for all tables (EC requirement)
    item: TableSpec = field(default_factory=TableSpec)
    action: TableSpec = field(default_factory=TableSpec)
    surface: TableSpec = field(default_factory=TableSpec)
    id_mode: IdMode = "error"
    managed: ManagedSpec = field(default_factory=ManagedSpec)  # id_mode=managed: the item table
    # weights ~ U(-init_scale, init_scale) (0 -> TorchRec default)
    init_scale: float = field(default=0.03, metadata=bounds(ge=0))


def _table_specs(spec: EmbeddingSpec) -> Dict[str, TableSpec]:
    return {table: getattr(spec, section) for table, section in TABLE_SECTION.items()}


def validate_spec(spec: EmbeddingSpec) -> None:
    if spec.dim <= 0:
        raise ValueError(f"embedding.dim must be > 0, got {spec.dim}")
    if spec.id_mode not in ID_MODES:
        raise ValueError(f"embedding.id_mode must be one of {ID_MODES}, got {spec.id_mode!r}")
    for name, t in _table_specs(spec).items():
        if t.sharding not in SHARDING_CHOICES:
            raise ValueError(
                f"sharding of table {name} must be one of {SHARDING_CHOICES}, got {t.sharding!r}"
            )
        if t.num_embeddings < 0:
            raise ValueError(f"num_embeddings of table {name} must be >= 0, got {t.num_embeddings}")
    if spec.id_mode == "managed" and spec.item.sharding not in ("auto", "row_wise"):
        raise ValueError(f"embedding.item.sharding={spec.item.sharding} with id_mode=managed: TorchRec shards "
                         f"managed-collision tables row_wise only (set auto or row_wise)")


def table_sizes(spec: EmbeddingSpec, vocab: Any) -> Dict[str, int]:
    """Rows per table: the spec's ``num_embeddings`` where > 0, else the vocabulary size.

    vocab: {"num_items": .., "num_actions": .., "num_surfaces": ..} or dataset info with those fields.
    """
    data = vocab_sizes(vocab)
    out = {}
    for name, t in _table_specs(spec).items():
        n = t.num_embeddings if t.num_embeddings > 0 else data[TABLE_VOCAB[name]]
        if n <= 0:
            raise ValueError(f"table {name} has no rows (spec 0 and {TABLE_VOCAB[name]}={data[TABLE_VOCAB[name]]})")
        out[name] = managed_rows(n, spec.managed) if spec.id_mode == "managed" and name == ITEM_TABLE else n
    return out


def build_embedding_collection(
    spec: EmbeddingSpec, vocab: Any, device: str | torch.device = "meta"
) -> EmbeddingCollection | ManagedTables:
    """EmbeddingCollection with the registry's tables (t_item: item_id, neg_item_id; t_action;
    t_surface), sized by ``table_sizes(spec, vocab)``.

    Built on ``meta`` by default (DMP materialises it); pass ``device="cpu"`` for tests. With
    ``id_mode=managed`` a ``ManagedTables`` (the item table managed, the others in an EC).
    """
    validate_spec(spec)
    sizes = table_sizes(spec, vocab)
    init = {}
    if spec.init_scale > 0:
        init = dict(weight_init_min=-spec.init_scale, weight_init_max=spec.init_scale)
    configs = [
        EmbeddingConfig(
            num_embeddings=sizes[name],
            embedding_dim=spec.dim,
            name=name,
            feature_names=list(feats),
            **init,
        )
        for name, feats in TABLE_FEATURES.items()
    ]
    if spec.id_mode == "managed":
        return ManagedTables(configs, spec.managed, torch.device(device))
    return EmbeddingCollection(tables=configs, device=torch.device(device))


def table_shardings(spec: EmbeddingSpec) -> Dict[str, str]:
    """{table_name: sharding type} for the planner's constraints; "auto" tables are left out.

    Values are ``torchrec.distributed.types.ShardingType`` values ("table_wise", "row_wise",
    "column_wise").
    """
    validate_spec(spec)
    out = {n: t.sharding for n, t in _table_specs(spec).items() if t.sharding != "auto"}
    if spec.id_mode == "managed":
        out[ITEM_TABLE] = "row_wise"
    return out


def check_ids(
    kjt: KeyedJaggedTensor, sizes: Mapping[str, int], mode: str = "error"
) -> KeyedJaggedTensor:
    """Check (mode "error") or hash (mode "hash": id mod size) the ids of ``kjt``.

    sizes: {table_name: num_rows} (as from ``table_sizes``) or {feature_name: num_rows}.
    Features of the KJT that map to no size are left alone. Costs one host sync in "error" mode.
    Mode "managed": the item table's raw ids are left to the managed table, the others checked.
    Returns the KJT (unchanged in "error" mode, a new KJT with hashed values in "hash" mode).
    """
    if mode not in ID_MODES:
        raise ValueError(f"id mode must be one of {ID_MODES}, got {mode!r}")
    if mode == "managed":
        sizes = {k: v for k, v in sizes.items() if k != ITEM_TABLE and FEATURE_TABLE.get(k) != ITEM_TABLE}
        mode = "error"
    keys = kjt.keys()
    limits: List[int] = []
    for k in keys:
        if k in sizes:
            limits.append(int(sizes[k]))
        elif FEATURE_TABLE.get(k) in sizes:
            limits.append(int(sizes[FEATURE_TABLE[k]]))
        else:
            limits.append(-1)  # unchecked
    values = kjt.values()
    if values.numel() == 0 or all(lim < 0 for lim in limits):
        return kjt
    lpk = kjt.length_per_key()
    big = torch.iinfo(values.dtype).max if not values.dtype.is_floating_point else float("inf")
    lim_t = torch.tensor([lim if lim > 0 else big for lim in limits], device=values.device)
    lim_v = torch.repeat_interleave(
        lim_t, torch.tensor(lpk, device=values.device), output_size=values.numel()
    )  # [total]
    if mode == "hash":
        checked = torch.tensor([lim > 0 for lim in limits], device=values.device)
        checked_v = torch.repeat_interleave(
            checked, torch.tensor(lpk, device=values.device), output_size=values.numel()
        )
        new_values = torch.where(checked_v, torch.remainder(values, lim_v), values)
        return KeyedJaggedTensor(
            keys=keys,
            values=new_values,
            weights=kjt.weights_or_none(),
            lengths=kjt.lengths(),
            offsets=kjt.offsets(),
            stride=kjt.stride(),
            length_per_key=lpk,
            offset_per_key=kjt.offset_per_key(),
        )
    bad = (values < 0) | (values >= lim_v)
    if any(lim < 0 for lim in limits):  # unchecked features (managed raw item ids: ManagedTables checks them)
        bad &= lim_v != big
    if bool(bad.any()):  # the one host sync
        pos = int(torch.nonzero(bad)[0, 0])
        opk = kjt.offset_per_key()
        ki = max(i for i in range(len(keys)) if opk[i] <= pos and lpk[i] > 0)
        key = keys[ki]
        table = FEATURE_TABLE.get(key, key)
        n_bad = int(bad[opk[ki] : opk[ki + 1]].sum())
        raise ValueError(
            f"feature {key!r} (table {table!r}): id {int(values[pos])} is outside the table "
            f"(size {limits[ki]}, valid ids 0..{limits[ki] - 1}); {n_bad} bad id(s) in this "
            f"feature. Set embedding.id_mode=hash to map ids modulo the table size, or size "
            f"the table from the dataset."
        )
    return kjt

"""Sparse embedding tables of PinFM (one TorchRec ``EmbeddingCollection``).

Tables (never name one ``items``: it collides with ``nn.ModuleDict.items`` under DMP):
    t_item    features ``item_id`` (history) and ``neg_item_id`` (sampled negatives)
    t_action  feature  ``action``
    t_surface feature  ``surface``

``EmbeddingCollection`` requires one embedding dim for all of its tables, so ``EmbeddingSpec.dim``
is shared by the three tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Mapping, get_args

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import ACTION_KEY, ITEM_KEY, NEG_ITEM_KEY, SURFACE_KEY
from pinfm_rec.spec import bounds

ITEM_TABLE = "t_item"
ACTION_TABLE = "t_action"
SURFACE_TABLE = "t_surface"
# table name -> feature names it serves (this order is the EC's feature order)
TABLE_FEATURES: Dict[str, List[str]] = {
    ITEM_TABLE: [ITEM_KEY, NEG_ITEM_KEY],
    ACTION_TABLE: [ACTION_KEY],
    SURFACE_TABLE: [SURFACE_KEY],
}
FEATURE_TABLE: Dict[str, str] = {f: t for t, fs in TABLE_FEATURES.items() for f in fs}
EC_FEATURES: List[str] = [f for fs in TABLE_FEATURES.values() for f in fs]
Sharding = Literal["auto", "table_wise", "row_wise", "column_wise"]  # auto: the planner decides
IdMode = Literal["error", "hash"]  # error: an out-of-range id raises | hash: id modulo table size
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
    # weights ~ U(-init_scale, init_scale) (0 -> TorchRec default)
    init_scale: float = field(default=0.03, metadata=bounds(ge=0))


def _table_specs(spec: EmbeddingSpec) -> Dict[str, TableSpec]:
    return {ITEM_TABLE: spec.item, ACTION_TABLE: spec.action, SURFACE_TABLE: spec.surface}


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


def table_sizes(
    spec: EmbeddingSpec, num_items: int, num_actions: int, num_surfaces: int
) -> Dict[str, int]:
    """Rows per table: the spec's ``num_embeddings`` where > 0, else the dataset's count."""
    data = {ITEM_TABLE: num_items, ACTION_TABLE: num_actions, SURFACE_TABLE: num_surfaces}
    out = {}
    for name, t in _table_specs(spec).items():
        n = t.num_embeddings if t.num_embeddings > 0 else int(data[name])
        if n <= 0:
            raise ValueError(f"table {name} has no rows (spec 0 and dataset count {data[name]})")
        out[name] = n
    return out


def build_embedding_collection(
    spec: EmbeddingSpec,
    num_items: int,
    num_actions: int,
    num_surfaces: int,
    device: str | torch.device = "meta",
) -> EmbeddingCollection:
    """EmbeddingCollection with tables t_item (item_id, neg_item_id), t_action, t_surface.

    Built on ``meta`` by default (DMP materialises it); pass ``device="cpu"`` for tests.
    """
    validate_spec(spec)
    sizes = table_sizes(spec, num_items, num_actions, num_surfaces)
    init = {}
    if spec.init_scale > 0:
        init = dict(weight_init_min=-spec.init_scale, weight_init_max=spec.init_scale)
    tables = [
        EmbeddingConfig(
            num_embeddings=sizes[name],
            embedding_dim=spec.dim,
            name=name,
            feature_names=list(feats),
            **init,
        )
        for name, feats in TABLE_FEATURES.items()
    ]
    return EmbeddingCollection(tables=tables, device=torch.device(device))


def table_shardings(spec: EmbeddingSpec) -> Dict[str, str]:
    """{table_name: sharding type} for the planner's constraints; "auto" tables are left out.

    Values are ``torchrec.distributed.types.ShardingType`` values ("table_wise", "row_wise",
    "column_wise").
    """
    validate_spec(spec)
    return {n: t.sharding for n, t in _table_specs(spec).items() if t.sharding != "auto"}


def check_ids(
    kjt: KeyedJaggedTensor, sizes: Mapping[str, int], mode: str = "error"
) -> KeyedJaggedTensor:
    """Check (mode "error") or hash (mode "hash": id mod size) the ids of ``kjt``.

    sizes: {table_name: num_rows} (as from ``table_sizes``) or {feature_name: num_rows}.
    Features of the KJT that map to no size are left alone. Costs one host sync in "error" mode.
    Returns the KJT (unchanged in "error" mode, a new KJT with hashed values in "hash" mode).
    """
    if mode not in ID_MODES:
        raise ValueError(f"id mode must be one of {ID_MODES}, got {mode!r}")
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

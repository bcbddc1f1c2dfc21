"""The feature registry: every sparse feature of PinFM, one row each.

Read by the data layer (the KJT keys of a history, ``data/batch.py``), the embedding tables
(``model/embedding.py``: tables, their features, sizes and sharding), ``PinFM.embed_tokens`` (which
features are summed into a token) and the encoder export (vocabulary sizes in
``encoder_meta.json``). Adding a history feature is one row here, its ``TableSpec`` field in
``EmbeddingSpec`` (sharding, size override) and its column in the data.

Roles:
    token   summed into each history token's input (``item_id`` is required, the others optional:
            a KJT without one of them leaves its term out)
    lookup  ids looked up in another feature's table in the same EC call, not summed into tokens
            (``neg_item_id``: sampled negatives in pretraining, candidates in the encoder)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Mapping, Tuple


@dataclass(frozen=True)
class Feature:
    key: str  # KJT key
    table: str  # EmbeddingCollection table (features may share one); never "items" (ModuleDict.items)
    section: str  # EmbeddingSpec field holding the table's TableSpec (sharding, num_embeddings)
    vocab: str  # dataset info / encoder_meta.json field with the table's vocabulary size
    role: Literal["token", "lookup"]


FEATURES: Tuple[Feature, ...] = (
    Feature("item_id", "t_item", "item", "num_items", "token"),
    Feature("action", "t_action", "action", "num_actions", "token"),
    Feature("surface", "t_surface", "surface", "num_surfaces", "token"),
    Feature("neg_item_id", "t_item", "item", "num_items", "lookup"),
)
BY_KEY: Dict[str, Feature] = {f.key: f for f in FEATURES}
ITEM_KEY, ACTION_KEY, SURFACE_KEY, NEG_ITEM_KEY = (f.key for f in FEATURES)
TOKEN_KEYS: Tuple[str, ...] = tuple(f.key for f in FEATURES if f.role == "token")
# table name -> feature keys it serves (this order is the EC's feature order)
TABLE_FEATURES: Dict[str, List[str]] = {}
for _f in FEATURES:
    TABLE_FEATURES.setdefault(_f.table, []).append(_f.key)
FEATURE_TABLE: Dict[str, str] = {f.key: f.table for f in FEATURES}
EC_FEATURES: List[str] = [k for ks in TABLE_FEATURES.values() for k in ks]
TABLE_SECTION: Dict[str, str] = {f.table: f.section for f in FEATURES}
TABLE_VOCAB: Dict[str, str] = {f.table: f.vocab for f in FEATURES}
VOCAB_KEYS: Tuple[str, ...] = tuple(dict.fromkeys(f.vocab for f in FEATURES))


def vocab_sizes(source: Any) -> Dict[str, int]:
    """{vocab key: size} (``num_items``, ``num_actions``, ...) from a mapping (encoder_meta.json)
    or an object with those attributes (DatasetInfo, RankingInfo)."""
    out = {}
    for k in VOCAB_KEYS:
        v = source.get(k) if isinstance(source, Mapping) else getattr(source, k, None)
        if v is None:
            raise KeyError(f"vocabulary size {k!r} missing (need {', '.join(VOCAB_KEYS)})")
        out[k] = int(v)
    return out

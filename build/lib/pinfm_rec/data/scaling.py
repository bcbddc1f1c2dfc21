"""The scaling rule: spec values chosen from the dataset, so one spec trains any SASRec-format file.

A pretraining spec may set any of ``AUTO_KEYS`` to ``auto``; ``auto_overrides`` (called by the CLI
before the spec is validated) prepares the dataset, measures it (``dataset_stats``) and replaces
each ``auto`` by the value ``scaling_rule`` picks, as ordinary ``key=value`` overrides (explicit
command-line values win over ``auto``). The resolved values are logged and land in the run's
spec.yaml like any other value, so ``pinfm eval`` and resumes see numbers, not ``auto``.
Epochs are not scaled: the spec gives a cap and early stopping on valid ends the run.
The rule, its table and the reasons are in ``scaling_rule`` and docs/recipe-scaling.md.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import yaml

from pinfm_rec.errors import SpecError

logger = logging.getLogger(__name__)

AUTO = "auto"
AUTO_KEYS = ("data.max_len", "model.trunk.max_len", "model.trunk.d_model", "model.embedding.dim",
             "model.trunk.n_layers", "model.trunk.n_heads", "model.trunk.dropout")

# (min mean events per user, d_model = embedding dim, layers, heads): the first row that fits
SIZE_TIERS = ((100, 256, 3, 2), (20, 128, 2, 2), (0, 64, 2, 1))
# (min mean events per item, dropout)
DROPOUT_TIERS = ((50, 0.3), (15, 0.4), (0, 0.5))
MAX_LEN_PERCENTILE, MAX_LEN_STEP, MAX_LEN_MIN, MAX_LEN_MAX = 90, 10, 20, 200


@dataclass(frozen=True)
class DataStats:
    """What the rule reads. lengths are events per user (request) of the prepared dataset."""

    num_users: int
    num_items: int
    num_events: int
    len_percentile: float  # MAX_LEN_PERCENTILE-th percentile of the history lengths

    @property
    def events_per_user(self) -> float:
        return self.num_events / max(1, self.num_users)

    @property
    def events_per_item(self) -> float:
        return self.num_events / max(1, self.num_items)


def stats_from_lengths(lengths: np.ndarray, num_items: int) -> DataStats:
    """DataStats of per-user history lengths [U] over a catalogue of ``num_items``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return DataStats(num_users=int(lengths.size), num_items=int(num_items), num_events=int(lengths.sum()),
                     len_percentile=float(np.percentile(lengths, MAX_LEN_PERCENTILE)) if lengths.size else 0.0)


def dataset_stats(root: str) -> DataStats:
    """DataStats of a prepared dir."""
    from .prepare import load_event_store

    store = load_event_store(root)
    return stats_from_lengths(np.diff(store.offsets), store.meta.num_items)


def scaling_rule(stats: DataStats) -> Dict[str, Any]:
    """Spec values for ``stats`` ({dotted key: value} for every key of ``AUTO_KEYS``).

    * max_len (data and trunk): the 90th percentile of the history lengths rounded up to a multiple
      of 10, within [20, 200]. Longer windows only serve the few longest users (SASRec's choice:
      200 on ML-1M, 50 on the ~9-events Amazon sets); 200 keeps attention cost bounded.
    * model size by mean events per user (the signal per sequence): >= 100 (ML-1M, 165) →
      d 256, 3 layers, 2 heads (the ML-1M recipe); >= 20 → d 128, 2 layers, 2 heads; below
      (Amazon-style, ~9) → d 64, 2 layers, 1 head (SASRec's sparse-data model: d 50, 2 blocks,
      1 head). The embedding dim equals d_model (the item table scores the trunk output).
    * dropout by mean events per item (how often an item embedding is trained): >= 50 → 0.3,
      >= 15 → 0.4, else 0.5 (SASRec's sparse-data dropout).
    """
    p = stats.len_percentile
    max_len = int(min(MAX_LEN_MAX, max(MAX_LEN_MIN, math.ceil(p / MAX_LEN_STEP) * MAX_LEN_STEP)))
    d, layers, heads = next((d, n, h) for lo, d, n, h in SIZE_TIERS if stats.events_per_user >= lo)
    dropout = next(q for lo, q in DROPOUT_TIERS if stats.events_per_item >= lo)
    return {"data.max_len": max_len, "model.trunk.max_len": max_len, "model.trunk.d_model": d,
            "model.embedding.dim": d, "model.trunk.n_layers": layers, "model.trunk.n_heads": heads,
            "model.trunk.dropout": dropout}


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def auto_overrides(spec_path: Optional[str], overrides: Iterable[str],
                   stats: Optional[DataStats] = None) -> List[str]:
    """``overrides`` plus ``key=value`` for each ``AUTO_KEYS`` key that the spec file + overrides
    leave at ``auto`` (unchanged if none). Prepares the dataset (cached) to measure it, unless
    ``stats`` are given (checking a spec without its data)."""
    from pinfm_rec.spec import apply_overrides, from_dict

    from .prepare import DataSpec, prepare_dataset

    overrides = list(overrides)
    raw: dict = {}
    if spec_path:
        with open(spec_path) as f:
            raw = yaml.safe_load(f) or {}
    tree = apply_overrides(raw, overrides) if overrides else raw
    auto = [k for k in AUTO_KEYS if _get(tree, k) == AUTO]
    if not auto:
        return overrides
    where = "given statistics"
    if stats is None:
        data = dict(tree.get("data") or {})
        if data.get("max_len") == AUTO:
            data["max_len"] = MAX_LEN_MAX  # placeholder: preparing does not depend on it
        where = prepare_dataset(from_dict(DataSpec, data, f"{spec_path} data")).root
        stats = dataset_stats(where)
    rule = scaling_rule(stats)
    # an explicit value the rule's values depend on wins: the trunk holds the data's max_len, the
    # item table's dim is d_model, the heads divide d_model
    for dep, src in (("model.trunk.max_len", "data.max_len"), ("model.embedding.dim", "model.trunk.d_model"),
                     ("model.trunk.d_model", "model.embedding.dim")):
        if src not in auto and isinstance(_get(tree, src), int):
            rule[dep] = max(rule[dep], _get(tree, src)) if dep.endswith("max_len") else _get(tree, src)
    if rule["model.trunk.d_model"] % rule["model.trunk.n_heads"]:
        rule["model.trunk.n_heads"] = 1
    chosen = {k: v for k, v in rule.items() if k in auto}
    logger.info("scaling rule on %s (%d users, %d items, %.1f events/user, %.1f events/item, p%d length %.0f): %s",
                where, stats.num_users, stats.num_items, stats.events_per_user, stats.events_per_item,
                MAX_LEN_PERCENTILE, stats.len_percentile, ", ".join(f"{k}={v}" for k, v in chosen.items()))
    unknown = set(auto) - set(chosen)
    if unknown:  # pragma: no cover - scaling_rule covers AUTO_KEYS
        raise SpecError(f"{spec_path}: no scaling rule for {sorted(unknown)}")
    return overrides + [f"{k}={v}" for k, v in chosen.items()]

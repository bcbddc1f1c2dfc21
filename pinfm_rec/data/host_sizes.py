"""Host-side sizes of a ranking batch, so that the scoring forward never reads a device tensor
back (no ``.item()`` / ``.tolist()`` / ``.max()`` to the host on the hot path).

``HostSizes.of(batch)`` is computed once on the CPU batch (while collating, or by the scorer
before the transfer); the model reads it from ``RankingBatch.host`` where it would otherwise sync:
the ranker's history-bag size (``bag_total``), the flat baseline's repeated-history size
(``dup_total``), and whether the ids were range-checked on the host (``ids_checked``, see
``check_ids_on_host``). A batch without ``host`` (None) takes the old paths, which sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

import torch


@dataclass(frozen=True)
class HostSizes:
    """hist_lengths [U] and cand_counts [U] as host ints; ids_checked: every id of the batch was
    checked against its table on the host (mode "error"), so the forward skips its device check."""

    hist_lengths: Tuple[int, ...]
    cand_counts: Tuple[int, ...]
    ids_checked: bool = False

    @classmethod
    def of(cls, batch, ids_checked: bool = False) -> "HostSizes":
        """From a CPU ``RankingBatch`` (its history item feature gives the lengths)."""
        from pinfm_rec.data.batch import ITEM_KEY

        kjt = batch.history.features
        key = ITEM_KEY if ITEM_KEY in kjt.keys() else kjt.keys()[0]
        lengths = kjt[key].lengths().tolist()
        counts = (batch.cand_offsets[1:] - batch.cand_offsets[:-1]).tolist()
        return cls(tuple(lengths), tuple(counts), ids_checked)

    def bag_total(self, keep_last: int) -> int:
        """Elements of the per-candidate bag of each request's last ``keep_last`` history items."""
        return sum(min(n, keep_last) * c for n, c in zip(self.hist_lengths, self.cand_counts))

    def dup_total(self) -> int:
        """Tokens of the histories repeated once per candidate (the flat layout)."""
        return sum(n * c for n, c in zip(self.hist_lengths, self.cand_counts))


def check_ids_on_host(batch, sizes: Mapping[str, int], ranker_sizes: Mapping[str, int] | None = None) -> None:
    """Range-check (id mode "error") a CPU ``RankingBatch``'s ids before it goes to the device:
    the history features and candidates against the encoder's ``sizes`` ({table: rows}), the
    candidates and history items against ``ranker_sizes`` ({feature: rows}) when given. One
    min/max per feature; a bad id raises ``model.embedding.check_ids``' ValueError naming the
    feature, table and id."""
    from pinfm_rec.data.batch import ITEM_KEY
    from pinfm_rec.features import FEATURE_TABLE, NEG_ITEM_KEY
    from pinfm_rec.model.embedding import check_ids
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    def limit(key: str, table: Mapping[str, int]) -> int:
        n = table.get(key, table.get(FEATURE_TABLE.get(key, key)))
        return -1 if n is None else int(n)

    def refuse(key: str, v: torch.Tensor, lim: int) -> None:  # check_ids did not raise: still refuse
        lo, hi = torch.aminmax(v)
        raise ValueError(f"feature {key!r}: ids must lie in [0, {lim}), got min {int(lo)} max {int(hi)}")

    def bad(v: torch.Tensor, lim: int) -> bool:
        if lim <= 0 or v.numel() == 0:  # as check_ids: no size (or 0) means unchecked
            return False
        lo, hi = torch.aminmax(v)
        return bool(lo < 0) or bool(hi >= lim)

    kjt = batch.history.features
    values, opk = kjt.values(), kjt.offset_per_key()
    for i, key in enumerate(kjt.keys()):
        if bad(values[opk[i]:opk[i + 1]], limit(key, sizes)):
            check_ids(kjt, sizes, "error")  # raises, naming the feature and id
            refuse(key, values[opk[i]:opk[i + 1]], limit(key, sizes))
    cand = batch.cand_item
    ranker_sizes = dict(ranker_sizes or {})
    from pinfm_rec.rankers.dlrm import CAND_FEATURE, HIST_FEATURE

    checks = [(NEG_ITEM_KEY, cand, sizes), (CAND_FEATURE, cand, ranker_sizes)]
    if ITEM_KEY in kjt.keys():
        i = kjt.keys().index(ITEM_KEY)
        checks.append((HIST_FEATURE, values[opk[i]:opk[i + 1]], ranker_sizes))
    for key, v, table in checks:
        if bad(v, limit(key, table)):
            one = KeyedJaggedTensor(keys=[key], values=v.long(), lengths=torch.tensor([v.numel()]), stride=1)
            check_ids(one, table, "error")
            refuse(key, v, limit(key, table))

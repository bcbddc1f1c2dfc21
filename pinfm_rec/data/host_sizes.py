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
        """From a CPU ``RankingBatch`` (its history KJT's first key gives the lengths)."""
        kjt = batch.history.features
        u = batch.num_requests
        lengths = kjt.lengths()[:u].tolist()
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
    candidates and history items against ``ranker_sizes`` ({feature: rows}) when given. Raises
    ``model.embedding.check_ids``' ValueError naming the feature and id."""
    from pinfm_rec.data.batch import ITEM_KEY
    from pinfm_rec.features import NEG_ITEM_KEY
    from pinfm_rec.model.embedding import check_ids
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    check_ids(batch.history.features, sizes, "error")
    cand = KeyedJaggedTensor(keys=[NEG_ITEM_KEY], values=batch.cand_item.long(),
                             lengths=torch.tensor([batch.num_candidates]), stride=1)
    check_ids(cand, sizes, "error")
    if ranker_sizes:
        from pinfm_rec.rankers.dlrm import CAND_FEATURE, HIST_FEATURE

        items = batch.history.features[ITEM_KEY].values()
        kjt = KeyedJaggedTensor(keys=[CAND_FEATURE, HIST_FEATURE], values=torch.cat([batch.cand_item.long(), items]),
                                lengths=torch.tensor([batch.num_candidates, items.numel()]), stride=1)
        check_ids(kjt, ranker_sizes, "error")

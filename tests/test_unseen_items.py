"""Fine-tuning: item rows absent from the pretraining corpus are found and zeroed (train/unseen_items.py)."""
from __future__ import annotations

import os

import numpy as np
import torch

from pinfm_rec.data.ranking import RankingDataSpec, SyntheticRankingSpec, prepare_ranking
from pinfm_rec.data.ranking_store import load_ranking_store
from pinfm_rec.data.schema import read_event_columns
from pinfm_rec.model.embedding import EmbeddingSpec
from pinfm_rec.model.pinfm import ModelSpec, PinFM
from pinfm_rec.model.trunk import TrunkSpec
from pinfm_rec.train.unseen_items import ITEM_TABLE, pretraining_corpus, unseen_items, zero_unseen_items


def test_unseen_items_are_the_items_without_pretraining_events(tmp_path):
    spec = RankingDataSpec(source="synthetic", cache_dir=os.path.join(tmp_path, "cache"), max_len=20,
                           synthetic=SyntheticRankingSpec(num_requests=200, num_items=150, mean_len=8,
                                                          candidates_next=3, negatives_per_request=5))
    info = prepare_ranking(spec)
    rows = unseen_items(info.pretrain_dir, info.num_items)
    seen = set(read_event_columns(info.pretrain_dir, columns=("item_id",))["item_id"].tolist())
    assert rows.size > 0 and set(rows.tolist()) == set(range(info.num_items)) - seen
    store = load_ranking_store(info.root)  # the store's is_new flag marks exactly these candidates
    np.testing.assert_array_equal(np.isin(store.tables.cand_item, rows), store.is_new)


def test_zero_unseen_items_zeroes_only_those_item_rows():
    torch.manual_seed(0)
    ms = ModelSpec(embedding=EmbeddingSpec(dim=8), trunk=TrunkSpec(d_model=16, n_layers=1, n_heads=2, max_len=8))
    fm = PinFM(ms, dict(num_items=30, num_actions=4, num_surfaces=3), device="cpu")
    model = torch.nn.Sequential(fm)
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    rows = np.array([0, 7, 29])
    assert zero_unseen_items(model, rows) == 3
    after = fm.state_dict()
    key = next(k for k in after if k.endswith(f"{ITEM_TABLE}.weight"))
    assert after[key][rows].abs().sum() == 0
    keep = np.setdiff1d(np.arange(30), rows)
    torch.testing.assert_close(after[key][keep], before[key][keep])
    assert before[key][rows].abs().sum() > 0
    for k in after:  # other tables and the trunk untouched
        if k != key:
            torch.testing.assert_close(after[k], before[k])


def test_pretraining_corpus_is_read_from_the_encoder_spec(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "events.parquet").write_bytes(b"")
    enc = tmp_path / "enc"
    enc.mkdir()
    (enc / "spec.yaml").write_text(f"data:\n  path: {corpus}\n")
    assert pretraining_corpus(str(enc), "fallback") == str(corpus)
    (enc / "spec.yaml").write_text("data:\n  path: /nonexistent\n")
    assert pretraining_corpus(str(enc), "fallback") == "fallback"
    assert pretraining_corpus(str(tmp_path / "missing"), "fallback") == "fallback"

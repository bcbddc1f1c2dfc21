"""RankingMetrics (TorchRec's AUC / GAUC / NE / calibration) against values computed by hand, in one
process and split over 2 gloo ranks; HR/NDCG from ranks."""
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pinfm_rec.train.metrics import RankingMetrics, hr_ndcg_sums, target_ranks

# 3 requests: (logits, labels); request 2 has positives only (left out of GAUC)
REQS = [
    ([2.0, -1.0, 0.5, 0.1], [1, 0, 0, 1]),
    ([0.3, -0.2, 1.5], [0, 1, 1]),
    ([0.7, -0.4], [1, 1]),
]
NEW = [[False, True, False, True], [True, False, True], [False, False]]


def _pair_auc(s, y) -> float:
    """Exact AUC by counting pairs (scores distinct): P(score_pos > score_neg)."""
    pos = [a for a, b in zip(s, y) if b]
    neg = [a for a, b in zip(s, y) if not b]
    return sum(p > n for p in pos for n in neg) / (len(pos) * len(neg))


def _flat(reqs):
    lg = [x for r in reqs for x in r[0]]
    lb = [x for r in reqs for x in r[1]]
    return lg, lb


def _expected() -> dict:
    lg, lb = _flat(REQS)
    p = [1 / (1 + math.exp(-x)) for x in lg]
    n, pos = len(lb), sum(lb)
    ll = -sum(y * math.log(q) + (1 - y) * math.log(1 - q) for q, y in zip(p, lb)) / n
    base = pos / n
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    new = [x for r in NEW for x in r]
    return {
        "auc": _pair_auc(lg, lb),
        # each request with both classes counts once (requests 0 and 1; request 2 is positives only)
        "gauc": (_pair_auc(*REQS[0]) + _pair_auc(*REQS[1])) / 2,
        "logloss": ll,
        "ne": ll / entropy,
        "calibration": sum(p) / pos,
        "new_auc": _pair_auc([s for s, m in zip(lg, new) if m], [y for y, m in zip(lb, new) if m]),
        "count": float(n),
        "requests": 3.0,
    }


def _feed(m: RankingMetrics, reqs, news) -> None:
    lg, lb = _flat(reqs)
    m.update(torch.tensor(lg), torch.tensor(lb, dtype=torch.float32), torch.tensor([len(r[1]) for r in reqs]),
             torch.tensor([x for r in news for x in r]))


def _check(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (k, got[k], v)


def test_hand_values_one_update():
    want = _expected()
    assert want["gauc"] == pytest.approx((3 / 4 + 1 / 2) / 2)  # the hand values themselves
    assert want["auc"] == pytest.approx(12 / 18)
    m = RankingMetrics(torch.device("cpu"))
    _feed(m, REQS, NEW)
    _check(m.compute(), want)


def test_several_updates_equal_one():
    m = RankingMetrics(torch.device("cpu"))
    _feed(m, REQS[:1], NEW[:1])
    _feed(m, REQS[1:], NEW[1:])
    _check(m.compute(), _expected())


def test_gauc_weights_requests_equally_not_by_size():
    # a big request with AUC 1 and a small one with AUC 0: mean over requests = 0.5
    m = RankingMetrics(torch.device("cpu"))
    big = [float(i) for i in range(10)]
    m.update(torch.tensor(big + [1.0, 2.0]), torch.tensor([0.0] * 5 + [1.0] * 5 + [1.0, 0.0]),
             torch.tensor([10, 2]))
    assert m.compute()["gauc"] == pytest.approx(0.5)


def test_undefined_values_are_nan():
    m = RankingMetrics(torch.device("cpu"))
    m.update(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0]), torch.tensor([2]))
    out = m.compute()
    for k in ("auc", "gauc", "ne", "new_auc"):
        assert math.isnan(out[k]), k
    assert out["count"] == 2 and out["requests"] == 1 and out["calibration"] > 0


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = RankingMetrics(torch.device("cpu"))
        # rank 0 holds requests 0 and 2, rank 1 request 1 (uneven candidate counts)
        picks = [0, 2] if rank == 0 else [1]
        _feed(m, [REQS[i] for i in picks], [NEW[i] for i in picks])
        torch.save(m.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_reduce_to_the_global_values(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        _check(torch.load(tmp_path / f"rank{r}.pt"), _expected())


def test_hr_ndcg_from_ranks():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.2, 0.1]])
    ranks = target_ranks(scores, torch.tensor([2, 2]))
    assert ranks.tolist() == [1, 1]  # ties resolved in the target's favour
    out = hr_ndcg_sums(ranks, torch.tensor([1.0, 0.0]), ks=(1, 2))
    assert float(out["count"]) == 1.0 and float(out["hr@1"]) == 0.0 and float(out["hr@2"]) == 1.0
    assert float(out["ndcg@2"]) == pytest.approx(1 / math.log2(3))


def test_exclude_history_masks_history_items_but_not_the_target():
    """GR's protocol: the row's history items leave the ranking; the target stays, even if repeated."""
    import types

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from pinfm_rec.train.evaluate import mask_history
    from pinfm_rec.train.metrics import target_ranks

    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id"], values=torch.tensor([0, 1, 4, 3]), lengths=torch.tensor([2, 2]))
    batch = types.SimpleNamespace(features=kjt, target_item=torch.tensor([2, 3]))
    assert target_ranks(scores, batch.target_item).tolist() == [2, 1]
    masked = mask_history(scores, batch)
    assert target_ranks(masked, batch.target_item).tolist() == [0, 0]  # items 0,1 / 4 were above
    assert masked[1, 3] == 4.0 and torch.isinf(masked[0, :2]).all() and masked[0, 3] == 2.0


def test_history_bias_is_added_once_per_distinct_history_item():
    """model.loss.history_bias at eval: the learned w is added to each history item's score once
    (a repeated history item too), never to other items."""
    import types

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from pinfm_rec.train.evaluate import add_history_bias

    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id"], values=torch.tensor([0, 1, 0, 4]), lengths=torch.tensor([3, 1]))
    got = add_history_bias(scores, types.SimpleNamespace(features=kjt), torch.tensor([-2.5]))
    want = scores.clone()
    want[0, 0] -= 2.5
    want[0, 1] -= 2.5
    want[1, 4] -= 2.5
    torch.testing.assert_close(got, want)


def test_a_torchmetrics_that_rejects_torchrecs_reports_is_one_clear_error(monkeypatch):
    # torchmetrics 1.9 (the GPU image's) breaks every torchrec.metrics compute() with lightning_utilities'
    # "A frozen dataclass was passed to `apply_to_collection`": the user must read what to install
    from pinfm_rec.errors import DependencyError
    m = RankingMetrics(torch.device("cpu"))
    _feed(m, REQS, NEW)

    def broken():
        raise ValueError("A frozen dataclass was passed to `apply_to_collection` but this is not allowed.")
    monkeypatch.setattr(m._gauc, "compute", broken)
    with pytest.raises(DependencyError, match=r"torchmetrics==1\.0\.3"):
        m.compute()

"""serve/precision.py: Linear weights cast once for autocast give the same scores with fewer ops."""
import collections
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pinfm_rec.data.ranking_batch import random_ranking_batch
from pinfm_rec.serve import bench
from pinfm_rec.serve.precision import precast_linears
from pinfm_rec.serve.scorer import Scorer


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def _model_and_batch():
    torch.manual_seed(0)
    cfg = dict(bench.TINY)
    model = bench.build(cfg, 32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    batch = random_ranking_batch(gen, [32, 17], [8, 5], num_items=cfg["num_items"], num_dense=3)
    return model, Scorer(model, 32, "cpu", buckets=False).prepare(batch)


def _logits(model, batch):
    ops = _Ops()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), ops:
        out = model.logits(batch)
    return out, ops.ops


def test_precast_linears_is_bit_identical_under_autocast_and_drops_the_per_call_casts():
    model, batch = _model_and_batch()
    before, ops_before = _logits(model, batch)
    n = precast_linears(model, torch.bfloat16)
    after, ops_after = _logits(model, batch)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert n == len(linears) > 0
    assert all(m.weight.dtype == torch.bfloat16 and (m.bias is None or m.bias.dtype == torch.bfloat16)
               for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert torch.equal(before, after)  # autocast computed exactly these bf16 weights on every call
    # weight + bias cast per Linear call gone (trunk Linears run twice: context and crossing pass)
    assert ops_before["_to_copy.default"] - ops_after["_to_copy.default"] >= 2 * n
    assert precast_linears(model, torch.bfloat16) == n  # idempotent
    again, _ = _logits(model, batch)
    assert torch.equal(again, before)


def test_scorer_with_autocast_precasts_and_scores_like_plain_autocast():
    model, batch = _model_and_batch()
    plain = copy.deepcopy(model)
    scorer = Scorer(model, 32, "cpu", buckets=False, autocast=torch.bfloat16)
    assert scorer.model.encoder.fm.trunk.layers[0].qkv.weight.dtype == torch.bfloat16
    ref, _ = _logits(plain, batch)
    assert torch.equal(scorer.forward(batch), ref)


def test_flex_peer_raises_dynamo_recompile_limit():
    from pinfm_rec.kernels.dcat.peers import flex_dcat

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    try:
        setattr(cfg, name, 8)
        assert flex_dcat(1, 8, 4, device="cpu", compile=True) is not None
        assert getattr(cfg, name) >= 64  # a bench's 9th shape must not run flex uncompiled
        setattr(cfg, name, 500)
        flex_dcat(1, 8, 4, device="cpu", compile=True)
        assert getattr(cfg, name) == 500  # never lowered
    finally:
        setattr(cfg, name, old)


def test_bench_service_times_take_iters_and_at_least_min_s():
    import time

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    st = bench.service_times(fn, iters=3, warmup=1, device=torch.device("cpu"), min_s=0.05)
    assert len(calls) == len(st) + 1 and len(st) >= 3 and st.sum() >= 0.05 and len(st) < 60
    calls.clear()
    st = bench.service_times(fn, iters=3, warmup=0, device=torch.device("cpu"), min_s=10.0, max_iters=5)
    assert len(st) == 5  # capped
    st = bench.service_times(fn, iters=4, warmup=0, device=torch.device("cpu"))
    assert len(st) == 4

"""Host cost of the scoring path (issue 15): the scorer's device forward does no host sync (CPU
proxy: serve/hostprof.py's counters), equals the training-time forward, the pieces that made it
sync-free (host sizes, host id checks, the quantized lookup without torchrec's tolist, bucketize,
shared jagged indices) are each equal to what they replace, CUDA graphs (GPU only; a no-op with a
message on CPU), and the load benchmark's marked markdown region."""
from __future__ import annotations

import warnings

import pytest
import torch

from pinfm_rec.data.ranking_batch import random_ranking_batch
from pinfm_rec.serve import hostprof
from pinfm_rec.serve.bench import TINY

HIST, CANDS = [20, 0, 7, 31], [5, 3, 0, 8]  # an empty history and a request without candidates


def _batch(seed=0, hist=HIST, cands=CANDS):
    return random_ranking_batch(torch.Generator().manual_seed(seed), hist, cands, num_items=TINY["num_items"],
                                num_dense=3)


@pytest.fixture(scope="module")
def scorers():
    torch.manual_seed(0)
    return {t: hostprof.tiny_scorer(t, max_len=32) for t in ("fp32", "int8")}


@pytest.mark.parametrize("tables,pack", [("fp32", False), ("int8", False), ("fp32", True), ("int8", True)])
def test_scorer_forward_has_no_host_sync_on_the_cpu_proxy(scorers, tables, pack):
    scorer = scorers[tables]
    if pack:  # the GPU default: one packed buffer (serve/packing.py)
        scorer = type(scorer)(scorer.model, 32, "cpu", pack=True)
    dev = scorer.prepare(_batch())
    assert dev.host is not None and dev.host.ids_checked and (dev.packed is not None) == pack
    scorer.forward(dev)
    res = hostprof.profile(lambda: scorer.forward(dev), n=2)
    assert res["syncs_per_call"] == 0, res["sync_sites"]
    assert res["h2d_per_call"] == 0, res["h2d_sites"]  # no torch.tensor(list) inside (CUDA-graph capturable)
    assert 100 < res["ops_per_call"] < 700, res["ops_per_call"]
    # the counter can fail: the same model on a batch without host sizes syncs (ids, bag size, lengths)
    raw = _batch()
    res = hostprof.profile(lambda: scorer.model.logits(raw), n=1)
    assert res["syncs_per_call"] >= 2, res["sync_sites"]
    assert any("check_ids" in s for s in res["sync_sites"]) and any("gather_rows" in s for s in res["sync_sites"])


@pytest.mark.parametrize("tables", ["fp32", "int8"])
def test_scorer_forward_on_meta_copies_no_host_tensor(tables):
    # the device forward on meta (it is sync-free, so it runs there without data): every tensor
    # it touches must be on the scoring device. A host tensor beside device ones is an H2D copy
    # per call that a CUDA graph cannot capture (the first GPU capture failed on DLRM's CPU
    # triu_indices); here it is found without a GPU, with its site
    torch.manual_seed(0)
    scorer = hostprof.tiny_scorer(tables, max_len=32, device="meta")
    dev = scorer.prepare(_batch())
    assert dev.cand_item.device.type == "meta"
    out = scorer.forward(dev)
    assert out.device.type == "meta" and out.shape == (dev.num_candidates,)
    res = hostprof.profile(lambda: scorer.forward(dev), n=1)
    assert res["syncs_per_call"] == 0 and res["h2d_per_call"] == 0, (res["sync_sites"], res["h2d_sites"])
    # the check can fail: one DLRM buffer back on the host
    arch = next(m for m in scorer.model.modules() if "triu_indices" in getattr(m, "_buffers", {}))
    arch._buffers["triu_indices"] = torch.zeros(arch.triu_indices.shape, dtype=torch.long)
    res = hostprof.profile(lambda: scorer.forward(dev), n=1)
    assert res["h2d_per_call"] == 1 and "dlrm.py" in next(iter(res["h2d_sites"])), res["h2d_sites"]


@pytest.mark.parametrize("tables", ["fp32", "int8"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_scorer_equals_the_training_time_forward(scorers, tables, amp):
    """Scorer.logits (padded to a bucket, host sizes, host id checks, quant lookup) = the model's
    logits on the raw batch as training/eval calls them (no host sizes, torchrec's own paths)."""
    scorer = scorers[tables]
    batch = _batch(1)
    scorer.autocast = amp
    try:
        got = scorer.logits(batch)
    finally:
        scorer.autocast = None
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        want = scorer.model.logits(batch).float()
    assert got.shape == (batch.num_candidates,)
    tol = dict(atol=1e-5, rtol=1e-5) if amp is None else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, want, **tol)


def test_host_sizes_and_shared_index_paths_equal_the_syncing_ones():
    from pinfm_rec.data.host_sizes import HostSizes
    from pinfm_rec.model.jagged import gather_rows, jagged_index, shared_index
    from pinfm_rec.rankers.dlrm import ranker_features

    b = _batch(2)
    host = HostSizes.of(b)
    assert host.hist_lengths == tuple(HIST) and host.cand_counts == tuple(CANDS)
    assert host.bag_total(10) == sum(min(n, 10) * c for n, c in zip(HIST, CANDS)) == 10 * 5 + 7 * 0 + 10 * 8
    assert host.dup_total() == 20 * 5 + 31 * 8
    want = ranker_features(b, 10)
    b.host = host
    got = ranker_features(b, 10)
    assert got.length_per_key() == want.length_per_key() == [16, host.bag_total(10)]
    assert torch.equal(got.values(), want.values()) and torch.equal(got.lengths(), want.lengths())
    idx, off = gather_rows(b.cand_offsets, torch.tensor([3, 0, 0]), keep_last=4, total=12)
    idx2, off2 = gather_rows(b.cand_offsets, torch.tensor([3, 0, 0]), keep_last=4)
    assert torch.equal(idx, idx2) and torch.equal(off, off2)
    off = b.cand_offsets
    with shared_index():
        r1, p1 = jagged_index(off, 16)
        assert jagged_index(off, 16)[0] is r1  # built once inside the block
        assert jagged_index(off.clone(), 16)[0] is not r1  # another tensor: its own
    assert jagged_index(off, 16)[0] is not r1  # no cache outside the block
    assert torch.equal(jagged_index(off, 16)[0], r1) and torch.equal(jagged_index(off, 16)[1], p1)


def test_log_bucket_by_bucketize_is_the_float_formula():
    from pinfm_rec.model.features import bucket_bounds, log_bucket

    g = torch.cat([torch.arange(-5, 3000), torch.tensor([(1 << k) + d for k in range(62) for d in (-2, -1, 0, 1)]),
                   torch.randint(0, 2 ** 40, (5000,), generator=torch.Generator().manual_seed(0))])
    for nb in (32, 8):
        assert torch.equal(log_bucket(g, nb, bucket_bounds(nb)), log_bucket(g, nb))
    assert log_bucket(torch.tensor([0, 1, 3, 1000, -5, 10 ** 12]), 32, bucket_bounds()).tolist() == [0, 1, 2, 9, 0, 31]


@pytest.mark.parametrize("one_row", [None, True])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quant_ec_lookup_equals_torchrec_quant_module(dtype, one_row, monkeypatch):
    """Also with every index its own TBE bag (what CUDA runs: FBGEMM's n-bit kernel walks a bag on
    one warp): the same rows in the same order, equal and unequal per-feature counts."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from pinfm_rec.model.embedding import EmbeddingSpec, build_embedding_collection
    from pinfm_rec.model.pinfm import to_ec_kjt
    from pinfm_rec.model import quant_lookup
    from pinfm_rec.model.quant_lookup import is_quant_ec, quant_ec_lookup
    from pinfm_rec.serve.quantize import quantize_tables

    monkeypatch.setattr(quant_lookup, "ONE_ROW_BAGS", one_row)
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.ec = build_embedding_collection(EmbeddingSpec(dim=32), dict(num_items=300, num_actions=4, num_surfaces=3),
                                           device="cpu")
    quantize_tables(holder, dtype)
    assert is_quant_ec(holder.ec)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 0, 5, 3, 0, 5, 3, 0, 5, 2, 4, 1])  # item, action, surface, neg_item x 3 rows
    values = torch.cat([torch.randint(0, 300, (8,), generator=g), torch.randint(0, 4, (8,), generator=g),
                        torch.randint(0, 3, (8,), generator=g), torch.randint(0, 300, (7,), generator=g)])
    kjt = to_ec_kjt(KeyedJaggedTensor(keys=["item_id", "action", "surface", "neg_item_id"], values=values,
                                      lengths=lengths, stride=3))
    want = holder.ec(kjt)
    assert quant_ec_lookup(holder.ec, KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                                        stride=3)) is None  # no host lengths: torchrec's path
    got = quant_ec_lookup(holder.ec, kjt)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].values(), want[k].values()), k
        assert torch.equal(got[k].lengths(), want[k].lengths()), k


def test_host_id_check_names_the_feature_before_the_transfer(scorers):
    b = _batch(3)
    b.cand_item[2] = TINY["num_items"] + 5
    with pytest.raises(ValueError, match=r"neg_item_id.*id 2005 is outside"):
        scorers["fp32"].prepare(b)


def test_host_id_check_refuses_even_if_check_ids_lets_the_batch_pass(monkeypatch):
    # the host check skips the device check: it must never return on ids it found out of range
    from pinfm_rec.data import host_sizes
    from pinfm_rec.model import embedding

    b = _batch(4)
    b.cand_item[1] = -3
    monkeypatch.setattr(embedding, "check_ids", lambda kjt, sizes, mode="error": kjt)
    with pytest.raises(ValueError, match=r"'neg_item_id': ids must lie in \[0, 2000\), got min -3"):
        host_sizes.check_ids_on_host(b, {"t_item": TINY["num_items"]})


def test_cuda_graphs_on_cpu_are_a_no_op_with_a_message():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = hostprof.tiny_scorer("fp32", max_len=32, cuda_graphs=True)
    assert scorer.graphs is None
    assert any("--cuda-graphs needs a CUDA device" in str(w.message) for w in caught)
    from pinfm_rec.serve.scorer import Scorer

    b = _batch(4)
    got = scorer.logits(b)  # scores eagerly, as a scorer without graphs
    assert got.shape == (b.num_candidates,)
    torch.testing.assert_close(got, Scorer(scorer.model, 32).logits(b), atol=0, rtol=0)


def test_dlrm_interaction_indices_follow_the_scoring_device():
    # DLRM builds InteractionArch.triu_indices (a non-persistent buffer) on the CPU whatever its
    # dense_device: on a GPU every forward copied it to the device, which broke CUDA-graph capture
    from pinfm_rec.rankers.dlrm import place_interaction_indices

    scorer = hostprof.tiny_scorer("fp32", max_len=32)
    archs = [m for m in scorer.model.modules() if "triu_indices" in getattr(m, "_buffers", {})]
    assert archs, "the tiny ranker has no DLRM InteractionArch"
    before = [m.triu_indices.clone() for m in archs]
    place_interaction_indices(scorer.model, torch.device("cpu"))  # already there: the same tensors
    assert all(torch.equal(m.triu_indices, b) for m, b in zip(archs, before))
    place_interaction_indices(scorer.model, torch.device("meta"))
    for m, b in zip(archs, before):
        assert m.triu_indices.device.type == "meta" and m.triu_indices.shape == b.shape
        assert "triu_indices" in m._buffers  # still a buffer: .to()/state_dict handling unchanged
    # build_ranker places them on its dense_device (the training path on a GPU, too)
    from pinfm_rec.rankers.dlrm import RankerSpec, build_ranker

    for arch in ("dlrm", "dlrm_dcn"):
        spec = RankerSpec(arch=arch, embedding_dim=8, dense_arch=[16, 8], over_arch=[8, 1])
        r = build_ranker(spec, 50, 5, device="meta", dense_device="meta")
        idx = [m.triu_indices for m in r.modules() if "triu_indices" in getattr(m, "_buffers", {})]
        assert all(t.device.type == "meta" for t in idx) and (idx or arch == "dlrm_dcn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs, sync debug mode)")
@pytest.mark.parametrize("tables,amp", [("fp32", None), ("int8", None), ("fp32", torch.bfloat16)])
def test_cuda_graphs_replay_equals_eager_and_the_forward_does_not_sync(tables, amp):
    """amp: bf16 autocast, where the Scorer casts the Linear weights once (serve/precision.py)."""
    torch.manual_seed(0)
    eager = hostprof.tiny_scorer(tables, max_len=32, device="cuda")
    graphed = hostprof.tiny_scorer(tables, max_len=32, device="cuda", cuda_graphs=True, autocast=amp)
    if amp is None:
        graphed.model.load_state_dict(eager.model.state_dict())
    else:  # the graphed model's Linears are bf16 now: the eager one gets the same weights, cast alike
        eager.model.load_state_dict(graphed.model.state_dict())
        eager = type(eager)(eager.model, 32, "cuda", autocast=amp)
        assert eager.model.encoder.fm.trunk.layers[0].qkv.weight.dtype == amp
    assert graphed.graphs is not None
    full = [32] * 4
    for seed in range(3):  # one bucket, different contents: capture once, then replays of new inputs
        b = _batch(seed, hist=full, cands=[8, 8, 6, 8])
        torch.testing.assert_close(graphed.logits(b), eager.logits(b), atol=1e-4, rtol=1e-4)
    assert not graphed.graphs.failed, graphed.graphs.failed
    assert len(graphed.graphs.graphs) == 1 and graphed.graphs.replays == 3
    dev = eager.prepare(_batch(5))
    eager.forward(dev)
    res = hostprof.profile(lambda: eager.forward(dev), n=2, cuda=True)
    assert res["syncs_per_call"] == 0, res["sync_sites"]


def test_bench_markdown_keeps_the_hand_written_text(tmp_path):
    from pinfm_rec.serve.bench import BEGIN, END, write_markdown

    res = {"device": "cpu", "date": "d", "torch": "t", "rows": [], "cands_per_s_speedup_vs_dup_L2048_C256": 2.0,
           "cands_per_s_speedup_vs_flex_L2048_C256": None, "p99_ms_L2048_C256": 1.0,
           "int8_table_memory_ratio": 3.0, "int8_gauc_delta": 0.0}
    path = tmp_path / "serving.md"
    path.write_text(f"# Title\n\nhand text above\n\n{BEGIN}\nold table\n{END}\n\n## Hand section\nkept\n")
    write_markdown(str(path), res)
    text = path.read_text()
    assert "hand text above" in text and "## Hand section\nkept" in text and "old table" not in text
    assert text.count(BEGIN) == text.count(END) == 1 and "| cands_per_s_speedup_vs_dup_L2048_C256 | 2 |" in text
    write_markdown(str(path), res)
    assert path.read_text() == text  # idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("# Notes\nno markers\n")
    write_markdown(str(plain), res)
    assert plain.read_text().startswith("# Notes\nno markers\n\n" + BEGIN)


def test_innermost_site_names_the_innermost_frame_of_the_packages():
    # one helper for hostprof's op sites and graphs.py's capture-failure sites
    import traceback

    from pinfm_rec.serve import graphs
    from pinfm_rec.serve.hostprof import innermost_site
    fs = traceback.StackSummary.from_list([
        ("/x/site-packages/torchrec/models/dlrm.py", 220, "forward", None),
        ("/w/wt-3/pinfm_rec/serve/hostprof.py", 90, "__torch_dispatch__", None),
        ("/usr/lib/python3.12/functools.py", 10, "wrapper", None)])
    assert innermost_site(fs) == "torchrec/models/dlrm.py:220 forward"
    assert innermost_site(fs, ("nothing",)) == "/usr/lib/python3.12/functools.py:10 wrapper"
    assert innermost_site(traceback.StackSummary.from_list([])) == "?"

    def capture():
        raise RuntimeError("operation not permitted when stream is capturing")
    try:
        capture()
    except RuntimeError as e:
        where = graphs._where(e)
    # this test file is not in the packages: the innermost frame (capture) is named
    assert where.endswith("test_serve_host.py:" + str(capture.__code__.co_firstlineno + 1) + " capture")

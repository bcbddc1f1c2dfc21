"""Serving (issue 15): `pinfm score` on a tiny fine-tuned run equals the training recipe's forward,
bucketed padding leaves scores unchanged, int8/int4 tables (torchrec.quant), the exported program
in a fresh process, and the load benchmark's CPU mode."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from finetune_logits import training_logits

from pinfm_rec.errors import DataError
from pinfm_rec.serve.model_io import load_finetuned
from pinfm_rec.serve.requests_io import RequestFile, write_request_file
from pinfm_rec.serve.scorer import Scorer, bucket_sizes, pad_batch

FT = {
    "name": "ft-serve", "seed": 0, "tensorboard": False,
    "data": {"source": "synthetic", "max_len": 30, "batch_size": 32, "eval_batch_size": 64,
             "synthetic": {"num_requests": 400, "num_items": 300, "mean_len": 20, "candidates_next": 4,
                           "negatives_per_request": 12}},
    "model": {"embedding": {"dim": 32}, "trunk": {"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1,
                                                  "max_len": 30}},
    "encoder": {"init": "random", "out_dim": 16, "cand_id_dropout": 0.1},
    "ranker": {"arch": "dlrm", "embedding_dim": 16, "dense_arch": [32, 16], "over_arch": [32, 1],
               "history_bag_len": 10},
    "train": {"epochs": 1, "lr": 0.002, "warmup_steps": 2, "log_every": 5, "eval_every_epochs": 0,
              "eval_max_batches": 1},
    "checkpoint": {"every_steps": 0},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fine-tuned run (10 CPU steps) and its test split as a request file."""
    from pinfm_rec.spec import from_dict
    from pinfm_rec.train.finetune import FinetuneSpec, finetune

    tmp = tmp_path_factory.mktemp("serve")
    raw = {**FT, "run_dir": str(tmp / "ft"), "data": {**FT["data"], "cache_dir": str(tmp / "cache")}}
    spec = from_dict(FinetuneSpec, raw)
    finetune(spec, force_cpu=True)
    root = glob.glob(str(tmp / "cache" / "ranking-*"))[0]
    req = str(tmp / "requests.parquet")
    write_request_file(root, "test", req)
    return {"dir": str(tmp / "ft"), "spec": spec, "root": root, "requests": req, "tmp": tmp}




def test_score_cli_equals_training_forward_and_is_deterministic(run):
    from pinfm_rec.cli import main

    outs = []
    for i, extra in enumerate([[], [], ["--no-buckets", "--batch-requests", "7"]]):
        path = str(run["tmp"] / f"scores{i}.parquet")
        assert main(["score", "--run", run["dir"], "--input", run["requests"], "--output", path, "--cpu",
                     "--batch-requests", "16", *extra]) == 0
        outs.append(pq.read_table(path).to_pydict())
    got = outs[0]
    assert set(got) == {"request_id", "cand_index", "item_id", "score", "logit", "label"}
    assert got == outs[1]  # deterministic, bit for bit
    np.testing.assert_allclose(outs[2]["logit"], got["logit"], atol=1e-5)  # buckets/batching do not matter
    loaded = load_finetuned(run["dir"])
    ref = training_logits(run["spec"], loaded.checkpoint)
    assert len(ref) == len(got["logit"]) > 100
    mine = np.array(got["logit"])
    theirs = np.array([ref[(r, j)] for r, j in zip(got["request_id"], got["cand_index"])])
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got["score"], 1 / (1 + np.exp(-mine)), rtol=1e-6)
    # items and labels are the request file's, in order
    req = pq.read_table(run["requests"]).to_pydict()
    assert got["item_id"] == [i for row in req["cand_item"] for i in row]
    assert got["label"] == [y for row in req["cand_label"] for y in row]


def test_pad_batch_buckets_keep_scores(run):
    loaded = load_finetuned(run["dir"])
    req = RequestFile(run["requests"], loaded.num_dense)
    batch, _ = next(req.batches(5, loaded.max_len))
    n_cap = loaded.model.encoder.fm.trunk.spec.max_len
    sizes = bucket_sizes(batch, n_cap)
    u, length, c, n, mc = sizes
    assert all(x & (x - 1) == 0 or x == n_cap for x in sizes) and u > batch.num_requests
    padded = pad_batch(batch, n_cap)
    assert (padded.num_requests, padded.history.timestamps.numel(), padded.num_candidates) == (u, length, c)
    with torch.no_grad():
        plain = loaded.model.logits(batch)
        pad = loaded.model.logits(padded)[: batch.num_candidates]
    torch.testing.assert_close(pad, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(batch, n_cap, (batch.num_requests, length, c, n, mc))


def test_request_file_errors(run, tmp_path):
    import pyarrow as pa

    t = pq.read_table(run["requests"])
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(t.drop(["hist_ts"]), bad)
    with pytest.raises(DataError, match="hist_ts"):
        RequestFile(bad, 3)
    pq.write_table(t.drop(["cand_dense"]), bad)
    with pytest.raises(DataError, match="cand_dense"):
        RequestFile(bad, 3)
    short = t.set_column(t.column_names.index("hist_action"), "hist_action",
                         pa.array([r[:-1] for r in t.column("hist_action").to_pylist()], pa.list_(pa.int64())))
    pq.write_table(short, bad)
    with pytest.raises(DataError, match="hist_action"):
        RequestFile(bad, 3)


def test_quantized_tables_memory_and_quality(run):
    """int8 / int4 / fp16 tables through torchrec.quant (FBGEMM TBE on CPU): scores stay close,
    GAUC moves <= 0.001 for int8, memory follows FBGEMM's row layout (D=32 encoder item rows, D=16
    ranker rows: 4*D / align16(D + 4) = 2.67x and 2.0x for int8)."""
    from pinfm_rec.serve.quantize import quality_delta, quantize_tables, table_bytes

    loaded = load_finetuned(run["dir"])
    valid = str(run["tmp"] / "valid.parquet")
    write_request_file(run["root"], "valid", valid)
    batches = [b for b, _ in RequestFile(valid, loaded.num_dense).batches(64, loaded.max_len)]
    res = quality_delta(loaded.model, batches, ("fp16", "int8", "int4", "mixed"))
    assert abs(res["int8"]["gauc_delta"]) <= 0.001 and abs(res["int8"]["auc_delta"]) <= 0.001
    assert res["fp16"]["memory_ratio"] == pytest.approx(2.0)
    assert 2.0 < res["int8"]["memory_ratio"] < 2.67 < res["int4"]["memory_ratio"]
    # mixed: the D=16 ranker tables int4 (4x), the D=32 encoder tables int8 (2.67x): in between
    assert res["int8"]["memory_ratio"] < res["mixed"]["memory_ratio"] < res["int4"]["memory_ratio"]
    # (int4 rows move the score of a few of this tiny split's requests: GAUC moves in steps of ~1e-3)
    assert abs(res["mixed"]["gauc_delta"]) <= 0.005 and abs(res["mixed"]["auc_delta"]) <= 0.002
    assert res["fp32"]["table_bytes"] == table_bytes(loaded.model) > 0
    with pytest.raises(ValueError, match="bf16"):
        quantize_tables(loaded.model, "bf16")


def test_exported_program_loads_in_a_fresh_process(run, tmp_path):
    """torch.export of the int8 scorer, saved as .pt2, loaded in a new interpreter that imports only
    torch and pinfm_rec.serve.ops (no model, ranker or torchrec code): same logits as the scorer."""
    from pinfm_rec.serve.export import batch_inputs, export_scorer
    from pinfm_rec.serve.quantize import quantize_tables

    loaded = load_finetuned(run["dir"])
    quantize_tables(loaded.model, "int8")
    req = RequestFile(run["requests"], loaded.num_dense)
    batch, _ = next(req.batches(16, loaded.max_len))
    scorer = Scorer(loaded.model, loaded.max_len)
    want = scorer.logits(batch)
    padded = pad_batch(batch, scorer.n_cap)
    path = str(tmp_path / "scorer.pt2")
    export_scorer(loaded.model, padded, path)
    torch.save(batch_inputs(padded), str(tmp_path / "inputs.pt"))
    code = (
        "import sys, json, torch, pinfm_rec.serve.ops\n"
        f"p = torch.export.load({path!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "with torch.no_grad(): y = p(*x)\n"
        f"torch.save(y, {str(tmp_path / 'out.pt')!r})\n"
        "print(json.dumps(sorted({m.split('.')[0] + '.' + (m.split('.') + [''])[1] for m in sys.modules "
        "if m.startswith(('pinfm_rec', 'torchrec'))})))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    mods = json.loads(res.stdout.strip().splitlines()[-1])
    assert not [m for m in mods if m.startswith("torchrec") or m in ("pinfm_rec.model", "pinfm_rec.rankers",
                                                                    "pinfm_rec.train", "pinfm_rec.data")], mods
    got = torch.load(str(tmp_path / "out.pt"))[: batch.num_candidates]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_load_bench_cpu_tiny_mode(tmp_path):
    from pinfm_rec.serve.bench import main

    out = str(tmp_path / "serving.json")
    res = main(["--tiny", "--out", out, "--md", str(tmp_path / "serving.md")])
    with open(out) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(res))
    for key in ("cands_per_s_speedup_vs_dup_L2048_C256", "cands_per_s_speedup_vs_flex_L2048_C256", "int8_gauc_delta",
                "int8_table_memory_ratio", "p99_ms_L2048_C256", "device"):
        assert key in saved
    rows = saved["rows"]
    assert {r["method"] for r in rows} == {"dcat", "dup_sdpa", "masked_sdpa", "flex"}
    assert all(r["cands_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert all(r["prepare_ms"] > 0 for r in rows)  # the host preparation, reported beside the service time
    # the methods compute the same scores (checked by the bench itself before timing)
    assert all(r["max_abs_diff_vs_dcat"] < 1e-4 for r in rows if r["precision"] == "fp32")
    assert saved["int8_table_memory_ratio_encoder"] > 3.5 > saved["int8_table_memory_ratio"] > 3.0  # D=128 / +D=16
    assert saved["mixed_table_memory_ratio"] > 3.6  # the D=16 tables int4
    assert os.path.isfile(str(tmp_path / "serving.md"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DCAT Triton kernel, FBGEMM TBE on the GPU)")
@pytest.mark.parametrize("graphs", [False, True])
def test_pipelined_score_file_on_cuda_equals_the_cpu_scores(run, graphs, tmp_path):
    """score_file on CUDA prepares batch i+1 while batch i runs and reads i's scores from pinned
    memory after an event: every batch's scores land in its rows (several batches, the last one
    partial; CUDA graphs replayed into one output buffer or not), equal to the CPU scorer's."""
    cpu = load_finetuned(run["dir"])
    gpu = load_finetuned(run["dir"], device="cuda")
    req = RequestFile(run["requests"], cpu.num_dense)
    Scorer(cpu.model, cpu.max_len).score_file(req, str(tmp_path / "cpu.parquet"), 7)
    stats = Scorer(gpu.model, gpu.max_len, "cuda", cuda_graphs=graphs).score_file(
        req, str(tmp_path / "gpu.parquet"), 7)
    want = pq.read_table(str(tmp_path / "cpu.parquet")).to_pydict()
    got = pq.read_table(str(tmp_path / "gpu.parquet")).to_pydict()
    assert stats["requests"] > 2 * 7 and got["request_id"] == want["request_id"]
    assert got["cand_index"] == want["cand_index"]
    np.testing.assert_allclose(got["logit"], want["logit"], atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DCAT Triton kernel, FBGEMM TBE on the GPU)")
@pytest.mark.parametrize("tables", ["fp32", "int8"])
def test_scorer_and_export_on_cuda_match_cpu(run, tables, tmp_path):
    """On the GPU (DCAT Triton kernel, TBE on CUDA) the scorer and its exported program give the CPU
    scorer's logits (fp32 compute)."""
    from pinfm_rec.serve.export import batch_inputs, export_scorer
    from pinfm_rec.serve.quantize import quantize_tables

    cpu = load_finetuned(run["dir"])
    gpu = load_finetuned(run["dir"], device="cuda")
    assert gpu.model.encoder.spec.kernel == "auto"
    for ld in (cpu, gpu):
        quantize_tables(ld.model, tables)
    req = RequestFile(run["requests"], cpu.num_dense)
    batch, _ = next(req.batches(16, cpu.max_len))
    want = Scorer(cpu.model, cpu.max_len).logits(batch)
    scorer = Scorer(gpu.model, gpu.max_len, "cuda")
    torch.testing.assert_close(scorer.logits(batch), want, atol=2e-4, rtol=1e-4)
    padded = pad_batch(batch, scorer.n_cap)
    ep = export_scorer(gpu.model, padded.to(torch.device("cuda")), str(tmp_path / "scorer.pt2"))
    with torch.no_grad():
        got = ep.module()(*batch_inputs(padded.to(torch.device("cuda"))))[: batch.num_candidates]
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-4, rtol=1e-4)


def test_score_refuses_request_ids_the_model_cannot_take(run, tmp_path):
    """A dense-id run (data.raw_ids=false, id_mode error): an id outside the ranker's tables (e.g. a raw
    64-bit id) is a DataError naming the file, row, column and id, and `pinfm score` exits 2."""
    import pyarrow as pa

    from pinfm_rec.cli import main

    loaded = load_finetuned(run["dir"])
    upper, what = loaded.item_id_rule()
    assert upper == 300 and "dense" in what
    t = pq.read_table(run["requests"])
    hist = t.column("hist_item").to_pylist()
    hist[2][-1] = 2**40 + 7919
    bad = str(tmp_path / "raw.parquet")
    pq.write_table(t.set_column(t.column_names.index("hist_item"), "hist_item", pa.array(hist, pa.list_(pa.int64()))),
                   bad)
    with pytest.raises(DataError, match=rf"raw.parquet: row 2 .*hist_item id {2**40 + 7919} .*\[0, 300\)"):
        RequestFile(bad, loaded.num_dense).check_item_ids(upper, what)
    assert main(["score", "--run", run["dir"], "--input", bad, "--output", str(tmp_path / "s.parquet"),
                 "--cpu"]) == 2
    RequestFile(run["requests"], loaded.num_dense).check_item_ids(upper, what)  # its own ids pass


def test_bf16_score_and_export_cli_writes_a_runnable_fp32_program(run, tmp_path):
    """`pinfm score --bf16 --export`: the Scorer's bf16 autocast casts the model's Linear weights in
    place (serve/precision.py); the export is taken before (and export_scorer casts any pre-cast
    Linear back), so the program runs without autocast and gives the fp32 scores."""
    from pinfm_rec.cli import main
    from pinfm_rec.serve.export import batch_inputs, export_scorer
    from pinfm_rec.serve.precision import precast_linears

    pt2 = str(tmp_path / "scorer.pt2")
    assert main(["score", "--run", run["dir"], "--input", run["requests"], "--output", str(tmp_path / "s.parquet"),
                 "--cpu", "--bf16", "--export", pt2, "--batch-requests", "16"]) == 0
    loaded = load_finetuned(run["dir"])
    req = RequestFile(run["requests"], loaded.num_dense)
    batch, _ = next(req.batches(16, loaded.max_len))
    scorer = Scorer(loaded.model, loaded.max_len)  # fp32
    want = scorer.logits(batch)
    padded = pad_batch(batch, scorer.n_cap)
    with torch.no_grad():
        got = torch.export.load(pt2).module()(*batch_inputs(padded))[: batch.num_candidates]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a model already cast for bf16 scoring still exports to a program that runs without autocast
    precast_linears(loaded.model, torch.bfloat16)
    ep = export_scorer(loaded.model, padded, str(tmp_path / "cast.pt2"))
    with torch.no_grad():
        out = ep.module()(*batch_inputs(padded))[: batch.num_candidates]
    torch.testing.assert_close(out, want, atol=0.05, rtol=0.05)  # bf16-rounded weights, fp32 compute
    with pytest.raises(ValueError, match="round twice"):
        precast_linears(loaded.model, torch.float16)


def test_int8_export_with_one_row_bags_matches_the_scorer(run, tmp_path, monkeypatch):
    """The one-row-bag TBE layout (CUDA's default, forced here on CPU) builds its offsets from the
    per-table counts: under torch.export they are symbolic, and the traced program takes the request
    bags instead (2026-12-06 GPU suite: the export guarded on a data-dependent max and failed). The
    exported int8 program still gives the scorer's logits."""
    from pinfm_rec.model import quant_lookup
    from pinfm_rec.serve.export import batch_inputs, export_scorer
    from pinfm_rec.serve.quantize import quantize_tables

    monkeypatch.setattr(quant_lookup, "ONE_ROW_BAGS", True)
    ld = load_finetuned(run["dir"])
    quantize_tables(ld.model, "int8")
    batch, _ = next(RequestFile(run["requests"], ld.num_dense).batches(16, ld.max_len))
    scorer = Scorer(ld.model, ld.max_len)
    want = scorer.logits(batch)
    padded = pad_batch(batch, scorer.n_cap)
    ep = export_scorer(ld.model, padded, str(tmp_path / "scorer.pt2"))
    with torch.no_grad():
        got = ep.module()(*batch_inputs(padded))[: batch.num_candidates]
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)

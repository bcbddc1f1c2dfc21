"""Fine-tuning throughput: request dedup + DCAT vs the flat layout.

Both train the same DMP-sharded ``RankerWithEncoder`` (DLRM + PinFMEncoder) on the same candidates:

* dedup: a batch of U requests, each history once; context pass once per request, DCAT crossing
  per candidate (``mode="dcat"``);
* flat: the same candidates in the flat one-row-per-candidate layout (``flatten_batch``: the
  history repeated in every row, looked up and encoded per candidate, full causal self-attention
  over history + candidate, ``mode="flat"``).

Training examples/s (= candidates/s, forward + backward + optimizer step) at several candidates
per request, with a fixed number of candidates per step. Prints a table and writes JSON.

    python -m pinfm_rec.train.finetune_bench --out ft_bench.json            # GPU
    python -m pinfm_rec.train.finetune_bench --tiny                         # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List

import torch

from pinfm_rec.data.ranking_batch import RankingBatch, flatten_batch, random_ranking_batch
from pinfm_rec.model.embedding import EmbeddingSpec, TableSpec
from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder
from pinfm_rec.model.pinfm import ModelSpec
from pinfm_rec.model.trunk import TrunkSpec
from pinfm_rec.parallel import ParallelSpec, init_distributed, shard_model, shutdown_distributed
from pinfm_rec.rankers.dlrm import RankerSpec, RankerWithEncoder, build_ranker
from pinfm_rec.train.finetune import FinetuneSpec, _dense_optimizer


def build(num_items: int, d_model: int, n_layers: int, n_heads: int, hist: int, env, opt: str):
    ms = ModelSpec(embedding=EmbeddingSpec(dim=64, item=TableSpec(sharding="row_wise")),
                   trunk=TrunkSpec(d_model=d_model, n_layers=n_layers, n_heads=n_heads, dropout=0.0, max_len=hist))
    enc = PinFMEncoder(ms, EncoderSpec(out_dim=32), dict(num_items=num_items, num_actions=4, num_surfaces=4),
                       device="meta", dense_device=env.device)
    rs = RankerSpec()
    ranker = build_ranker(rs, num_items, 3 + 32, device="meta", dense_device=env.device)
    model = RankerWithEncoder(ranker, enc, rs.history_bag_len)
    ps = ParallelSpec(embedding_optimizer=opt, embedding_lr=0.01)
    dmp, _ = shard_model(model, ps, env, {"t_item": "row_wise"}, batch_size=1024)
    spec = FinetuneSpec()
    optimizer, dense_opt = _dense_optimizer(dmp, spec)
    return dmp, optimizer


def time_steps(dmp, optimizer, batches: List[RankingBatch], mode: str, steps: int, warmup: int,
               device: torch.device, autocast) -> float:
    """Seconds per training step (median-free mean over ``steps`` after ``warmup``)."""
    dmp.module.mode = mode
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        b = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = dmp(b)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--tiny", action="store_true", help="small sizes (CPU smoke)")
    ap.add_argument("--cands", default="8,32,128", help="candidates per request")
    ap.add_argument("--cands-per-step", type=int, default=2048)
    ap.add_argument("--hist", type=int, default=256, help="history tokens per request")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one dedup step")
    args = ap.parse_args(argv)
    d_model, n_layers, n_heads, num_items = 256, 4, 4, 100_000
    if args.tiny:
        d_model, n_layers, n_heads, num_items = 32, 2, 2, 1000
        args.cands_per_step, args.hist, args.steps, args.cands = 64, 16, 2, "8,32"
    env = init_distributed(ParallelSpec())
    dev = env.device
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    opt = "adam" if dev.type == "cuda" else "rowwise_adagrad"
    dmp, optimizer = build(num_items, d_model, n_layers, n_heads, args.hist, env, opt)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for c in [int(x) for x in args.cands.split(",")]:
        u = max(1, args.cands_per_step // c)
        dedup = [random_ranking_batch(gen, [args.hist] * u, [c] * u, num_items=num_items, num_dense=3).to(dev)
                 for _ in range(3)]
        flat = [flatten_batch(b) for b in dedup]
        t_d = time_steps(dmp, optimizer, dedup, "dcat", args.steps, 3, dev, autocast)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                time_steps(dmp, optimizer, dedup, "dcat", 2, 0, dev, autocast)
            key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
        t_f = time_steps(dmp, optimizer, flat, "flat", args.steps, 3, dev, autocast)
        n = u * c
        rows.append({"cands_per_request": c, "requests_per_step": u, "examples_per_step": n,
                     "dedup_examples_per_s": n / t_d, "flat_examples_per_s": n / t_f,
                     "dedup_step_ms": 1e3 * t_d, "flat_step_ms": 1e3 * t_f, "speedup": t_f / t_d})
        r = rows[-1]
        print(f"C/request {c:4d}: dedup+DCAT {r['dedup_examples_per_s']:10.0f} ex/s ({r['dedup_step_ms']:.1f} ms)"
              f" | flat {r['flat_examples_per_s']:10.0f} ex/s ({r['flat_step_ms']:.1f} ms) | {r['speedup']:.2f}x",
              flush=True)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "history_tokens": args.hist, "d_model": d_model, "n_layers": n_layers,
           "n_heads": n_heads, "num_items": num_items, "rows": rows}
    print("| C/request | requests/step | dedup+DCAT ex/s | flat ex/s | speedup |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cands_per_request']} | {r['requests_per_step']} | {r['dedup_examples_per_s']:.0f} | "
              f"{r['flat_examples_per_s']:.0f} | {r['speedup']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    shutdown_distributed()
    return res


if __name__ == "__main__":
    main()

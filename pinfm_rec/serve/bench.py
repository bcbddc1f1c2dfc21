"""Load benchmark of the serving path: ours (context once + DCAT) against its peers.

    python -m pinfm_rec.serve.bench --out docs/benchmarks/serving.json --md docs/benchmarks/serving.md
    python -m pinfm_rec.serve.bench --tiny ...          # CPU smoke (tests)

One request = a history of L events and C candidates, scored by the full fine-tuned model shape
(PinFM encoder, H=8, Dh=64 on the GPU, + DLRM ranker; random weights: speed does not depend on
them). Methods, all through the same ``RankerWithEncoder.logits`` (checked to give the same scores
before timing):

    dcat         ours: context pass once, per-layer K/V cache, candidates through the DCAT op
    dup_sdpa     (a) the history duplicated per candidate, full causal forward with SDPA
                 (FlashAttention on the GPU): the encoder's ``mode="flat"``
    masked_sdpa  (b) the candidates appended after the history as tokens, one SDPA per layer over
                 [history; candidates] with the mask "history or itself" (no DCAT op, no
                 flash: a dense mask)
    flex         (c) the crossing by compiled ``flex_attention`` with the same block mask
                 (``pinfm_rec.kernels.dcat.peers.flex_dcat``)

Each (method, L, C, precision) is timed per request (service time, CUDA-synchronised, after
warm-up; at least ``iters`` calls and ``min_s`` seconds), eagerly or, with ``--cuda-graphs``, every
method alike through one CUDA graph per shape (``serve/graphs.py``; a failed capture is timed
eagerly and named in its row); the request's host preparation (``Scorer.prepare``: id checks, host
sizes, the ranker's sparse KJT, packing, the transfer) is not in the service time (the same for
every method, overlapped with the previous request's GPU work in a service) and is reported per
shape as ``prepare_ms``; throughput = 1 / mean service time (requests/s) and C / mean
(candidates/s). Latency at fixed offered loads: Poisson arrivals at ``--loads`` x ours' capacity (the same absolute rate for
every method) through a single-server FIFO queue fed with the measured service times (Lindley
recursion); p50 / p99 of wait + service, or "overloaded" when the load exceeds the method's
capacity. Precisions: bf16 (autocast, fp32 tables) and int8 (bf16 + int8 tables, torchrec.quant).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

GPU = dict(d_model=512, n_heads=8, n_layers=2, dim=128, num_items=100_000, Ls=(512, 2048, 16384),
           Cs=(64, 256, 1024), iters=20, warmup=3, min_s=0.5)
TINY = dict(d_model=32, n_heads=2, n_layers=2, dim=128, num_items=2000, Ls=(32,), Cs=(8,), iters=4, warmup=1,
            min_s=0.0)
MAX_DUP_TOKENS = 1 << 22  # dup_sdpa materialises L*C tokens per layer: skipped past this
METHODS = ("dcat", "dup_sdpa", "masked_sdpa", "flex")


def build(cfg: dict, max_len: int, device: torch.device):
    """A RankerWithEncoder of the benchmark's size (random weights, eval mode)."""
    from pinfm_rec.model.embedding import EmbeddingSpec
    from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder
    from pinfm_rec.model.pinfm import ModelSpec
    from pinfm_rec.model.trunk import TrunkSpec
    from pinfm_rec.rankers.dlrm import RankerSpec, RankerWithEncoder, build_ranker

    ms = ModelSpec(embedding=EmbeddingSpec(dim=cfg["dim"]),
                   trunk=TrunkSpec(d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                                   dropout=0.0, max_len=max_len))
    kernel = "auto" if device.type == "cuda" else "pytorch"
    vocab = dict(num_items=cfg["num_items"], num_actions=4, num_surfaces=3)
    enc = PinFMEncoder(ms, EncoderSpec(init="random", out_dim=32, kernel=kernel), vocab, device=device,
                       dense_device=device)
    rs = RankerSpec(embedding_dim=16, dense_arch=[64, 16], over_arch=[64, 1], history_bag_len=50)
    ranker = build_ranker(rs, cfg["num_items"], 3 + 32, device=device, dense_device=device)
    return RankerWithEncoder(ranker, enc, rs.history_bag_len).eval()


def masked_sdpa(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, *, scale, R, L, C, **_):
    """(b): per request, SDPA of the C candidates over [history (L); candidates (C)] with the mask
    "kv < L or kv - L == q" (equal lengths per request). [R*C, H, Dh] -> [R*C, H, Dh]."""
    from pinfm_rec.kernels.dcat.peers import flex_inputs

    q4, k4, v4 = flex_inputs(q, k, v, k_ctx, v_ctx, R, L, C)
    kv = torch.arange(L + C, device=q.device)
    mask = (kv[None, :] < L) | (kv[None, :] - L == torch.arange(C, device=q.device)[:, None])  # [C, L+C]
    o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)  # [R, H, C, Dh]
    return o.transpose(1, 2).reshape(R * C, *q.shape[1:])


def flex_attn(q, k, v, k_ctx, v_ctx, cand_offsets, ctx_offsets, *, fn, R, L, C, **_):
    """(c): the crossing by flex_attention (``peers.flex_dcat``'s compiled function)."""
    from pinfm_rec.kernels.dcat.peers import flex_inputs

    o = fn(*flex_inputs(q, k, v, k_ctx, v_ctx, R, L, C))  # [R, H, C, Dh]
    return o.transpose(1, 2).reshape(R * C, *q.shape[1:]).to(q.dtype)


@contextlib.contextmanager
def method(model, name: str, R: int, L: int, C: int, device: torch.device):
    """The model set up to score with ``name`` (METHODS)."""
    trunk = model.encoder.fm.trunk
    model.mode = "flat" if name == "dup_sdpa" else "dcat"
    if name in ("masked_sdpa", "flex"):
        if name == "flex":
            from pinfm_rec.kernels.dcat.peers import flex_dcat

            fn = flex_dcat(R, L, C, device=device.type, compile=device.type == "cuda")
            if fn is None:
                raise RuntimeError("flex_attention unavailable in this torch")
            attn = functools.partial(flex_attn, fn=fn, R=R, L=L, C=C)
        else:
            attn = functools.partial(masked_sdpa, R=R, L=L, C=C)
        trunk.score_candidates = functools.partial(type(trunk).score_candidates, trunk, attn_fn=attn)
    try:
        yield model
    finally:
        model.mode = "dcat"
        trunk.__dict__.pop("score_candidates", None)


def service_times(fn, iters: int, warmup: int, device: torch.device, min_s: float = 0.0,
                  max_iters: int = 2000) -> np.ndarray:
    """Seconds per call of fn (synchronised), after ``warmup`` calls: ``iters`` calls, more until
    ``min_s`` seconds are timed (at most ``max_iters``): a sub-millisecond method gets hundreds of
    samples (run-to-run noise of a 20-call mean was ~70 us at 1 ms, level with the differences
    between methods), a 0.5 s one its ``iters``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out: List[float] = []
    total = 0.0
    while len(out) < iters or (total < min_s and len(out) < max_iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
        total += out[-1]
    return np.array(out)


def prepare_ms(scorer, batch, device: torch.device, n: int = 20) -> float:
    """Median ms of ``scorer.prepare(batch)`` (the request's host preparation: id checks, host
    sizes, the ranker's sparse features, packing and the transfer; synchronised): not part of the
    service times (every method shares it; a service overlaps it with the previous request's GPU
    work), reported beside them."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        scorer.prepare(batch)
        sync()
        out.append(time.perf_counter() - t0)
    return float(np.median(out[2:]) * 1e3)


def queue_latency(service: np.ndarray, rate: float, n: int = 2000, seed: int = 0) -> Optional[Dict[str, float]]:
    """p50/p99 (ms) of wait + service in a FIFO single server at Poisson ``rate`` (requests/s),
    service times drawn from the measured ones; None when rate >= capacity (overloaded)."""
    if rate * service.mean() >= 1.0:
        return None
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    s = rng.choice(service, n)
    done = np.empty(n)
    free = 0.0
    for i in range(n):
        start = max(arrivals[i], free)
        free = done[i] = start + s[i]
    lat = (done - arrivals) * 1e3
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def run(cfg: dict, device: torch.device, loads=(0.5, 0.8), methods=METHODS, precisions=("bf16", "int8"),
        log=print, on_shape=None, cuda_graphs: bool = False, compile: bool = False) -> List[dict]:
    """Rows of every (L, C, precision, method); ``on_shape(rows)`` after each (L, C) (partial saves).
    Batches are prepared as the scorer does (``Scorer.prepare``: host sizes, ids checked on the
    host) once, outside the timing. cuda_graphs: every method through ``serve/graphs.py`` (ours
    and the peers alike: a comparison of graphed ours with eager peers would measure the graphs,
    not the methods); a method whose capture fails is timed eagerly and its row says why.
    compile: ``scorer.compile_hot_path`` on the model first (the blocks' LayerNorm + projections +
    FFN and the ranker's MLPs, torch.compile with static shapes): every method runs through the
    same compiled pieces, only the attention differs; int8 is then not timed (a compiled model is
    not deep-copied for the quantized tables)."""
    from pinfm_rec.data.ranking_batch import random_ranking_batch
    from pinfm_rec.serve.quantize import quantize_tables
    from pinfm_rec.serve.scorer import Scorer

    rows: List[dict] = []
    max_len = max(cfg["Ls"])
    base = build(cfg, max_len, device)
    quant = None
    amp = torch.bfloat16 if device.type == "cuda" else None
    if amp is not None:  # as the Scorer does under autocast: Linear weights cast once (serve/precision.py)
        from pinfm_rec.serve.precision import precast_linears

        precast_linears(base, amp)
    if compile:
        from pinfm_rec.kernels.dcat.peers import _allow_recompiles
        from pinfm_rec.serve.scorer import compile_hot_path

        _allow_recompiles(256)  # one static-shape compile per (layer piece, L or C): past 8, eager
        compile_hot_path(base)
        precisions = tuple(p for p in precisions if p != "int8")
    for L in cfg["Ls"]:
        for C in cfg["Cs"]:
            gen = torch.Generator().manual_seed(L * 7919 + C)
            batch = random_ranking_batch(gen, [L], [C], num_items=cfg["num_items"], num_dense=3)
            scorer = Scorer(base, max_len, device, buckets=False)
            prep_ms = prepare_ms(scorer, batch, device)
            batch = scorer.prepare(batch)
            ref, capacity = None, None
            for prec in precisions:
                if prec == "int8" and quant is None:
                    try:
                        quant = quantize_tables(copy.deepcopy(base), "int8")  # FBGEMM TBE on the device
                    except Exception as e:  # noqa: BLE001 - reported in the rows
                        quant = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if prec == "int8" and isinstance(quant, str):
                    rows.append({"method": "dcat", "precision": "int8", "L": L, "C": C, "skipped": quant})
                    continue
                model = quant if prec == "int8" else base
                for name in methods:
                    if prec == "int8" and name != "dcat":
                        continue  # tables are the same for every method: int8 is timed for ours
                    label = prec if prec == "int8" or amp else "fp32"  # no autocast on CPU
                    row = {"method": name, "precision": label, "L": L, "C": C, "prepare_ms": prep_ms,
                           **({"compiled": True} if compile else {})}
                    if name == "dup_sdpa" and L * C > MAX_DUP_TOKENS:
                        rows.append({**row, "skipped": f"L*C = {L * C} tokens per layer > {MAX_DUP_TOKENS}"})
                        continue
                    fn, graphed = model.logits, None
                    if cuda_graphs and device.type == "cuda":
                        from pinfm_rec.serve.graphs import GraphedLogits

                        fn = graphed = GraphedLogits(model, device, amp)
                    try:
                        with method(model, name, 1, L, C, device), torch.no_grad(), \
                                torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                            out = fn(batch).float()
                            ref = out if ref is None else ref
                            st = service_times(lambda: fn(batch), cfg["iters"], cfg["warmup"], device,
                                               min_s=cfg.get("min_s", 0.0))
                    except (RuntimeError, torch.OutOfMemoryError) as e:  # report, keep going
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append({**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                        continue
                    mean = float(st.mean())
                    if capacity is None:  # ours (the first method) sets the offered loads
                        capacity = 1.0 / mean
                    if graphed is not None:  # True, or why the capture failed (then timed eagerly)
                        row["cuda_graph"] = not graphed.failed or next(iter(graphed.failed.values()))
                    row.update(requests_per_s=1.0 / mean, cands_per_s=C / mean, mean_ms=mean * 1e3,
                               p50_ms=float(np.percentile(st, 50) * 1e3), p99_ms=float(np.percentile(st, 99) * 1e3),
                               max_abs_diff_vs_dcat=float((out - ref).abs().max()),
                               loads={f"{f:g}": queue_latency(st, f * capacity) for f in loads})
                    rows.append(row)
                    log(f"{name:12s} {label:5s} L={L:6d} C={C:5d} {row['cands_per_s']:12.0f} cands/s "
                        f"mean {row['mean_ms']:.3f} ms  diff {row['max_abs_diff_vs_dcat']:.2e}"
                        + ("" if graphed is None else f"  graph {row['cuda_graph']}"))
                    if graphed is not None:  # this method's graphs and their memory pool go now
                        del fn, graphed
                        torch.cuda.empty_cache()
            if on_shape is not None:
                on_shape(rows)
    return rows


def _find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items()) and "skipped" not in r), None)


def summary(rows: List[dict], cfg: dict, device: torch.device, quality: Optional[dict]) -> dict:
    """The keys issue 15 asks for, at L=2048, C=256 (the tiny mode: its largest L and C)."""
    from pinfm_rec.serve.quantize import quantize_tables, table_bytes

    L = 2048 if 2048 in cfg["Ls"] else max(cfg["Ls"])
    C = 256 if 256 in cfg["Cs"] else max(cfg["Cs"])
    ours = next((r for r in rows if r["method"] == "dcat" and r["precision"] != "int8" and (r["L"], r["C"]) == (L, C)
                 and "skipped" not in r), None)
    dup, flex = _find(rows, method="dup_sdpa", L=L, C=C), _find(rows, method="flex", L=L, C=C)
    model = build({**cfg, "d_model": 32, "n_heads": 2}, 8, torch.device("cpu"))  # tables only matter here
    fp32, fp32_enc = table_bytes(model), table_bytes(model.encoder)
    mixed = quantize_tables(copy.deepcopy(model), "mixed")
    quantize_tables(model, "int8")
    ratio, ratio_enc = fp32 / table_bytes(model), fp32_enc / table_bytes(model.encoder)

    def speedup(other):
        return ours["cands_per_s"] / other["cands_per_s"] if ours and other else None

    at = (ours or {}).get("loads", {}).get("0.5") or {}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "anchor": {"L": L, "C": C},
        "cands_per_s_speedup_vs_dup_L2048_C256": speedup(dup),
        "cands_per_s_speedup_vs_flex_L2048_C256": speedup(flex),
        "p99_ms_L2048_C256": at.get("p99_ms"),
        # per method at the anchor: True (graphed), why its capture failed (timed eagerly), None (eager run)
        "cuda_graph_at_anchor": {f"{r['method']}/{r['precision']}": r.get("cuda_graph") for r in rows
                                 if (r["L"], r["C"]) == (L, C) and "skipped" not in r},
        "int8_table_memory_ratio": ratio,  # all tables (encoder D=128 + the DLRM's D=16)
        "int8_table_memory_ratio_encoder": ratio_enc,  # the encoder's D=128 tables alone
        "int8_gauc_delta": (quality or {}).get("int8", {}).get("gauc_delta"),
        # int8, with tables under 32 dims in int4 (serve/quantize.py "mixed"): the DLRM's D=16 tables
        "mixed_table_memory_ratio": fp32 / table_bytes(mixed),
        "mixed_gauc_delta": (quality or {}).get("mixed", {}).get("gauc_delta"),
        "quality": quality, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "torch": torch.__version__, "hot_path_compiled": any(r.get("compiled") for r in rows), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


def quality_of(run_dir: str, split: str = "valid") -> dict:
    """int8/int4/mixed vs fp32 AUC/GAUC and table memory of a fine-tuned run (CPU)."""
    from pinfm_rec.data.ranking import prepare_ranking
    from pinfm_rec.serve.model_io import load_finetuned
    from pinfm_rec.serve.quantize import quality_delta
    from pinfm_rec.serve.requests_io import RequestFile, write_request_file
    import tempfile

    loaded = load_finetuned(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "requests.parquet")
        write_request_file(prepare_ranking(loaded.spec.data).root, split, path)
        batches = [b for b, _ in RequestFile(path, loaded.num_dense).batches(256, loaded.max_len)]
    return quality_delta(loaded.model, batches, ("int8", "int4", "mixed"))


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_markdown(path: str, res: dict) -> None:
    """Write the generated tables (``markdown``) into ``path`` between BEGIN/END, keeping the
    hand-written text around them; a file without the markers gets the region appended, a new
    file a title and the region."""
    block = f"{BEGIN}\n{markdown(res)}{END}\n"
    text = None
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if text is None:
        text = f"# Serving benchmark\n\n{block}"
    elif BEGIN in text and END in text.split(BEGIN, 1)[1]:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)


def markdown(res: dict) -> str:
    """The generated part of serving.md (between BEGIN/END): run line, summary keys, rows."""
    lines = [f"Generated by `pinfm_rec/serve/bench.py` on {res['device']}, {res['date']}, torch {res['torch']} "
             f"(method and queue model in its docstring; this region is rewritten by `--md`, the text "
             f"around it is not).", "",
             "| key | value |", "|---|---|"]
    for k in ("cands_per_s_speedup_vs_dup_L2048_C256", "cands_per_s_speedup_vs_flex_L2048_C256", "p99_ms_L2048_C256",
              "int8_table_memory_ratio", "int8_gauc_delta", "mixed_table_memory_ratio", "mixed_gauc_delta"):
        v = res.get(k)
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "| method | prec | L | C | cands/s | req/s | mean ms | p99 ms @0.5 | p99 ms @0.8 | prepare ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['precision']} | {r['L']} | {r['C']} | skipped: {r['skipped']} ||||||")
            continue
        p = [(r["loads"].get(k) or {}).get("p99_ms") for k in ("0.5", "0.8")]
        ps = [f"{x:.3f}" if x is not None else "overloaded" for x in p]
        graph = r.get("cuda_graph")  # True, or why the capture failed (timed eagerly then)
        name = r["method"] + ("" if graph is None else " +graph" if graph is True else " (graph failed)")
        lines.append(f"| {name} | {r['precision']} | {r['L']} | {r['C']} | {r['cands_per_s']:.0f} | "
                     f"{r['requests_per_s']:.1f} | {r['mean_ms']:.3f} | {ps[0]} | {ps[1]} | "
                     + (f"{r['prepare_ms']:.3f} |" if r.get("prepare_ms") is not None else "- |"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU-sized model and shapes (smoke/test)")
    p.add_argument("--out", default="docs/benchmarks/serving.json")
    p.add_argument("--md", default=None, help="also write the tables into this markdown file (between "
                                               "<!-- bench:begin/end -->; the rest of the file is kept)")
    p.add_argument("--cuda-graphs", action="store_true", help="every method through serve/graphs.py (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the hot path (scorer.compile_hot_path) "
                                                         "for every method; int8 not timed")
    p.add_argument("--quality-run", default=None, help="a fine-tuned run dir: measure int8/int4 AUC/GAUC delta")
    p.add_argument("--quality-json", default=None, help="or take that measurement from this JSON (quality_of's output)")
    p.add_argument("--loads", default="0.5,0.8", help="offered loads as fractions of ours' capacity")
    p.add_argument("--Ls", default=None, help="comma list overriding L")
    p.add_argument("--Cs", default=None, help="comma list overriding C")
    p.add_argument("--iters", type=int, default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: OpenMP threads on a shared host only spin
    cfg = dict(TINY if a.tiny or device.type != "cuda" else GPU)
    for key in ("Ls", "Cs"):
        if getattr(a, key):
            cfg[key] = tuple(int(x) for x in getattr(a, key).split(","))
    if a.iters:
        cfg["iters"] = a.iters
    quality = quality_of(a.quality_run) if a.quality_run else None
    if a.quality_json and quality is None:
        with open(a.quality_json) as f:
            quality = json.load(f)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def save(rows: List[dict]) -> dict:  # after every shape: a run cut by a time limit keeps its rows
        res = summary(rows, cfg, device, quality)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        if a.md:
            write_markdown(a.md, res)
        return res

    rows = run(cfg, device, loads=tuple(float(x) for x in a.loads.split(",")), on_shape=save,
               cuda_graphs=a.cuda_graphs, compile=a.compile)
    return save(rows)


if __name__ == "__main__":
    main()

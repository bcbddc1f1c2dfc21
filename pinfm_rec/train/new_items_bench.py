"""Issue 18 measurement: item id modes on a stream with new items (CPU-sized).

    .venv/bin/python -m pinfm_rec.train.new_items_bench --out docs/benchmarks/new_items.json

The stream (``data/churn.py``): synthetic events with raw 62-bit item ids; at ``new_at`` (a time
quantile) a fraction of the items is relaunched under fresh raw ids. Per id mode, one PinFM sharded by
``shard_model`` (world of 1, fused SGD tables + AdamW):

1. pretraining on every event before ``t_new`` (``epochs1`` epochs over max_len windows);
2. continued training one day-like interval at a time from ``t_new`` to ``t_eval`` (windows whose
   last event falls in the day), an incremental export (``train/delta_export.py``) after each day;
3. evaluation on the events after ``t_eval`` (the first ``eval_targets`` of each user): the sampled
   AUC of the target against ``eval_negatives`` items of the eval-period catalogue, separately for
   targets that are new items (introduced at ``t_new``) and old ones.

Id modes: ``dense`` remaps the ids seen in pretraining to 0..V-1 (what a conversion-time remap
gives), later ids read one out-of-vocabulary row; ``hash`` takes raw id mod ``hash_rows`` (a table
smaller than the id space); ``managed`` feeds the raw ids to TorchRec's managed-collision table
(``managed_rows`` slots, LRU eviction). Also recorded: collision rate (share of the eval-period ids
whose row another eval-period id also reads), admitted ids and evictions (managed), delta bytes per
day vs a full export.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import SequenceBatch
from pinfm_rec.data.churn import ChurnStream, churn_stream
from pinfm_rec.model import EmbeddingSpec, ModelSpec, PinFM, TableSpec, TrunkSpec, table_shardings
from pinfm_rec.model.managed import ManagedSpec, slot_ids
from pinfm_rec.parallel import ParallelSpec, build_optimizer, init_distributed, shard_model, shutdown_distributed
from pinfm_rec.train.delta_export import DeltaExporter, chain_sizes

MODES = ("dense", "hash", "managed")
DAY = 86400


@dataclass
class BenchConfig:
    users: int = 1500
    items: int = 1500
    mean_len: int = 40
    new_frac: float = 0.3
    new_at: float = 0.6  # time quantile where new items appear (end of pretraining)
    eval_at: float = 0.85  # time quantile where evaluation starts
    dim: int = 32
    layers: int = 2
    max_len: int = 40
    batch: int = 64
    epochs1: int = 3
    epochs2: int = 4  # per day
    hash_rows: int = 1024
    managed_rows: int = 1600
    negatives: int = 16
    eval_targets: int = 10
    eval_negatives: int = 100
    # fused SGD: FBGEMM has no CPU kernel to reset the Adagrad state of a re-used managed slot
    table_lr: float = 0.2
    seed: int = 0
    id_hash: str = "mix"  # managed mode: embedding.managed.id_hash (mix | none)


class IdMap:
    """Raw ids -> the ids a mode feeds the model, and its item-table rows."""

    def __init__(self, mode: str, s: ChurnStream, c: BenchConfig) -> None:
        self.mode = mode
        if mode == "dense":
            self.vocab = np.unique(s.events["item_id"][s.events["timestamp"] < s.t_new])
            self.rows = self.vocab.size + 1  # + the out-of-vocabulary row
        else:
            self.rows = c.hash_rows if mode == "hash" else c.managed_rows

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.mode == "dense":
            pos = np.minimum(np.searchsorted(self.vocab, raw), self.vocab.size - 1)
            return np.where(self.vocab[pos] == raw, pos, self.vocab.size)
        return raw % self.rows if self.mode == "hash" else raw


def _user_index(s: ChurnStream) -> List[np.ndarray]:
    u = s.events["user_id"]
    bounds = np.r_[0, np.flatnonzero(np.diff(u)) + 1, u.size]
    return [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def train_windows(s: ChurnStream, users: List[np.ndarray], lo: int, hi: int, n: int) -> List[np.ndarray]:
    """Event index windows of <= n events (each user's events before ``hi``, cut from the end) whose
    last event is at or after ``lo``."""
    ts, out = s.events["timestamp"], []
    for idx in users:
        idx = idx[ts[idx] < hi]
        for end in range(idx.size, 1, -n):
            w = idx[max(0, end - n):end]
            if ts[w[-1]] < lo:
                break
            out.append(w)
    return out


def make_batch(s: ChurnStream, ids: IdMap, wins: List[np.ndarray], neg_pool: np.ndarray, k: int,
               rng: np.random.Generator) -> SequenceBatch:
    idx = np.concatenate(wins)
    lengths = np.array([w.size for w in wins])
    ev = s.events
    negs = ids(rng.choice(neg_pool, size=len(wins) * k))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "action", "surface", "neg_item_id"],
        values=torch.from_numpy(np.concatenate([ids(ev["item_id"][idx]), ev["action"][idx], ev["surface"][idx],
                                                negs]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([lengths] * 3 + [np.full(len(wins), k)]).astype(np.int64)))
    return SequenceBatch(features=kjt, timestamps=torch.from_numpy(ev["timestamp"][idx]),
                         request_ids=torch.arange(len(wins)), max_len=int(lengths.max()))


def build_model(mode: str, rows: int, c: BenchConfig, env):
    emb = EmbeddingSpec(dim=c.dim, item=TableSpec(num_embeddings=rows),
                        id_mode={"dense": "error", "hash": "hash", "managed": "managed"}[mode],
                        managed=ManagedSpec(eviction="lru", id_hash=c.id_hash))
    spec = ModelSpec(embedding=emb, trunk=TrunkSpec(d_model=c.dim, n_layers=c.layers, n_heads=2,
                                                    max_len=c.max_len, dropout=0.0))
    torch.manual_seed(c.seed)
    model = PinFM(spec, {"num_items": rows, "num_actions": 4, "num_surfaces": 4}, device="meta")
    dmp, _ = shard_model(model, ParallelSpec(embedding_optimizer="sgd", embedding_lr=c.table_lr), env,
                         table_shardings(emb), c.batch)
    return dmp, build_optimizer(dmp, lr=1e-3, weight_decay=0.0)


class Admissions:
    """Managed table: ids admitted so far and evictions (admitted ids that left the table)."""

    def __init__(self) -> None:
        self.now: set = set()
        self.evictions = 0

    def update(self, dmp) -> None:
        raw = set(slot_ids(dmp)[0].tolist())
        self.evictions += len(self.now - raw)
        self.now = raw


def train(dmp, opt, s, ids, wins, pool, c, rng, epochs, adm) -> int:
    steps = 0
    for _ in range(epochs):
        order = rng.permutation(len(wins))
        for b in range(0, len(order), c.batch):
            batch = make_batch(s, ids, [wins[i] for i in order[b:b + c.batch]], pool, c.negatives, rng)
            dmp(batch)["loss"].backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            if ids.mode == "managed":
                adm.update(dmp)
    return steps


@torch.no_grad()
def evaluate(dmp, s: ChurnStream, ids: IdMap, users, t_eval: int, c: BenchConfig, rng) -> Dict[str, float]:
    """Sampled AUC of each eval target vs eval-period negatives, for new and old target items."""
    fm = dmp.module
    fm.eval()
    ev, ts = s.events, s.events["timestamp"]
    cat = np.unique(ev["item_id"][ts >= t_eval])  # the eval-period catalogue (raw ids)
    hits: Dict[bool, List[float]] = {True: [], False: []}
    targets = [(idx[ts[idx] >= t_eval][:c.eval_targets], idx) for idx in users]
    rows = [(t, idx[max(0, np.searchsorted(idx, t) - c.max_len):np.searchsorted(idx, t)])
            for tg, idx in targets for t in tg]
    rows = [(t, h) for t, h in rows if h.size]
    for b in range(0, len(rows), 256):
        chunk = rows[b:b + 256]
        batch = make_batch(s, ids, [h for _, h in chunk], cat, 1, rng)
        batch.target_timestamp = torch.from_numpy(ts[[t for t, _ in chunk]])
        users_v = fm.encode_users(batch)  # [B, D]
        tgt = fm.item_embeddings(torch.from_numpy(ids(ev["item_id"][[t for t, _ in chunk]])))  # [B, D]
        neg_raw = rng.choice(cat, size=(len(chunk), c.eval_negatives))
        neg = fm.item_embeddings(torch.from_numpy(ids(neg_raw.reshape(-1)))).view(len(chunk), c.eval_negatives, -1)
        st = (users_v * tgt).sum(-1, keepdim=True)  # [B, 1]
        sn = torch.einsum("bd,bkd->bk", users_v, neg)  # [B, K]
        auc = ((st > sn).float() + 0.5 * (st == sn).float()).mean(1)
        for (t, _), a in zip(chunk, auc.tolist()):
            hits[bool(s.is_new[t])].append(a)
    fm.train()
    return {"new_item_auc": float(np.mean(hits[True])), "old_item_auc": float(np.mean(hits[False])),
            "new_targets": len(hits[True]), "old_targets": len(hits[False]),
            "collision_rate": collision_rate(dmp, ids, cat)}


def collision_rate(dmp, ids: IdMap, cat: np.ndarray) -> float:
    """Share of the catalogue's raw ids whose table row is also read by another of its ids."""
    if ids.mode == "managed":
        raw, slot = slot_ids(dmp)
        lut = dict(zip(raw.tolist(), slot.tolist()))
        rows = np.array([lut.get(int(r), -1) for r in cat])  # -1: the shared unknown-item row
    else:
        rows = ids(cat)
    _, inv, cnt = np.unique(rows, return_inverse=True, return_counts=True)
    return float((cnt[inv] > 1).mean())


def run_mode(mode: str, c: BenchConfig, s: ChurnStream, env, tmp: str) -> Dict[str, float]:
    rng = np.random.default_rng([c.seed, MODES.index(mode)])
    ids, users, ts = IdMap(mode, s, c), _user_index(s), s.events["timestamp"]
    dmp, opt = build_model(mode, ids.rows, c, env)
    adm = Admissions()
    t0, t_eval = time.perf_counter(), s.time_quantile(c.eval_at)
    pre = train_windows(s, users, 0, s.t_new, c.max_len)
    steps = train(dmp, opt, s, ids, pre, np.unique(s.events["item_id"][ts < s.t_new]), c, rng, c.epochs1, adm)
    exporter = DeltaExporter(os.path.join(tmp, mode))
    exporter.export(dmp, steps)  # the base: the pretrained model
    days, changed = 0, []
    for lo in range(s.t_new, t_eval, DAY):
        hi = min(lo + DAY, t_eval)
        wins = train_windows(s, users, lo, hi, c.max_len)
        pool = np.unique(s.events["item_id"][(ts >= lo) & (ts < hi)])
        if wins and pool.size:
            steps += train(dmp, opt, s, ids, wins, pool, c, rng, c.epochs2, adm)
            exporter.export(dmp, steps)
            days += 1
            changed.append(exporter.changed_rows / exporter.total_rows)
    sizes = chain_sizes(os.path.join(tmp, mode))
    full = sizes.pop("base")
    out = evaluate(dmp, s, ids, users, t_eval, c, rng)
    out.update(table_rows=ids.rows, train_steps=steps, days=days, seconds=round(time.perf_counter() - t0, 1),
               full_bytes=full, delta_bytes_per_day=float(np.mean(list(sizes.values()))),
               delta_bytes_over_full=float(np.mean(list(sizes.values())) / full),
               delta_rows_over_table_rows=float(np.mean(changed)))
    if mode == "managed":
        out.update(admitted_ids=len(adm.now), evictions=adm.evictions)
    return out


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="")
    p.add_argument("--quick", action="store_true", help="a small stream (tests)")
    p.add_argument("--seeds", type=int, default=1, help="streams + inits seed, seed+1, ...: means and per-seed AUCs")
    p.add_argument("overrides", nargs="*", help="BenchConfig fields, e.g. managed_rows=2048")
    args = p.parse_args(argv)
    c = BenchConfig(users=300, items=300, mean_len=20, epochs1=1, epochs2=1, hash_rows=200, managed_rows=320,
                    eval_negatives=20) if args.quick else BenchConfig()
    for kv in args.overrides:
        k, v = kv.split("=", 1)
        setattr(c, k, type(getattr(c, k))(v))
    env = init_distributed(ParallelSpec(), force_cpu=True)
    runs, first = [], None  # per seed: {mode: result}; the first seed's stream (its sizes are recorded)
    try:
        for seed in range(c.seed, c.seed + args.seeds):
            cs = BenchConfig(**dict(asdict(c), seed=seed))
            s = churn_stream(cs.users, cs.items, cs.mean_len, cs.new_frac, cs.new_at, cs.seed)
            first = first or s
            with tempfile.TemporaryDirectory() as tmp:
                runs.append({m: run_mode(m, cs, s, env, tmp) for m in MODES})
    finally:
        shutdown_distributed()
    res = {m: {k: float(np.mean([r[m][k] for r in runs])) for k in runs[0][m]} for m in MODES}
    for m in MODES:
        res[m]["per_seed"] = [{k: r[m][k] for k in ("new_item_auc", "old_item_auc")} for r in runs]
    s = first
    out = {"config": asdict(c), "modes": res, "events": int(s.is_new.size), "new_item_events": int(s.is_new.sum()),
           "distinct_raw_ids": int(np.unique(s.events["item_id"]).size),
           "seeds": args.seeds, "command": " ".join(
               ["python -m pinfm_rec.train.new_items_bench"] + (["--quick"] if args.quick else [])
               + ([f"--seeds {args.seeds}"] if args.seeds > 1 else []) + list(args.overrides)),
           "device": "cpu (1 process, gloo)", "date": time.strftime("%Y-%m-%d")}
    # the headline keys, also at the top level: {mode: value}
    for k in ("new_item_auc", "old_item_auc", "delta_bytes_over_full"):
        out[k] = {m: res[m][k] for m in MODES}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(res, indent=1))
    return out


if __name__ == "__main__":
    main()

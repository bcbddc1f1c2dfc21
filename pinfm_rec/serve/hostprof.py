"""Host profile of the scoring forward: host syncs and torch ops per request.

    python -m pinfm_rec.serve.hostprof                 # synthetic tiny model, CPU proxy
    python -m pinfm_rec.serve.hostprof --tables int8 --requests 16 --cands 64 --hist 200
    python -m pinfm_rec.serve.hostprof --run runs/ft --input requests.parquet --requests 1   # a fine-tuned run

Also runs against an older checkout without ``Scorer.prepare`` (its forward is then
``model.logits(pad_batch(batch))``): ``PYTHONPATH=<old tree> python <this file> --run ...`` gives
the "before" column of docs/benchmarks/serving.md.

A serving path is host-bound when each request pays for Python, op dispatch and device->host
syncs rather than for GPU work (docs/benchmarks/serving.md). Two counts stand for that host cost:

syncs  calls that would block the host on a GPU: on CUDA, what ``torch.cuda.set_sync_debug_mode``
       reports; on CPU (the proxy: no GPU needed) every op that reads a tensor's value on the
       host or sizes its output from the data: ``aten._local_scalar_dense`` (``.item()``,
       ``int()``, ``bool()``, ``float()`` of a tensor), ``nonzero``, ``masked_select``,
       ``unique``, ``repeat_interleave`` without ``output_size``, boolean-mask indexing, and the
       Python calls ``Tensor.tolist`` / ``Tensor.numpy`` (which reach no op on CPU). Each sync is
       recorded with the first caller frame inside pinfm_rec / torchrec (``sites``).
ops    aten (and fbgemm) ops dispatched, counted with a ``TorchDispatchMode``.
h2d    host->device copies inside the forward, which a CUDA graph cannot capture: tensors made
       from Python data (``torch.tensor(list)``: ``aten.lift_fresh``), copies of a host tensor to
       another device (``_to_copy`` / ``copy_``), and ops that take a host tensor (not a 0-dim
       scalar) beside device tensors (indexing a device tensor with a CPU index tensor copies it
       on every call). The last two only show when the model runs on another device than its
       host inputs: run the scorer on ``meta`` (``tiny_scorer(device="meta")``; the forward is
       sync-free, so it runs there) and a CPU buffer left in the model shows here, on a machine
       without a GPU (DLRM's ``triu_indices`` broke the first GPU capture that way).

``profile(fn, n)`` runs ``fn`` ``n`` times under both counters; the scorer tests assert 0 syncs
per request on the CPU proxy (tests/test_serve_host.py).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, Iterator, List

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
    "aten._unique2.default", "aten.unique_consecutive.default", "aten.unique_dim.default",
    "aten.equal.default", "aten.is_nonzero.default",
}
_PY_SYNCS = ("tolist", "numpy")


def innermost_site(frames, packages=("pinfm_rec", "torchrec"), skip: str = "hostprof") -> str:
    """``file:line function`` of the innermost of ``frames`` (a ``traceback.StackSummary``,
    outermost first) whose file path holds one of ``packages`` and not ``skip``; else of the
    innermost frame ("?" without frames). Paths are shown from the package down."""
    for f in reversed(frames):
        if any(k in f.filename for k in packages) and skip not in f.filename:
            return f"{f.filename.split('site-packages/')[-1].split('/wt-')[-1]}:{f.lineno} {f.name}"
    return f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"


def _site() -> str:
    """The innermost caller frame in pinfm_rec or torchrec (else the innermost frame)."""
    return innermost_site(traceback.extract_stack()[:-2])


def _is_sync(func, args, kwargs) -> bool:
    name = str(func)
    if name in SYNC_OPS:
        return True
    if name.startswith("aten.repeat_interleave.Tensor"):
        return kwargs.get("output_size") is None and (len(args) < 3 or args[-1] is None)
    if name.startswith("aten.index.Tensor") or name.startswith("aten.index_put"):
        idx = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or []))
    return False


class _Counter(TorchDispatchMode):
    def __init__(self, record_sites: bool) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.syncs: collections.Counter = collections.Counter()
        self.h2d: collections.Counter = collections.Counter()
        self.record_sites = record_sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func)] += 1
        if _is_sync(func, args, kwargs):
            self.syncs[f"{func} @ {_site()}" if self.record_sites else str(func)] += 1
        elif str(func).startswith("aten.lift_fresh") or _host_to_device(func, args, kwargs):
            self.h2d[f"{func} @ {_site()}" if self.record_sites else str(func)] += 1
        return func(*args, **kwargs)


def _host_to_device(func, args, kwargs) -> bool:
    """Whether an op copies host data to another device: ``_to_copy``/``copy_`` from a CPU
    tensor to a non-CPU one, or any op taking a non-empty CPU tensor of rank >= 1 beside non-CPU
    tensors."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors:
        return False
    name = str(func)
    if name.startswith("aten._to_copy"):
        dev = kwargs.get("device")
        return tensors[0].device.type == "cpu" and dev is not None and torch.device(dev).type != "cpu"
    host = [t for t in tensors if t.device.type == "cpu"]
    if not host or len(host) == len(tensors):
        return False
    if name.startswith("aten.copy_"):  # dst.copy_(src): src on the host, dst elsewhere
        return len(tensors) > 1 and tensors[1].device.type == "cpu" and tensors[0].device.type != "cpu"
    return any(t.dim() > 0 and t.numel() > 0 for t in host)  # (an empty one copies nothing)


@contextlib.contextmanager
def _python_syncs(counter: _Counter) -> Iterator[None]:
    """Count Tensor.tolist / Tensor.numpy (host reads that dispatch no op on CPU)."""
    saved = {name: getattr(torch.Tensor, name) for name in _PY_SYNCS}

    def wrap(name, orig):
        def f(self, *a, **k):
            if self.device.type != "meta":
                counter.syncs[f"Tensor.{name} @ {_site()}" if counter.record_sites else f"Tensor.{name}"] += 1
            return orig(self, *a, **k)
        return f

    for name, orig in saved.items():
        setattr(torch.Tensor, name, wrap(name, orig))
    try:
        yield
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


@contextlib.contextmanager
def _cuda_syncs(counter: _Counter) -> Iterator[None]:
    """On CUDA: synchronizing calls as reported by torch.cuda.set_sync_debug_mode("warn")."""
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    for w in caught:
        if "synchroniz" in str(w.message):
            counter.syncs[f"cuda sync @ {w.filename.split('site-packages/')[-1]}:{w.lineno}"] += 1


def profile(fn: Callable[[], object], n: int = 1, sites: bool = True, cuda: bool = False) -> Dict:
    """Run ``fn`` ``n`` times counting host syncs and ops; per-call means and the sync sites.
    cuda: also count what the CUDA sync debug mode reports (the CPU counters stay on)."""
    counter = _Counter(sites)
    with contextlib.ExitStack() as stack:
        if cuda:
            stack.enter_context(_cuda_syncs(counter))
        stack.enter_context(_python_syncs(counter))
        stack.enter_context(counter)
        for _ in range(n):
            fn()
    return {"syncs_per_call": sum(counter.syncs.values()) / n, "ops_per_call": sum(counter.ops.values()) / n,
            "sync_sites": {k: v / n for k, v in counter.syncs.most_common()},
            "h2d_per_call": sum(counter.h2d.values()) / n,
            "h2d_sites": {k: v / n for k, v in counter.h2d.most_common()},
            "top_ops": {k: v / n for k, v in counter.ops.most_common(15)}}


def tiny_scorer(tables: str = "fp32", max_len: int = 64, device: str = "cpu", **kw):
    """A Scorer over a small random RankerWithEncoder (the load benchmark's model, CPU-sized)."""
    from pinfm_rec.serve.bench import TINY, build
    from pinfm_rec.serve.quantize import quantize_tables
    from pinfm_rec.serve.scorer import Scorer

    model = build(TINY, max_len, torch.device(device))
    quantize_tables(model, tables)
    return Scorer(model, max_len, device, **kw)


def main(argv: List[str] | None = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="fp32", choices=("fp32", "fp16", "int8", "int4"))
    p.add_argument("--requests", type=int, default=8, help="requests per batch")
    p.add_argument("--cands", type=int, default=16, help="candidates per request")
    p.add_argument("--hist", type=int, default=48, help="history events per request")
    p.add_argument("--iters", type=int, default=20, help="timed scorer calls")
    p.add_argument("--no-buckets", dest="buckets", action="store_false")
    p.add_argument("--run", help="a fine-tuned run dir: profile its model on --input's first batch")
    p.add_argument("--input", help="with --run: a request file (pinfm score --make-input)")
    a = p.parse_args(argv)
    from pinfm_rec.data.ranking_batch import random_ranking_batch
    from pinfm_rec.serve.bench import TINY
    from pinfm_rec.serve.scorer import Scorer, pad_batch

    torch.set_num_threads(1)
    if a.run:
        from pinfm_rec.serve.model_io import load_finetuned
        from pinfm_rec.serve.quantize import quantize_tables
        from pinfm_rec.serve.requests_io import RequestFile

        loaded = load_finetuned(a.run)
        quantize_tables(loaded.model, a.tables)
        scorer = Scorer(loaded.model, loaded.max_len, buckets=a.buckets)
        batch = next(RequestFile(a.input, loaded.num_dense).batches(a.requests, loaded.max_len))[0]
    else:
        scorer = tiny_scorer(a.tables, max_len=max(64, a.hist), buckets=a.buckets)
        gen = torch.Generator().manual_seed(0)
        batch = random_ranking_batch(gen, [a.hist] * a.requests, [a.cands] * a.requests,
                                     num_items=TINY["num_items"], num_dense=3)
    a.requests = batch.num_requests
    if hasattr(scorer, "prepare"):
        dev = scorer.prepare(batch)
        fwd = lambda: scorer.forward(dev)  # noqa: E731 - the device part: what must not sync
    else:  # an older scorer: its device part is the model on the padded batch
        dev = pad_batch(batch, scorer.n_cap) if a.buckets else batch
        fwd = lambda: scorer.model.logits(dev)  # noqa: E731
    with torch.no_grad():
        fwd()  # warm-up
        res = profile(fwd)
        best = float("inf")
        for _ in range(5):  # CPU time of the forward (a shared host's other jobs do not count)
            c0 = time.process_time()
            for _ in range(a.iters):
                fwd()
            best = min(best, (time.process_time() - c0) / a.iters)
    wall = best
    out = {"tables": a.tables, "requests": a.requests, "syncs_per_request": res["syncs_per_call"] / a.requests,
           "syncs_per_batch": res["syncs_per_call"], "ops_per_batch": res["ops_per_call"],
           "h2d_per_batch": res["h2d_per_call"],
           "forward_cpu_ms_per_batch": wall * 1e3, "forward_cpu_ms_per_request": wall * 1e3 / a.requests,
           "sync_sites": res["sync_sites"],
           "h2d_sites": res["h2d_sites"], "top_ops": res["top_ops"]}
    for k, v in out.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {vv:8.2f}  {kk}")
        else:
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

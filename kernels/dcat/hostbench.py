"""CPU proxy of the DCAT op's eager host time (issue 15): no GPU needed.

Run: ``python -m pinfm_rec.kernels.dcat.hostbench [--n 2000] [--repeats 5] [--json out.json]``

It runs the op's whole host path as it goes on a Hopper GPU with the default bf16 config
(``GLUON_FIXED_MAX``): ``dcat_attention`` (argument checks, kernel choice, the autograd node
or the no-grad fast path, or the ``pinfm::dcat_fwd`` custom op), the per-shape decisions
(split size, Gluon usability), output / split-partial allocation, TMA descriptors (cached),
split tickets and the launch-argument preparation, on CPU tensors. Only what needs CUDA is
stubbed: the final kernel launch (a no-op in place of the compiled Gluon kernel, so Triton's
own launcher, ~1/4 of the GPU host time in run 13, is NOT counted here) with the cached-descriptor
launch off (it needs Triton's C launcher; its saving is hostgpu.py's measurement), the current stream /
capture queries, and ``Tensor.is_cuda`` (reported True, so the CUDA branches run). The SM
count is the H200's (132), so split decisions match the GPU's. No Triton kernel runs, so the
proxy needs no interpreter and leaves TRITON_INTERPRET alone: setting it (as this module once
did at import) made every Triton kernel imported later in the process an interpreted one, and
every DCAT config chosen later an INTERPRET one, on a GPU host too (gpu-suite run 5: the xdist
worker that ran the proxy test failed test_dcat_triton and test_serve afterwards).

Modes per anchor shape (R, L, C), H=8, Dh=64, bf16:
  infer:     no_grad forward (serving / eval)
  fwd:       forward with inputs that require grad (builds the autograd node; no backward)
  custom_op: ``torch.ops.pinfm.dcat_fwd`` in eager under no_grad (what torch.compile calls;
             the eager op does not go through it)
Reported: µs per call, the best of ``--repeats`` timings of ``--n`` calls each (the machine's
noise goes one way: slower). CPU allocations of large buffers (mmap) cost more than the GPU's
caching allocator; the largest shapes carry that in both before and after numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

SHAPES = [(8, 512, 256), (4, 2048, 256), (2, 2048, 1024), (1, 8192, 512), (1, 16384, 1024)]
H, DH = 8, 64
H200_SMS = 132
MODES = ("infer", "fwd", "custom_op")


_LAUNCHES = [0]  # kernel launches the stubs took (checked: one per call)


class _NoopCompiled:
    """Stands in for Triton's CompiledKernel: ``compiled[grid](*args)`` only counts."""

    def __getitem__(self, grid):
        return _noop


def _noop(*args, **kwargs):
    _LAUNCHES[0] += 1


class _StubJIT:
    """Stands in for the Gluon JITFunction: ``kernel[grid](*args, **consts)`` returns the
    no-op compiled kernel (as the JIT returns its CompiledKernel)."""

    def __init__(self, real):
        self.arg_names = list(real.arg_names)
        self._compiled = _NoopCompiled()

    def __getitem__(self, grid):
        def jit(*args, **consts):
            _LAUNCHES[0] += 1
            return self._compiled
        return jit


class _Stream:
    cuda_stream = 7


@contextlib.contextmanager
def proxy():
    """Patch what needs CUDA (see the module docstring); everything else is the real code."""
    from . import config, gluon_launch, triton_fwd
    saved = []

    def patch(obj, name, value):
        own = vars(obj)  # restored exactly: an inherited attribute (is_cuda) is deleted again
        saved.append((obj, name, own.get(name), name in own))
        setattr(obj, name, value)

    cfg = config.default_config(config.Variant.GLUON_FIXED_MAX, tma=True)
    patch(config, "_SELECTED", {(torch.device("cpu"), torch.bfloat16, DH): cfg})
    patch(torch.Tensor, "is_cuda", property(lambda self: True))
    patch(torch.cuda, "is_current_stream_capturing", lambda: False)
    patch(torch.cuda, "current_stream", lambda device=None: _Stream())
    # the launch module's own CUDA queries (after the host-overhead rework)
    for name, value in (("_stream_of", lambda index: 7), ("_capturing", lambda: False),
                        ("_current_device", lambda: 0)):
        if hasattr(gluon_launch, name):
            patch(gluon_launch, name, value)
    patch(triton_fwd, "sm_count", lambda device: H200_SMS)
    patch(gluon_launch, "_dcat_fwd_gluon_kernel", _StubJIT(gluon_launch._dcat_fwd_gluon_kernel))
    for name in ("_COMPILED", "_DESCRIPTORS", "_COUNTERS", "_PAIRS", "_KERNELS", "_SCRATCH"):  # (+ old names)
        if hasattr(gluon_launch, name):
            patch(gluon_launch, name, {})
    # Triton's launch path: the cached-descriptor launch (on by default on a GPU) calls Triton's
    # C launcher, which has no CPU stand-in; its saving is measured on the GPU (hostgpu.py)
    if hasattr(gluon_launch, "CACHED_LAUNCH"):
        patch(gluon_launch, "CACHED_LAUNCH", False)
    if hasattr(triton_fwd, "_PLANS"):
        patch(triton_fwd, "_PLANS", {})
    try:
        yield cfg
    finally:
        for obj, name, value, had in reversed(saved):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


def _inputs(R, L, C, grad):
    g = torch.Generator().manual_seed(0)

    def mk(n):
        return torch.randn(n, H, DH, generator=g).to(torch.bfloat16).requires_grad_(grad)
    q, k, v, kc, vc = mk(R * C), mk(R * C), mk(R * C), mk(R * L), mk(R * L)
    co = torch.arange(0, R * C + 1, C, dtype=torch.int64)
    xo = torch.arange(0, R * L + 1, L, dtype=torch.int64)
    return q, k, v, kc, vc, co, xo


def time_call(fn, n: int, repeats: int) -> float:
    """Best of ``repeats`` mean times of n calls, µs per call."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def measure(n: int = 2000, repeats: int = 5, shapes=SHAPES, modes=MODES) -> dict:
    from . import op
    from .op import dcat_attention
    res = {}
    with proxy():
        for R, L, C in shapes:
            row = {}
            for mode in modes:
                ins = _inputs(R, L, C, grad=mode == "fwd")
                q, k, v, kc, vc, co, xo = ins
                if mode == "custom_op":
                    sc = DH ** -0.5

                    def fn():
                        return torch.ops.pinfm.dcat_fwd(q, k, v, kc, vc, co, xo, 0, sc, C, L)
                else:
                    def fn():
                        return dcat_attention(q, k, v, kc, vc, co, xo, max_cands=C,
                                              max_ctx_len=L, kernel="triton")
                ctx = torch.enable_grad() if mode == "fwd" else torch.no_grad()
                with ctx:
                    out = fn()
                    assert out is not None
                    if mode == "fwd":
                        assert out.grad_fn is not None  # the autograd node is built
                    before = _LAUNCHES[0]
                    row[mode] = round(time_call(fn, n, repeats), 2)
                    assert _LAUNCHES[0] - before == 20 + n * repeats, "one launch per call"
            res[f"{R},{L},{C}"] = row
            print(f"{R},{L},{C}", json.dumps(row), flush=True)
    assert not op._FORCE_CUSTOM_OP
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(a.n, a.repeats)
    out = dict(command="python -m pinfm_rec.kernels.dcat.hostbench " + " ".join(sys.argv[1:]),
               torch=torch.__version__, unit="us per call (CPU proxy, kernel launch stubbed)",
               shapes=res)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

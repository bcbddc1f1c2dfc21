"""DCAT op wrapper: dispatcher, custom ops (opcheck / fake tensors),
torch.compile, poisoned outputs, offsets dtypes. Compiled on CUDA when present, else on CPU
through the Triton interpreter (tests/conftest.py decides; the kernels are imported lazily)."""

import os

import pytest
import torch

import pinfm_rec.kernels.dcat.op as op
from pinfm_rec.kernels.dcat import dcat_attention, dcat_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1")


def _case(dev, cl, xl, h=2, dh=32, dtype=torch.float32, int32=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randn(n, h, dh, generator=g).to(dev, dtype)  # noqa: E731
    ins = [mk(sum(cl)), mk(sum(cl)), mk(sum(cl)), mk(sum(xl)), mk(sum(xl))]
    odt = torch.int32 if int32 else torch.int64
    offs = [torch.tensor([0] + torch.tensor(x).cumsum(0).tolist(), device=dev, dtype=odt)
            for x in (cl, xl)]
    return ins, offs[0], offs[1]


@pytest.mark.parametrize("kernel", ["auto", "triton", "pytorch", "sdpa"])
@pytest.mark.parametrize("int32", [False, True])
def test_dispatch_matches_reference(kernel, int32, kernel_device):
    ins, co, xo = _case(kernel_device, [3, 0, 6, 1], [5, 8, 0, 20], int32=int32)
    xs = [t.clone().requires_grad_() for t in ins]
    out = dcat_attention(*xs, co, xo, max_ctx=7, kernel=kernel)
    rs = [t.clone().requires_grad_() for t in ins]
    ref = dcat_reference(*rs, co, xo, max_ctx=7)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for a, b in zip(xs, rs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("force_custom_op", [False, True])
def test_every_output_written(force_custom_op, monkeypatch, kernel_device):
    """Poison the allocator's cached blocks with NaN; every element must be written."""
    monkeypatch.setattr(op, "_FORCE_CUSTOM_OP", force_custom_op)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    ins, co, xo = _case(kernel_device, [3, 0, 17, 1], [0, 8, 33, 20])
    xs = [t.clone().requires_grad_() for t in ins]
    out = dcat_attention(*xs, co, xo, max_ctx=10, kernel="triton")
    out.backward(torch.randn_like(out))
    assert not out.isnan().any()
    for t in xs:
        assert not t.grad.isnan().any()


def test_fp16_dtype_preserved(kernel_device):
    ins, co, xo = _case(kernel_device, [4, 2], [9, 3], dtype=torch.float16)
    out = dcat_attention(*ins, co, xo, kernel="triton")
    assert out.dtype == torch.float16 and out.shape == ins[0].shape
    ref = dcat_reference(*ins, co, xo)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_empty_inputs(kernel_device):
    ins, co, xo = _case(kernel_device, [0, 0], [3, 4])
    assert dcat_attention(*ins, co, xo, kernel="triton").shape == (0, 2, 32)
    ins, co, xo = _case(kernel_device, [2, 1], [0, 0])
    torch.testing.assert_close(dcat_attention(*ins, co, xo, kernel="triton"), ins[2])


def test_opcheck_custom_ops(kernel_device):
    ins, co, xo = _case(kernel_device, [2, 0, 3], [4, 5, 6], dh=16)
    args = tuple(t.requires_grad_() for t in ins) + (co, xo, 0, 0.25, 3, 6)
    torch.library.opcheck(torch.ops.pinfm.dcat_fwd.default, args)
    o, lse = torch.ops.pinfm.dcat_fwd(*args)
    bargs = (torch.randn_like(o),) + tuple(t.detach() for t in ins) + (o.detach(), lse, co, xo,
                                                                         0, 0.25, 3, 6)
    torch.library.opcheck(torch.ops.pinfm.dcat_bwd.default, bargs)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(7, 2, 32)
        kc = torch.empty(11, 2, 32)
        offs = torch.zeros(3, dtype=torch.int64)
        o, lse = torch.ops.pinfm.dcat_fwd(q, q, q, kc, kc, offs, offs, 0, 0.1, 4, 6)
        assert o.shape == (7, 2, 32) and lse.shape == (7, 2) and lse.dtype == torch.float32


def test_torch_compile(kernel_device):
    ins, co, xo = _case(kernel_device, [3, 5], [6, 10])
    xs = [t.clone().requires_grad_() for t in ins]

    def f(*a):
        return dcat_attention(*a, co, xo, max_cands=5, max_ctx_len=10, kernel="triton") * 2
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*xs)
    ref = dcat_reference(*ins, co, xo) * 2
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in xs)


def test_bad_kernel_and_head_dim(kernel_device):
    ins, co, xo = _case(kernel_device, [1], [2], dh=24)
    with pytest.raises(ValueError):
        dcat_attention(*ins, co, xo, kernel="triton")
    with pytest.raises(ValueError):
        dcat_attention(*ins, co, xo, kernel="nope")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    ins, co, xo = _case(torch.device("cpu"), [2], [3])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dcat_attention(*ins, co, xo, kernel="triton")


def test_exported_on_cpu_without_interpreter_emits_the_custom_op(monkeypatch):
    # torch.export of a CPU scorer (serve/export.py) needs the op in the graph, not a kernel run,
    # and must not switch TRITON_INTERPRET on for it (a process-wide setting)
    ins, co, xo = _case(torch.device("cpu"), [2, 3], [3, 4])
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    class M(torch.nn.Module):
        def forward(self, q, k, v, kc, vc, co, xo):
            return dcat_attention(q, k, v, kc, vc, co, xo, kernel="triton", max_cands=3, max_ctx_len=4)

    ep = torch.export.export(M(), (*ins, co, xo), strict=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "pinfm.dcat_fwd.default" in targets, targets
    assert os.environ["TRITON_INTERPRET"] == "0"


def test_inference_call_skips_autograd(kernel_device):
    # under no_grad (serving, eval) the op goes straight to the launcher: same output, no
    # autograd node; with grad it records one
    ins, co, xo = _case(kernel_device, [3, 0, 6], [5, 8, 20])
    xs = [t.clone().requires_grad_() for t in ins]
    with torch.no_grad():
        fast = dcat_attention(*xs, co, xo, kernel="triton")
    slow = dcat_attention(*xs, co, xo, kernel="triton")
    assert fast.grad_fn is None and slow.grad_fn is not None
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)


def test_training_call_records_the_dcat_node_through_the_c_apply(kernel_device, monkeypatch):
    # a training-mode call builds _DcatFn's node through the C apply (no Python Function.apply
    # wrapper); under functorch transforms it goes through Function.apply, which rejects a
    # Function without setup_context with torch's own message
    ins, co, xo = _case(kernel_device, [3, 0, 6], [5, 8, 20])
    xs = [t.clone().requires_grad_() for t in ins]
    out = dcat_attention(*xs, co, xo, kernel="triton")
    assert type(out.grad_fn).__name__ == "_DcatFnBackward"
    wrapped = []
    real = op._DcatFn.apply
    monkeypatch.setattr(op._DcatFn, "apply", lambda *a: wrapped.append(1) or real(*a))
    out.sum().backward()
    assert not wrapped and all(x.grad is not None and x.grad.abs().sum() > 0 for x in xs)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda q: dcat_attention(q, *xs[1:], co, xo, kernel="triton").sum())(
            ins[0].clone())
    assert wrapped

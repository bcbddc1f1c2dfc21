"""The Gluon DCAT forward's host path (kernels/dcat/gluon_launch.py) without a GPU: split-ticket
buffers, cached TMA descriptor pairs, the direct launch after the first JIT launch, the
cached-descriptor launch against Triton 3.6's launcher layout, and the CPU proxy of the whole host
path (kernels/dcat/hostbench.py). Triton's kernel and launcher are replaced by recorders; the real
launches run in the GPU tests (tests/test_dcat_triton.py)."""

import os
import warnings

import pytest
import torch

from pinfm_rec.kernels.dcat.config import FwdConfig, Variant


@pytest.fixture
def fake_stream(monkeypatch):
    """gluon_launch with its CUDA queries faked: (module, capturing [bool], stream [int]), the
    one-element lists settable by the test."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g

    capturing, stream = [False], [7]
    monkeypatch.setattr(g, "_capturing", lambda: capturing[0])
    monkeypatch.setattr(g, "_stream_of", lambda index: stream[0])
    return g, capturing, stream


def test_split_ticket_buffers_graph_captures_never_share_with_eager(fake_stream, monkeypatch):
    # fuse_combine's tickets are cached per (device, stream); a CUDA graph capture must get
    # its own buffers (a replay can run beside eager launches on another stream) and keep
    # them allocated when a bigger one replaces them. Host logic only: CUDA state faked
    g, capturing, stream = fake_stream
    monkeypatch.setattr(g, "_COUNTERS", {})
    monkeypatch.setattr(g, "_GRAPH_COUNTERS", [])
    dev = -1  # q.get_device() of a CPU tensor
    eager = g._counters(dev, 10)
    assert g._counters(dev, 20) is eager and int(eager.sum()) == 0  # reused, zeroed
    capturing[0] = True
    graph = g._counters(dev, 10)
    assert graph is not eager and g._GRAPH_COUNTERS == [graph]
    graph[3] = 5  # a capture whose recorded zeros never ran (it failed): the next one zeroes again
    assert g._counters(dev, 10) is graph and int(graph.abs().sum()) == 0
    bigger = g._counters(dev, 5000)
    assert bigger.numel() >= 5000 and g._GRAPH_COUNTERS == [graph, bigger]
    capturing[0] = False
    assert g._counters(dev, 10) is eager
    stream[0] = 8  # another stream: its own buffer
    assert g._counters(dev, 10) is not eager


def test_scratch_per_stream_views_cached_graph_captures_allocate(fake_stream, monkeypatch):
    # the split partials of eager calls are views of one buffer per (device, stream), one view
    # pair per shape; the buffer grows to the largest shape, pl stays 16-byte aligned after po;
    # a capture (and a CPU tensor) allocates fresh ones. Host logic only: CUDA state faked
    g, capturing, stream = fake_stream
    monkeypatch.setattr(g, "_SCRATCH", {})
    monkeypatch.setattr(g, "_MAX_SCRATCH_BYTES", g.SCRATCH_CAP)  # on (PINFM_DCAT_SCRATCH=1)
    q = torch.zeros(3, 2, 16, dtype=torch.bfloat16)
    cpu = g.split_scratch(q, 2, 3, 2, 16)  # a CPU tensor: plain allocations, nothing cached
    assert g._SCRATCH == {} and cpu[0].shape == (2, 3, 2, 16) and cpu[1].shape == (2, 3, 2)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    po, pl = g.split_scratch(q, 2, 3, 2, 16)
    assert po.shape == (2, 3, 2, 16) and pl.shape == (2, 3, 2)
    assert po.dtype == pl.dtype == torch.float32 and po.is_contiguous() and pl.is_contiguous()
    assert po.untyped_storage().data_ptr() == pl.untyped_storage().data_ptr()
    assert pl.data_ptr() - po.data_ptr() == po.numel() * 4 and pl.data_ptr() % 16 == 0
    assert g.split_scratch(q, 2, 3, 2, 16)[0] is po  # same shape: the same views
    small = g.split_scratch(q, 1, 2, 2, 16)  # smaller: a view of the same buffer
    assert small[0].data_ptr() == po.data_ptr() and small[0].shape == (1, 2, 2, 16)
    big = g.split_scratch(q, 4, 50, 2, 16)  # bigger: a new buffer, old views dropped
    assert big[0].data_ptr() != po.data_ptr() and big[1].shape == (4, 50, 2)
    assert g.split_scratch(q, 2, 3, 2, 16)[0].data_ptr() == big[0].data_ptr()
    stream[0] = 8  # another stream: a buffer of its own
    assert g.split_scratch(q, 2, 3, 2, 16)[0].data_ptr() != big[0].data_ptr()
    capturing[0] = True  # a capture: fresh allocations, nothing cached
    n = len(g._SCRATCH)
    cap = g.split_scratch(q, 2, 3, 2, 16)
    assert len(g._SCRATCH) == n and cap[0].data_ptr() not in (po.data_ptr(), big[0].data_ptr())
    capturing[0] = False
    monkeypatch.setattr(g, "_MAX_SCRATCH_BYTES", 4 * 1000)  # above the cap: allocated per call
    n = len(g._SCRATCH)
    huge = g.split_scratch(q, 8, 40, 2, 16)
    assert len(g._SCRATCH) == n and huge[0].shape == (8, 40, 2, 16)
    assert g.split_scratch(q, 8, 40, 2, 16)[0] is not huge[0]
    lse = g.lse_scratch(q, 5, 2)  # inference's lse: a buffer of its own, views cached
    assert lse.shape == (5, 2) and lse.dtype == torch.float32 and g.lse_scratch(q, 5, 2) is lse
    assert lse.untyped_storage().data_ptr() != big[0].untyped_storage().data_ptr()
    g.clear_scratch()
    assert g._SCRATCH == {}
    monkeypatch.setattr(g, "_MAX_SCRATCH_BYTES", 0)  # off (the default until a GPU run): allocated
    assert g.lse_scratch(q, 5, 2) is not g.lse_scratch(q, 5, 2) and g._SCRATCH == {}


def test_descriptor_pairs_cached_and_bounded(monkeypatch):
    # one lookup per call for K and V; a pair holds its two descriptors (and their launcher
    # encodings, cached-descriptor launch only); at most _MAX_PAIRS pairs stay
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g
    monkeypatch.setattr(g, "_PAIRS", {})
    ts = [torch.randn(40, 2, 64, dtype=torch.bfloat16) for _ in range(6)]
    p = g._descriptor_pair(ts[0], ts[1], 40, 128, 128, 64)
    assert g._descriptor_pair(ts[0], ts[1], 40, 128, 128, 64) is p
    assert p.kd.base is ts[0] and p.vd.base is ts[1] and p.encoded == {}
    assert list(p.kd.block_shape) == [128, 64] and list(p.kd.shape) == [40, 128]
    assert g._descriptor_pair(ts[0], ts[1], 40, 128, 64, 64) is not p  # another block
    assert g._descriptor_pair(ts[1], ts[0], 40, 128, 128, 64) is not p  # K and V swapped
    for i in range(2, 6, 2):
        g._descriptor_pair(ts[i], ts[i + 1], 40, 128, 128, 64)
    assert len(g._PAIRS) == g._MAX_PAIRS
    assert g._descriptor_pair(ts[0], ts[1], 40, 128, 128, 64) is not p  # evicted, rebuilt


def test_direct_launch_after_the_first_jit_launch(monkeypatch):
    # the Gluon forward's host path: the first call of a plan goes through Triton's JIT (which
    # returns the CompiledKernel), later calls call that kernel with every parameter in
    # signature order; a failing direct launch warns once and the JIT path takes over.
    # Fakes stand in for Triton (the real path runs in the GPU tests)
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g
    calls = []

    class Compiled:
        fail = False

        def __getitem__(self, grid):
            def run(*args):
                if Compiled.fail:
                    raise TypeError("launcher API changed")
                calls.append(("direct", grid, args))
            return run

    class Kernel:
        arg_names = ["A", "n", "X", "Y"]

        def __getitem__(self, grid):
            def run(*args, **consts):
                calls.append(("jit", grid, args, consts))
                return Compiled()
            return run

    monkeypatch.setattr(g, "_DIRECT_FAILED", [])
    k, consts = Kernel(), dict(Y=2, X=1)  # keyword order differs from the signature's
    c = g._run(k, (3, 1, 1), ("a", 5), consts, True)
    assert isinstance(c, Compiled)
    assert g._run(k, (4, 1, 1), ("b", 6), consts, True, c) is c
    assert g._run(k, (4, 1, 1), ("b2", 6), consts, True, c, (1, 2)) is c
    assert g._run(k, (4, 1, 1), ("c", 7), consts, False) is None  # unaligned: always the JIT
    assert calls == [("jit", (3, 1, 1), ("a", 5), consts), ("direct", (4, 1, 1), ("b", 6, 1, 2)),
                     ("direct", (4, 1, 1), ("b2", 6, 1, 2)), ("jit", (4, 1, 1), ("c", 7), consts)]
    Compiled.fail = True
    with pytest.warns(RuntimeWarning, match="direct launch unavailable"):
        assert g._run(k, (5, 1, 1), ("d", 8), consts, True, c) is None
    assert calls[-1] == ("jit", (5, 1, 1), ("d", 8), consts) and len(g._DIRECT_FAILED) == 1
    g._run(k, (5, 1, 1), ("e", 9), consts, True, c)
    assert calls[-1][0] == "jit"  # remembered


def _stub_launch_env(monkeypatch, g):
    """gluon_launch with its kernel replaced by a recorder (no GPU): returns the call list."""
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("direct", grid, args))

    class Kernel:
        arg_names = list(g._dcat_fwd_gluon_kernel.arg_names)

        def __getitem__(self, grid):
            def run(*args, **consts):
                calls.append(("jit", grid, args, consts))
                return Compiled()
            return run

    monkeypatch.setattr(g, "_dcat_fwd_gluon_kernel", Kernel())
    monkeypatch.setattr(g, "_DIRECT_FAILED", [])
    monkeypatch.setattr(g, "_PAIRS", {})
    monkeypatch.setattr(g, "_KERNELS", {})
    # Triton's own launch path (the cached-descriptor launch, on by default, needs a real
    # CompiledKernel: the tests of that path switch it on themselves)
    monkeypatch.setattr(g, "CACHED_LAUNCH", False)
    monkeypatch.setattr(g, "_FAST_FAILED", [])
    return calls


def test_gluon_plan_direct_launch_needs_aligned_pointers_and_int32(monkeypatch):
    # launch(): a plan's first aligned call goes through the JIT, the next ones directly with
    # the plan's constexprs in signature order; a misaligned pointer or an int past int32
    # (Triton specialises on both) always takes the JIT
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g
    calls = _stub_launch_env(monkeypatch, g)
    cfg = FwdConfig(variant=Variant.GLUON_FIXED_MAX)
    H, Dh = 2, 64
    q = torch.randn(5, H, Dh, dtype=torch.bfloat16)
    kc = torch.randn(40, H, Dh, dtype=torch.bfloat16)
    co, xo = torch.tensor([0, 5]), torch.tensor([0, 40])
    o, lse = torch.empty_like(q), torch.empty(5, H)
    plan = g.GluonPlan(cfg, torch.bfloat16, Dh, False, (H, 1, 0, 128))
    assert plan.consts["FIXED_MAX"] and plan.bn == 128 and not plan.fuse
    assert plan.const_values == (Dh, 64, 128, 3, False, False, True, 4)

    def go(plan, aligned=True, Cn=5):
        return g.launch((1, H, 1), q, q, q, kc, kc, co, xo, o, lse, o, lse, Cn, H, 1, 0, 128,
                        0.18, cfg, False, plan, aligned)
    go(plan)
    go(plan)
    assert [c[0] for c in calls] == ["jit", "direct"] and plan.kernel.compiled is not None
    assert calls[1][2][-8:] == plan.const_values and calls[1][2][11] is calls[0][2][11]
    go(plan, aligned=False)
    go(plan, Cn=2 ** 31)
    assert [c[0] for c in calls[2:]] == ["jit", "jit"]
    wide = g.GluonPlan(cfg, torch.bfloat16, Dh, False, (H, 1, 2 ** 31, 128))  # max_ctx
    assert not wide.ints_ok
    go(wide)
    go(wide)
    assert [c[0] for c in calls[4:]] == ["jit", "jit"]
    # another plan of the same specialisation (other max lengths) shares the compiled kernel:
    # its first call is already direct
    other = g.GluonPlan(cfg, torch.bfloat16, Dh, False, (H, 3, 0, 128))
    assert other.kernel is plan.kernel and wide.kernel is plan.kernel
    go(other)
    assert calls[-1][0] == "direct"
    assert g.GluonPlan(cfg, torch.bfloat16, Dh, True, (H, 1, 0, 128)).kernel is not plan.kernel
    assert g.GluonPlan(cfg, torch.bfloat16, Dh, False, (H, 1, 0, 128),
                       spec=(0, torch.int32)).kernel is not plan.kernel
    # the alignment check of the call itself (aligned=None): a 2-byte offset is caught
    odd = torch.zeros(5 * H * Dh + 1, dtype=torch.bfloat16)[1:].view(5, H, Dh)
    g.launch((1, H, 1), odd, q, q, kc, kc, co, xo, o, lse, o, lse, 5, H, 1, 0, 128, 0.18,
             cfg, False, plan, None)
    assert calls[-1][0] == "jit"


def _triton36_fakes(raw_calls, encode_calls):
    """A CompiledKernel / CudaLauncher pair with Triton 3.6's launch layout (runner ->
    CudaLauncher.__call__ -> wrap_handle_tensordesc's ``inner`` -> the C launcher), the C
    launcher replaced by a recorder: what the cached-descriptor launch must reproduce."""
    def make_tensordesc_arg(arg, metadata):  # 3.6: [CUtensorMap, *shape, *strides]
        encode_calls.append(arg)
        return [("tmap", id(arg), metadata["swizzle"]), *arg.shape, *arg.strides]

    def wrap_handle_tensordesc(launcher, tensordesc_indices, tensordesc_meta):
        def inner(*args):  # Triton 3.6 driver.py, same logic (13 base arguments)
            final_args = list(args[:13])
            tensordesc_idx = 0
            for i, arg in enumerate(args[13:]):
                if i in tensordesc_indices:
                    final_args.extend(make_tensordesc_arg(arg, tensordesc_meta[tensordesc_idx]))
                    tensordesc_idx += 1
                else:
                    final_args.append(arg)
            return launcher(*final_args)
        return inner

    class Launcher:  # CudaLauncher (3.6)
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, True

        def __init__(self, n_before):
            self.launch = wrap_handle_tensordesc(lambda *a: raw_calls.append(a),
                                                 {n_before, n_before + 1},
                                                 [{"swizzle": 128}, {"swizzle": 128}])

        def __call__(self, gx, gy, gz, stream, function, *args):
            self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid,
                        self.launch_pdl, None, None, *args)

    class Compiled:
        function, packed_metadata = 1234, ("packed",)

        def __init__(self, n_before):
            self.run = Launcher(n_before)

        def __getitem__(self, grid):  # 3.6 runner, no launch hook installed
            def runner(*args):
                self.run(grid[0], grid[1], grid[2], 99, self.function, self.packed_metadata,
                         None, None, None, *args)
            return runner

    return Compiled, make_tensordesc_arg


def test_cached_descriptor_launch_reproduces_triton36_launcher_arguments(monkeypatch):
    # the cached-descriptor launch (on unless PINFM_DCAT_CACHED_LAUNCH=0): the C launcher must get exactly
    # the arguments Triton 3.6's wrapper builds, with each descriptor encoded once per pair
    # instead of per call; a launch hook (profiler) or another Triton layout keeps Triton's path
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton import knobs
    from triton.backends.nvidia import driver as nvd

    from pinfm_rec.kernels.dcat import gluon_launch as g
    raw, enc = [], []
    Compiled, make_arg = _triton36_fakes(raw, enc)
    names = g._dcat_fwd_gluon_kernel.arg_names
    compiled = Compiled(names.index("kc_desc"))

    class Kernel:
        arg_names = names

        def __getitem__(self, grid):
            def jit(*args, **consts):  # launches, returns its CompiledKernel
                compiled[grid](*args, *(consts[n] for n in names[len(args):]))
                return compiled
            return jit

    monkeypatch.setattr(g, "_dcat_fwd_gluon_kernel", Kernel())
    for name, value in (("_DIRECT_FAILED", []), ("_FAST_FAILED", []), ("_PAIRS", {}),
                        ("_KERNELS", {}), ("CACHED_LAUNCH", True)):
        monkeypatch.setattr(g, name, value)
    monkeypatch.setattr(g, "_triton_stream_fns", lambda: (lambda: 0, lambda dev: 99))
    monkeypatch.setattr(nvd, "_BASE_ARGS_FORMAT_LEN", 13, raising=False)
    monkeypatch.setattr(nvd, "make_tensordesc_arg", make_arg)
    for hook in ("launch_enter_hook", "launch_exit_hook"):
        monkeypatch.setattr(knobs.runtime, hook, None)
    cfg = FwdConfig(variant=Variant.GLUON_FIXED_MAX)
    H, Dh = 2, 64
    q = torch.randn(5, H, Dh, dtype=torch.bfloat16)
    kcs = [torch.randn(40, H, Dh, dtype=torch.bfloat16) for _ in range(2)]
    co, xo = torch.tensor([0, 5]), torch.tensor([0, 40])
    o, lse = torch.empty_like(q), torch.empty(5, H)
    plan = g.GluonPlan(cfg, torch.bfloat16, Dh, False, (H, 1, 0, 128))

    def go(kc):
        g.launch((1, H, 1), q, q, q, kc, kc, co, xo, o, lse, o, lse, 5, H, 1, 0, 128, 0.18,
                 cfg, False, plan, True)
    go(kcs[0])                       # JIT launch (here: the fake's runner), fast launcher made
    assert plan.kernel.fast is not None and not g._FAST_FAILED
    go(kcs[0])                       # cached-descriptor launch
    go(kcs[0])
    assert len(raw) == 3 and raw[1] == raw[0] and raw[2] == raw[0]
    assert len(enc) == 2 + 2         # the JIT call encoded both; the fast ones once, cached
    pair = next(iter(g._PAIRS.values()))
    assert list(pair.encoded) == [plan.kernel.fast]
    monkeypatch.setattr(g, "CACHED_LAUNCH", False)  # reference: the default direct launch
    go(kcs[1])
    n_enc = len(enc)
    monkeypatch.setattr(g, "CACHED_LAUNCH", True)
    go(kcs[1])                       # a new K/V pair: encoded on first use
    assert raw[-1] == raw[-2] and len(enc) == n_enc + 2
    # a launch hook installed (e.g. a profiler): Triton's own path, hooks called by it
    hooks = knobs.HookChain()
    hooks.add(lambda md: None)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hooks)
    n_enc = len(enc)
    go(kcs[1])
    assert len(enc) == n_enc + 2     # Triton's wrapper encoded again: the default path ran


def test_cached_descriptor_launch_refuses_other_launcher_layouts(monkeypatch):
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from pinfm_rec.kernels.dcat import gluon_launch as g
    monkeypatch.setattr(g, "_FAST_FAILED", [])

    class Other:  # e.g. Triton 3.8: another wrapper
        function, packed_metadata = 1, ()

        class run:
            @staticmethod
            def launch(*args):
                return args
    # on by default: the fallback is quiet, its reason kept (hostgpu.py reports it)
    monkeypatch.setattr(g, "_REQUESTED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert g._make_fast(Other(), ()) is None
    assert len(g._FAST_FAILED) == 1
    # asked for (PINFM_DCAT_CACHED_LAUNCH=1): the fallback warns
    monkeypatch.setattr(g, "_REQUESTED", True)
    with pytest.warns(RuntimeWarning, match="cached-descriptor launch unavailable"):
        assert g._make_fast(Other(), ()) is None
    assert len(g._FAST_FAILED) == 2
    assert g.CACHED_LAUNCH == (os.environ.get("PINFM_DCAT_CACHED_LAUNCH", "1") != "0")  # the default


def test_host_proxy_runs_the_gluon_host_path_and_restores_everything(monkeypatch):
    # kernels/dcat/hostbench.py: the GPU host path on CPU tensors (kernel launch stubbed, one
    # launch per call checked inside), unsplit and split (fused combine: split tickets) shapes.
    # It must not touch TRITON_INTERPRET: set once in a GPU process, every kernel imported
    # later runs interpreted and every config chosen later is INTERPRET (gpu-suite run 5)
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    import importlib

    # every kernel module imported first, as the session set it up (unset below, a kernel
    # module imported for the first time would be a compiled one in a CPU session)
    from pinfm_rec.kernels.dcat import config, gluon_launch, hostbench, triton_bwd, triton_fwd  # noqa: F401
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hostbench = importlib.reload(hostbench)  # its import runs with the variable unset
    kernel, plans = gluon_launch._dcat_fwd_gluon_kernel, triton_fwd._PLANS
    res = hostbench.measure(n=5, repeats=1, shapes=[(8, 512, 256), (1, 16384, 1024)],
                            modes=("infer", "fwd"))
    assert set(res) == {"8,512,256", "1,16384,1024"}
    assert all(v > 0 for row in res.values() for v in row.values())
    assert "is_cuda" not in vars(torch.Tensor) and not torch.zeros(1).is_cuda
    assert gluon_launch._dcat_fwd_gluon_kernel is kernel and triton_fwd._PLANS is plans
    assert (torch.device("cpu"), torch.bfloat16, 64) not in config._SELECTED
    assert "TRITON_INTERPRET" not in os.environ

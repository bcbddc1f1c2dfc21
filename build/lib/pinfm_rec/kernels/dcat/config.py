"""Launch configuration of the DCAT kernels: one frozen config per (device, dtype, Dh),
chosen once and cached (:func:`select`), passed explicitly to the launchers.

Variants of the forward (the backward is one ``tl`` kernel pair everywhere):

* ``GLUON_FIXED_MAX``: Hopper (sm_90), bf16, Dh <= 64. The Gluon kernel of ``gluon_fwd.py``
  with a split's first-block row max kept as the softmax reference (an overflow redoes the
  split online, inside the kernel). The benchmarked default (docs/benchmarks/dcat.md).
* ``GLUON_ONLINE``: Hopper, fp16 (p would overflow at 2^16) or Dh 128 (the fallback copy
  spills): the same Gluon kernel with the online softmax.
* ``TL``: every other CUDA device and fp32 (IEEE dots): ``triton_fwd._dcat_fwd_kernel``, full
  history blocks by TMA descriptors on compute capability >= 9.
* ``INTERPRET``: CPU (under ``TRITON_INTERPRET=1``: tests) or any device with the interpreter on:
  the ``tl`` kernel, no launch options.

Each variant's reference is ``reference.dcat_reference`` (fp64 in the checks). Tests:
GLUON_* compile for sm_90 anywhere (tests/test_dcat_gluon_compile.py) and run on a Hopper GPU
(tests/test_dcat_triton.py: bf16 Dh 64 fixed-max incl. the overflow "ramp", bf16 Dh 128 and
fp16 online); TL runs the fp32 tests compiled on any CUDA GPU; INTERPRET runs all of
tests/test_dcat_*.py on CPU. Bench (``bench.py``): the timed shapes run GLUON_FIXED_MAX on
Hopper; ``--correctness`` checks bf16 / fp16 / fp32 (GLUON_FIXED_MAX, GLUON_ONLINE and TL on an H100/H200), and
its ramp check compares GLUON_FIXED_MAX with GLUON_ONLINE.

Tuning (``tune.py``) returns a new :class:`DcatConfig`; nothing here is mutated at run time.
Notation: Dh head dim.
"""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, is_dataclass

import torch

__all__ = ["Variant", "Tile", "FwdConfig", "BwdConfig", "DcatConfig", "select", "interpreting",
           "as_json"]


class Variant(enum.Enum):
    GLUON_FIXED_MAX = "gluon_fixed_max"
    GLUON_ONLINE = "gluon_online"
    TL = "tl"
    INTERPRET = "interpret"

    @property
    def gluon(self) -> bool:
        return self in (Variant.GLUON_FIXED_MAX, Variant.GLUON_ONLINE)


@dataclass(frozen=True)
class FwdConfig:
    """Forward launch config. block_m candidates x block_n history keys per block; waves:
    programs targeted = waves x SMs (history splits fill the rest); min_split: fewest keys per
    split; split_size: force a split size (None: from waves); tma: the tl kernel reads full
    blocks through TMA descriptors; fuse_combine: the Gluon kernel merges split partials
    itself (an atomic ticket, no combine launch; see gluon_launch._counters)."""
    variant: Variant
    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    waves: float = 1.5
    min_split: int = 256
    split_size: int | None = None
    tma: bool = False
    fuse_combine: bool = True


@dataclass(frozen=True)
class Tile:
    """One backward kernel's launch: a [rows, cols] tile, warps, pipeline stages."""
    rows: int
    cols: int
    warps: int = 4
    stages: int = 2


@dataclass(frozen=True)
class BwdConfig:
    """Backward launch config: the dq kernel's tile (rows = candidates, cols = history keys
    streamed; split over the history like the forward, by waves / min_split / split_size) and
    the dkdv kernel's (rows = history keys resident, cols = candidates streamed)."""
    dq: Tile = Tile(64, 32, 4, 4)
    kv: Tile = Tile(128, 32, 4, 2)
    waves: float = 3.8
    min_split: int = 1024
    split_size: int | None = None


@dataclass(frozen=True)
class DcatConfig:
    fwd: FwdConfig
    bwd: BwdConfig = BwdConfig()

    @property
    def variant(self) -> Variant:
        return self.fwd.variant

    @property
    def interpret(self) -> bool:
        return self.fwd.variant is Variant.INTERPRET


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _gluon_available() -> bool:
    try:
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:  # a Triton without Gluon's Hopper module
        return False
    return True


def _tma_available() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def choose_variant(capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int,
                   gluon: bool = True) -> Variant:
    """The forward variant for a device of this CUDA compute capability (None: no CUDA, the
    interpreter), dtype and head dim; gluon: whether Triton ships Gluon's Hopper module."""
    if capability is None:
        return Variant.INTERPRET
    half = dtype in (torch.bfloat16, torch.float16)
    # the head dims checked on the GPU (bench --correctness full); others keep the tl kernel
    if capability[0] != 9 or not gluon or not half or head_dim not in (32, 64, 128):
        return Variant.TL
    if dtype == torch.bfloat16 and head_dim <= 64:
        return Variant.GLUON_FIXED_MAX
    return Variant.GLUON_ONLINE


# Default launch configuration: the config the CUDA-graph sweep chose in the recorded GPU run
# (run 12, H100, 2026-11-23; docs/benchmarks/dcat.md, docs/dcat-history.md).
def default_config(variant: Variant, tma: bool = False) -> DcatConfig:
    # tma: read by the tl kernel, which also serves a Gluon variant's calls the Gluon kernel
    # cannot take (an empty or misaligned history, a Gluon build error)
    return DcatConfig(FwdConfig(variant=variant, tma=tma and variant is not Variant.INTERPRET))


_SELECTED: dict = {}  # (device, dtype, Dh) -> DcatConfig


def _choose(device: torch.device, dtype: torch.dtype, head_dim: int) -> DcatConfig:
    # TRITON_INTERPRET is read here, once per key: Triton itself fixes interpreter vs compiler
    # when the kernel modules are imported
    if device.type != "cuda" or interpreting():
        return default_config(Variant.INTERPRET)
    cap = torch.cuda.get_device_capability(device)
    variant = choose_variant(cap, dtype, head_dim, _gluon_available())
    return default_config(variant, tma=cap[0] >= 9 and _tma_available())


def select(device: torch.device, dtype: torch.dtype, head_dim: int) -> DcatConfig:
    """The config for inputs on ``device`` of ``dtype`` with head dim ``head_dim``, chosen
    once per (device, dtype, Dh) and cached: one dict lookup per call."""
    key = (device, dtype, head_dim)
    cfg = _SELECTED.get(key)
    if cfg is None:
        cfg = _SELECTED[key] = _choose(device, dtype, head_dim)
    return cfg

def as_json(cfg) -> dict:
    """A FwdConfig / BwdConfig / DcatConfig as plain JSON (the variant by its value)."""
    if not is_dataclass(cfg):
        return {}
    if isinstance(cfg, DcatConfig):
        return dict(fwd=as_json(cfg.fwd), bwd=as_json(cfg.bwd))
    if isinstance(cfg, BwdConfig):
        return {k: (asdict(v) if isinstance(v, Tile) else v) for k, v in vars(cfg).items()}
    return {k: (v.value if isinstance(v, Variant) else v) for k, v in asdict(cfg).items()}

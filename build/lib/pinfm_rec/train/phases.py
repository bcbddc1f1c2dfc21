"""Step-time breakdown of a train step, on when ``PINFM_PHASE_TIMES=1`` (the scaling benchmark sets it).

Phases (milliseconds per step, averaged over the log window, logged as ``perf/phase_<name>_ms``):

* ``embedding_fwd``: the sharded embedding modules' forward (input all-to-all, FBGEMM lookup, output
  all-to-all), measured with forward hooks on every module holding sharded tables;
* ``trunk_fwd``: the transformer trunk's forward (forward hooks on modules named ``trunk``);
* ``forward``: the whole model forward (loss included); ``backward``: ``loss.backward()`` (trunk
  backward, DDP/FSDP2 gradient collectives, the embedding gradients' all-to-all and the fused
  table update); ``optimizer``: gradient clipping + dense AdamW step + zero_grad; ``step``: all of it.

On CUDA the phases are CUDA events on the current stream, read once per log window (no extra
synchronisation inside a step); on CPU ``time.perf_counter``. Every phase is also a
``torch.profiler.record_function`` range, so a profiler trace shows the same names. Off (the
default), ``phase`` is a bare ``record_function`` and no hook is installed.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, List, Tuple

import torch
from torch import nn

ENV = "PINFM_PHASE_TIMES"
HOOKED = ("embedding_fwd", "trunk_fwd")


def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0", "false")


class PhaseTimer:
    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.on = enabled()
        self.cuda = device.type == "cuda"
        self.pending: List[Tuple[str, object, object]] = []  # (phase, start, end) not yet read
        self.open: Dict[str, object] = {}
        self.sums: Dict[str, float] = {}
        self.steps = 0
        if self.on:
            self._hook(model)

    def _stamp(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name: str) -> None:
        if name in HOOKED and "step" not in self.open:
            return  # a lookup outside a train step (evaluation)
        self.open[name] = self._stamp()

    def stop(self, name: str) -> None:
        if name in self.open:
            self.pending.append((name, self.open.pop(name), self._stamp()))

    def _hook(self, model: nn.Module) -> None:
        for path, m in model.named_modules():
            name = "embedding_fwd" if hasattr(m, "_lookups") else ("trunk_fwd" if path.split(".")[-1] == "trunk"
                                                                  else None)
            if name is None:
                continue
            m.register_forward_pre_hook(lambda *_, n=name: self.start(n))
            m.register_forward_hook(lambda *_, n=name: self.stop(n))

    @contextlib.contextmanager
    def phase(self, name: str):
        with torch.profiler.record_function(f"pinfm.{name}"):
            if not self.on:
                yield
                return
            self.start(name)
            try:
                yield
            finally:
                self.stop(name)
                if name == "step":
                    self.steps += 1

    def summary(self) -> Dict[str, float]:
        """{"perf/phase_<name>_ms": mean ms per step} since the last call (empty when off)."""
        if not self.on or not self.steps:
            return {}
        if self.cuda:
            torch.cuda.synchronize()
        for name, a, b in self.pending:
            ms = a.elapsed_time(b) if self.cuda else 1000.0 * (b - a)
            self.sums[name] = self.sums.get(name, 0.0) + ms
        out = {f"perf/phase_{k}_ms": v / self.steps for k, v in self.sums.items()}
        self.pending, self.sums, self.steps = [], {}, 0
        return out

"""Export the scorer as an artifact a service loads without the training code.

``export_scorer(model, batch, path)`` runs ``torch.export.export`` (non-strict) on
``ScoringModule``: plain tensors in (the request batch in jagged form, padded to one fixed shape,
``scorer.pad_batch``), logits out; the encoder's context pass, the DCAT crossing (the registered
custom op ``pinfm::dcat_fwd``), the TorchRec tables (float or ``torchrec.quant`` int8/int4 TBE,
``fbgemm::*`` ops) and the DLRM ranker are all in the one graph. Saved with ``torch.export.save``
(``.pt2``). A service loads it with

    import torch, pinfm_rec.serve.ops      # fbgemm ops + pinfm::dcat_fwd (CPU kernel: the reference)
    program = torch.export.load("scorer.pt2").module()
    logits = program(*inputs)              # inputs: ``INPUTS`` in order, the exported shapes

(``pinfm_rec.serve.ops`` imports only torch, fbgemm_gpu and ``pinfm_rec.kernels.dcat``.)

The program has static shapes (U requests, L history tokens, C candidates, N longest history,
most candidates per request): pad each call to them (``pad_batch(batch, n, sizes)``); scores of
the padding rows are dropped. What the exported program does differently from the eager model:
ids outside a table are hashed (``id % rows``) instead of raising (check ids before calling), and
on CPU the crossing runs through the custom op (the reference kernel) instead of the eager
dispatcher's choice (the same math).

AOTInductor (``aoti_package``): ``torch._inductor.aoti_compile_and_package`` on the exported
program; the DCAT op is a Python custom op (Triton launcher), which AOTInductor can call only
through its proxy executor from a Python process, so the package still needs ``pinfm_rec.serve.ops``.
"""
from __future__ import annotations

import copy
import os
from typing import Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pinfm_rec.data.batch import SequenceBatch
from pinfm_rec.data.ranking_batch import RankingBatch
from pinfm_rec.features import ACTION_KEY, ITEM_KEY, SURFACE_KEY
from pinfm_rec.model.jagged import lengths_to_offsets
from pinfm_rec.serve.precision import has_precast_linears, precast_linears

INPUTS = ("hist_item", "hist_action", "hist_surface", "hist_ts", "hist_lengths", "request_ts", "cand_item",
          "cand_lengths", "dense")


class ScoringModule(nn.Module):
    """Tensors in, logits out (the exported interface). hist_item / hist_action / hist_surface /
    hist_ts [L] int64 jagged by hist_lengths [U]; request_ts [U]; cand_item [C] jagged by
    cand_lengths [U]; dense [C, F] float32 -> logits [C] (``RankerWithEncoder.logits``).
    max_len N and max_cands are fixed host ints of the exported shape."""

    def __init__(self, model: nn.Module, max_len: int, max_cands: int) -> None:
        super().__init__()
        self.model, self.max_len, self.max_cands = model, max_len, max_cands

    def forward(self, hist_item, hist_action, hist_surface, hist_ts, hist_lengths, request_ts, cand_item,
                cand_lengths, dense) -> torch.Tensor:
        u, c = hist_lengths.shape[0], cand_item.shape[0]
        kjt = KeyedJaggedTensor(keys=[ITEM_KEY, ACTION_KEY, SURFACE_KEY],
                                values=torch.cat([hist_item, hist_action, hist_surface]),
                                lengths=hist_lengths.repeat(3), stride=u)
        hist = SequenceBatch(features=kjt, timestamps=hist_ts, request_ids=torch.zeros_like(hist_lengths),
                             max_len=self.max_len, target_timestamp=request_ts)
        batch = RankingBatch(history=hist, cand_item=cand_item, cand_offsets=lengths_to_offsets(cand_lengths),
                             labels=torch.zeros(c, device=dense.device), dense=dense,
                             cand_new=torch.zeros(c, dtype=torch.bool, device=dense.device), max_cands=self.max_cands)
        return self.model.logits(batch)


def batch_inputs(batch: RankingBatch) -> Tuple[torch.Tensor, ...]:
    """A (padded) RankingBatch -> ``ScoringModule``'s inputs, in ``INPUTS`` order."""
    h = batch.history
    k = h.features
    return (k[ITEM_KEY].values(), k[ACTION_KEY].values(), k[SURFACE_KEY].values(), h.timestamps,
            k[ITEM_KEY].lengths(), h.target_timestamp, batch.cand_item,
            batch.cand_offsets[1:] - batch.cand_offsets[:-1],
            batch.dense.float())


def _custom_op_crossing(model: nn.Module) -> None:
    """Route ``model``'s (a copy made for export) crossing through the registered custom op: kernel
    'triton' (the dispatcher emits ``torch.ops.pinfm.dcat_fwd`` when traced, on any device:
    nothing runs, export traces with fake tensors). No process-wide switch is touched (setting
    TRITON_INTERPRET here once would have made any Triton kernel first imported meanwhile an
    interpreted one for the rest of the process)."""
    enc = model.encoder
    if enc is not None:
        enc.spec.kernel = "triton"
        enc.fm.spec.embedding.id_mode = "hash"  # no data-dependent raise in the graph
    model.id_mode = "hash"


def export_scorer(model: nn.Module, batch: RankingBatch, path: str) -> torch.export.ExportedProgram:
    """Export ``model`` (a loaded fine-tuned RankerWithEncoder, any table dtype) for the shape of
    ``batch`` (already padded: ``scorer.pad_batch``) and save it to ``path`` (.pt2)."""
    import pinfm_rec.serve.ops  # noqa: F401  (the op's CPU kernel, for running the result here)

    m = copy.deepcopy(model).eval()
    if has_precast_linears(m):  # a model scored by Scorer(autocast=...): the program runs without autocast
        precast_linears(m, torch.float32)
    mod = ScoringModule(m, batch.history.max_len, int(batch.max_cands or 0))
    _custom_op_crossing(m)
    with torch.no_grad():
        ep = torch.export.export(mod, batch_inputs(batch), strict=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(ep, path)
    return ep


def aoti_package(ep: torch.export.ExportedProgram, path: str) -> Tuple[Optional[str], str]:
    """AOTInductor package of ``ep`` at ``path`` (.pt2): (path, "ok") or (None, why it failed)."""
    try:
        out = torch._inductor.aoti_compile_and_package(ep, package_path=path)
        return out, "ok"
    except Exception as e:  # noqa: BLE001 - reported, the torch.export artifact stands
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return None, f"{type(e).__name__}: {first}"

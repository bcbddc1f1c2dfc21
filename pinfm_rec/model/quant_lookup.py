"""The lookup of a ``torchrec.quant`` EmbeddingCollection (int8/int4/fp16 tables, FBGEMM's
inference TBE) without its host sync.

``torchrec.quant.EmbeddingCollection.forward`` splits the TBE output by per-feature lengths read
back from the device (``_fx_to_list(torch.sum(lengths))``: a host sync per call). When the KJT
already carries its per-key lengths on the host (``length_per_key`` given or cached, as the
scorer's batches do), ``quant_ec_lookup`` calls the same TBEs on the same indices/offsets and
splits by those host lengths: the same rows, no sync. Module layout read here (``_feature_names``,
``_feature_splits``, ``_emb_modules``) is that of torchrec 1.6-1.8; a module without it, or a KJT
without host lengths, returns None and the caller uses the module's own forward.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor


# every index its own TBE bag: None = on CUDA only (FBGEMM's CPU kernel pays per bag: 41 vs 25 ms
# for a 16,384-token request on the dev CPU); tests set True to check the rows on CPU
ONE_ROW_BAGS = None


def _one_row_bags(counts, device: torch.device) -> torch.Tensor:
    """TBE offsets [T * N + 1] that make every index its own bag (N = max(counts) bags per table,
    table t's first counts[t] of length 1, the rest empty). Pooling NONE emits one row per index in
    index order whatever the bags are, so the rows are those of the request bags; but FBGEMM's
    n-bit kernel gives each bag to one warp and walks its indices in sequence, so a request's
    history as one bag (16,384 tokens at L=16384) ran on a single warp per table: 11.7 ms per
    request against 2.9 ms with bf16 tables (serving bench, H100, 2026-12-06). Host ints only
    (no sync, capturable)."""
    n = max(counts)
    if all(c == n for c in counts):
        return torch.arange(len(counts) * n + 1, device=device)
    ar = torch.arange(n, device=device)
    lens = torch.cat([(ar < c).long() for c in counts])  # [T * N]
    return torch.ops.fbgemm.asynchronous_complete_cumsum(lens)


def is_quant_ec(module) -> bool:
    from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEC

    return isinstance(module, QuantEC)


def quant_ec_lookup(qec, kjt: KeyedJaggedTensor) -> Optional[Dict[str, JaggedTensor]]:
    """``qec(kjt)`` ({feature: JaggedTensor of rows [n_f, D]}) without a host sync, or None when
    ``kjt`` has no host-side per-key lengths or ``qec`` is not laid out as expected."""
    names = getattr(qec, "_feature_names", None)
    splits = getattr(qec, "_feature_splits", None)
    mods = getattr(qec, "_emb_modules", None)
    if kjt._length_per_key is None or names is None or splits is None or mods is None \
            or getattr(qec, "need_indices", lambda: False)() or kjt.variable_stride_per_key():
        return None
    keys = list(kjt.keys())
    if any(k not in keys for k in names):
        return None
    order = [keys.index(k) for k in names]
    if order != list(range(len(keys))):
        kjt = kjt.permute(order)  # host lengths known: no sync
    lpk = kjt.length_per_key()
    values, lengths, b = kjt.values(), kjt.lengths(), kjt.stride()
    cuda = values.device.type == "cuda"
    out: Dict[str, JaggedTensor] = {}
    f0 = v0 = 0
    for mod, nf in zip(mods, splits):
        counts = lpk[f0:f0 + nf]
        nv = sum(counts)
        idx = values[v0:v0 + nv]
        lens = lengths[f0 * b:(f0 + nf) * b]
        one_row = cuda if ONE_ROW_BAGS is None else ONE_ROW_BAGS
        # torch.export / compile: counts are symbolic and the bag layout would guard on them
        # (data-dependent): the traced program takes the request bags (same rows)
        one_row = one_row and not any(isinstance(c, torch.SymInt) for c in counts)
        offs = _one_row_bags(counts, values.device) if nv and one_row else \
            torch.ops.fbgemm.asynchronous_complete_cumsum(lens)
        # the TBE's index types: int32 on CUDA, the indices' type on CPU (as torchrec's unwrap)
        idx, offs = (idx.int(), offs.int()) if cuda else (idx, offs.to(idx.dtype))
        rows = mod.forward(indices=idx, offsets=offs)  # [nv, D] (pooling NONE)
        for i, (name, chunk) in enumerate(zip(names[f0:f0 + nf], rows.split(counts))):
            out[name] = JaggedTensor(values=chunk, lengths=lens[i * b:(i + 1) * b])
        f0, v0 = f0 + nf, v0 + nv
    return out

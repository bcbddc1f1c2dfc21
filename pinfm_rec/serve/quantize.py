"""Serving tables in lower precision through TorchRec's quantized embedding modules.

``quantize_tables(model, "int8")`` swaps every ``EmbeddingCollection`` (the encoder's tables) and
``EmbeddingBagCollection`` (the ranker's) for ``torchrec.quant``'s ``EmbeddingCollection`` /
``EmbeddingBagCollection``, backed by FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``
(inference TBE; runs on CPU with fbgemm-gpu-cpu and on CUDA) via
``torchrec.inference.modules.quantize_embeddings``. Rows are quantized row-wise: int8 / int4 rows
carry an fp16 scale and bias; every row is padded to FBGEMM's 16-byte alignment, so the memory
ratio vs fp32 is 4*D / align16(D*bits/8 + 4): 2.67x at D=32, 3.2x at D=64, 3.56x at D=128 for
int8. Outputs stay fp32 (``output_dtype``), so the rest of the model is unchanged.

``mixed``: int8, except tables narrower than ``MIXED_INT4_BELOW_DIM`` (32) dims, which take int4.
A narrow int8 row is mostly padding (D=16: 20 bytes padded to 32, 2x vs fp32), the int4 row is not
(8 + 4 bytes padded to 16, 4x): a ranker's small-dim id tables otherwise cap the whole model's
ratio (the serving bench's model: int8 3.08x, mixed 3.64x). Per-table dtypes go through
``quantize_embeddings(per_table_weight_dtype=...)``.

``table_bytes`` counts the bytes of every table (float parameters of the float modules, the TBE
weight buffers of the quantized ones); ``quality_delta`` measures AUC / GAUC of a quantized copy
against the float model on a ranking split.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, Optional

import torch

TABLE_DTYPES: Dict[str, Optional[torch.dtype]] = {
    "fp32": None, "fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2, "mixed": torch.qint8,
}
MIXED_INT4_BELOW_DIM = 32  # "mixed": tables with fewer dims than this are int4, the others int8
# bf16 is not offered: torchrec's quantize_state_dict (1.6-1.8) has no BF16 branch and hands a bf16
# table to FBGEMM's n-bit row-wise quantizer with 16 bits, which dies with SIGFPE on CPU. fp16 tables
# (FBGEMM FP16 TBE) are the half-precision option; bf16 compute is the scorer's autocast.


def quantize_tables(model: torch.nn.Module, tables: str) -> torch.nn.Module:
    """``model`` (unsharded, tables on a real device) with its EC / EBC tables stored as ``tables``
    (fp32 | fp16 | int8 | int4 | mixed), in place. fp32 leaves it as it is."""
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_modules import EmbeddingCollection
    from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection

    if tables not in TABLE_DTYPES:
        why = " (bf16 tables: not supported by torchrec.quant; use fp16)" if tables == "bf16" else ""
        raise ValueError(f"tables must be one of {tuple(TABLE_DTYPES)}, got {tables!r}{why}")
    dtype = TABLE_DTYPES[tables]
    if dtype is None:
        return model
    per_table = None
    if tables == "mixed":
        per_table = {name: torch.quint4x2 if dim < MIXED_INT4_BELOW_DIM else torch.qint8
                     for name, dim in table_dims(model).items()}
    return quantize_embeddings(model, dtype=dtype, inplace=True, output_dtype=torch.float,
                               additional_qconfig_spec_keys=[EmbeddingCollection],
                               additional_mapping={EmbeddingCollection: QuantEmbeddingCollection},
                               per_table_weight_dtype=per_table)


def table_dims(model: torch.nn.Module) -> Dict[str, int]:
    """{table name: embedding dim} of every float EC / EBC table in ``model``."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    out: Dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, EmbeddingCollection):
            out.update({c.name: c.embedding_dim for c in m.embedding_configs()})
        elif isinstance(m, EmbeddingBagCollection):
            out.update({c.name: c.embedding_dim for c in m.embedding_bag_configs()})
    return out


def table_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the embedding tables of ``model`` (float EC/EBC parameters, quantized TBE
    weight buffers: host, device and UVM)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    total = 0
    seen = set()
    for m in model.modules():
        if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection)):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
        # torchrec.quant modules hold their TBEs in _emb_modules (a module list only with register_tbes)
        for tbe in [m, *getattr(m, "_emb_modules", [])]:
            if isinstance(tbe, IntNBitTableBatchedEmbeddingBagsCodegen) and id(tbe) not in seen:
                seen.add(id(tbe))
                for name in ("weights_host", "weights_dev", "weights_uvm"):
                    w = getattr(tbe, name, None)
                    if isinstance(w, torch.Tensor):
                        total += w.numel() * w.element_size()
    return total


def quality_delta(model: torch.nn.Module, batches: Iterable, tables: Iterable[str] = ("int8", "int4", "mixed"),
                  device: str | torch.device = "cpu") -> Dict[str, Dict[str, float]]:
    """AUC / GAUC / table bytes of ``model`` (fp32 tables) and of a copy per ``tables`` entry, on
    ``batches`` (RankingBatch, a list: iterated once per variant). Returns {variant: {auc, gauc,
    table_bytes, auc_delta, gauc_delta, memory_ratio}} (deltas and ratio vs fp32)."""
    from pinfm_rec.train.rank_eval import evaluate_ranking

    device = torch.device(device)
    batches = list(batches)
    out: Dict[str, Dict[str, float]] = {}
    for variant in ("fp32", *tables):
        m = model if variant == "fp32" else quantize_tables(copy.deepcopy(model), variant)
        r = evaluate_ranking(m, batches, device)
        out[variant] = {"auc": float(r["auc"]), "gauc": float(r["gauc"]), "table_bytes": table_bytes(m)}
    base = out["fp32"]
    for v in out.values():
        v["auc_delta"] = v["auc"] - base["auc"]
        v["gauc_delta"] = v["gauc"] - base["gauc"]
        v["memory_ratio"] = base["table_bytes"] / max(v["table_bytes"], 1)
    return out

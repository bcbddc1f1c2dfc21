"""PinFM model: embeddings (TorchRec EC), causal trunk with KV cache, sampled-softmax losses."""
from pinfm_rec.model.embedding import (
    EmbeddingSpec,
    TableSpec,
    build_embedding_collection,
    check_ids,
    table_shardings,
    table_sizes,
)
from pinfm_rec.model.losses import LossInputs, LossSpec, sequence_losses
from pinfm_rec.model.pinfm import ModelSpec, PinFM
from pinfm_rec.model.trunk import KVCache, Trunk, TrunkSpec

__all__ = [
    "EmbeddingSpec",
    "TableSpec",
    "build_embedding_collection",
    "check_ids",
    "table_shardings",
    "table_sizes",
    "LossInputs",
    "LossSpec",
    "sequence_losses",
    "ModelSpec",
    "PinFM",
    "KVCache",
    "Trunk",
    "TrunkSpec",
]

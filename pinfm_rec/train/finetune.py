"""Fine-tuning recipe: a TorchRec ranker (DLRM / DLRM_DCN) + the pretrained PinFM encoder on
request-deduplicated impressions.

setup: process group, ranking data (prepared once by rank 0), encoder (architecture from the
pretraining checkpoint's spec.yaml when ``encoder.init=pretrained``), ranker, DMP sharding of the
encoder's EmbeddingCollection and the ranker's EmbeddingBagCollection (fused optimizer, encoder
tables at ``lr_mult`` x lr), pretrained weights loaded through DCP (any number of ranks), dense
AdamW (encoder group at ``lr_mult`` x lr). loop: ``Trainer`` epochs, valid AUC/GAUC each epoch,
checkpoints. cleanup: test metrics, results.json.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict

import torch

from pinfm_rec import console
from pinfm_rec.data.ranking import RankingDataSpec, RankingInfo, build_ranking_loader, prepare_ranking
from pinfm_rec.errors import SpecError
from pinfm_rec.features import vocab_sizes
from pinfm_rec.model.embedding import table_shardings
from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder
from pinfm_rec.model.pinfm import ModelSpec
from pinfm_rec.model.pretrained import check_vocab, encoder_parameter_names, load_pretrained, read_pretrained
from pinfm_rec.parallel import DistEnv, ParallelSpec, shard_model
from pinfm_rec.rankers.dlrm import RankerSpec, RankerWithEncoder, build_ranker, init_encoder_inputs
from pinfm_rec.spec import bounds
from pinfm_rec.train.checkpoint import CheckpointSpec
from pinfm_rec.train.common import Built, Recipe, prepare_on_rank0, seed_everything
from pinfm_rec.train.loop import TrainSpec
from pinfm_rec.train.rank_eval import evaluate_ranking
from pinfm_rec.train.unseen_items import pretraining_corpus, unseen_items, zero_unseen_items

logger = logging.getLogger("pinfm_rec")


@dataclass
class FinetuneSpec:
    """Top-level spec of ``pinfm finetune``."""

    name: str = "finetune"
    seed: int = field(default=0, metadata=bounds(ge=0))
    run_dir: str = ""  # empty → runs/<name>
    tensorboard: bool = True
    data: RankingDataSpec = field(default_factory=RankingDataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)  # encoder architecture (init=random)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    ranker: RankerSpec = field(default_factory=RankerSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    train: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=3, warmup_steps=20, eval_every_epochs=1,
                                                                 early_stop_metric="gauc"))
    checkpoint: CheckpointSpec = field(default_factory=lambda: CheckpointSpec(every_steps=0))
    # at every checkpoint also write an incremental export to <run_dir>/deltas: the encoder's and the
    # ranker's table rows changed since the last one + the dense weights (train/delta_export.py)
    delta_export: bool = False

    def __post_init__(self) -> None:
        # a spec file's `train:` section is built as a TrainSpec, whose default early-stop metric is
        # the retrieval one (ndcg@10), which a ranking run never has: ranking runs stop on GAUC
        if self.train.early_stop_metric == "ndcg@10":
            self.train.early_stop_metric = "gauc"


def _pretrained_spec(path: str, info: RankingInfo) -> ModelSpec:
    """The architecture of the encoder at ``path`` (model.pretrained.read_pretrained), its vocabulary
    checked against the ranking data's (an EncoderError naming both on a mismatch)."""
    model_spec, saved = read_pretrained(path)
    check_vocab(path, vocab_sizes(info), saved,
                argument=f"the ranking data (pretrain the encoder on its corpus {info.pretrain_dir})")
    return model_spec


FTBuilt = Built  # the name tests and benchmarks used


def ranker_id_mode(raw_ids: bool, encoder_id_mode: str) -> str:
    """How the ranker's own item tables (DLRM sparse features, ``num_items`` rows) take ids: raw ids
    (``data.raw_ids``) are hashed into them (a managed encoder admits raw ids; the ranker's tables
    stay plain EmbeddingBagCollection tables); dense ids follow the encoder's mode (``error``: checked)."""
    return "hash" if raw_ids else encoder_id_mode


def _dense_optimizer(dmp, spec: FinetuneSpec):
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = {k: p for k, p in in_backward_optimizer_filter(dmp.named_parameters(), include=False) if p.requires_grad}
    in_encoder = encoder_parameter_names(dmp)  # PinFMEncoder modules by type, any attribute name
    enc = [p for k, p in dense.items() if k in in_encoder]
    rest = [p for k, p in dense.items() if k not in in_encoder]
    lr, wd = spec.train.lr, spec.train.weight_decay
    groups = [{"params": rest, "lr": lr}] + ([{"params": enc, "lr": lr * spec.encoder.lr_mult}] if enc else [])
    dense_opt = KeyedOptimizerWrapper(dense, lambda _: torch.optim.AdamW(groups, lr=lr, weight_decay=wd,
                                                                         betas=(0.9, 0.98)))
    return CombinedOptimizer([("emb", dmp.fused_optimizer), ("dense", dense_opt)]), dense_opt


def build_finetune(spec: FinetuneSpec, env: DistEnv) -> Built:
    info = prepare_on_rank0(prepare_ranking, spec.data, env)
    seed_everything(spec.seed)
    enc_spec = spec.encoder
    encoder = None
    model_spec = spec.model
    if enc_spec.init == "pretrained" and not enc_spec.checkpoint:
        raise SpecError("encoder.init=pretrained needs encoder.checkpoint (a pretraining run's encoder dir)")
    if enc_spec.checkpoint and enc_spec.init != "none":
        # the architecture always comes from the checkpoint, so init=random is the same model untrained
        model_spec = _pretrained_spec(enc_spec.checkpoint, info)
    if enc_spec.init != "none":
        if spec.data.max_len > model_spec.trunk.max_len:
            raise SpecError(f"data.max_len ({spec.data.max_len}) > the encoder trunk's max_len "
                             f"({model_spec.trunk.max_len}): histories would not fit its positions")
        encoder = PinFMEncoder(model_spec, enc_spec, info, device="meta", dense_device=env.device)
        if enc_spec.freeze:
            encoder.freeze()
    dense_in = info.num_dense + (enc_spec.out_dim if encoder is not None else 0)
    ranker = build_ranker(spec.ranker, info.num_items, dense_in, device="meta", dense_device=env.device)
    if encoder is not None and enc_spec.fusion_init == "zero":
        init_encoder_inputs(ranker, info.num_dense, enc_spec.out_dim)
    model = RankerWithEncoder(ranker, encoder, spec.ranker.history_bag_len, freeze_encoder=enc_spec.freeze,
                              num_items=info.num_items,
                              id_mode=ranker_id_mode(spec.data.raw_ids, model_spec.embedding.id_mode))
    shardings = table_shardings(model_spec.embedding) if encoder is not None else {}
    dmp, _ = shard_model(model, spec.parallel, env, shardings, spec.data.batch_size,
                         lr_mult={PinFMEncoder: enc_spec.lr_mult})
    if encoder is not None and enc_spec.init == "pretrained":
        n = load_pretrained(dmp, enc_spec.checkpoint)  # finds the encoder's PinFM by type
        logger.info("loaded %d pretrained encoder tensors from %s", n, enc_spec.checkpoint)
        if enc_spec.unseen_items == "zero":
            corpus = pretraining_corpus(enc_spec.checkpoint, info.pretrain_dir)
            z = zero_unseen_items(dmp, unseen_items(corpus, info.num_items))
            logger.info("zeroed %d pretrained item rows absent from the pretraining corpus %s", z, corpus)
    optimizer, dense_opt = _dense_optimizer(dmp, spec)
    groups = dense_opt.param_groups
    params = [p for g in groups for p in g["params"]]
    autocast = torch.bfloat16 if (env.device.type == "cuda" and spec.parallel.bf16) else None
    return Built(env, info, dmp, optimizer, params, groups, autocast)


def _eval(b: Built, spec: FinetuneSpec, split: str) -> Dict[str, float]:
    loader = build_ranking_loader(spec.data, b.info, split, rank=b.env.rank, world_size=b.env.world_size,
                                  seed=spec.seed)
    batches = console.track(loader, f"eval {split}", spec.train.eval_max_batches)
    return evaluate_ranking(b.model.module, batches, b.env.device, b.autocast, spec.train.eval_max_batches)


class FinetuneRecipe(Recipe):
    spec_cls = FinetuneSpec
    compat_sections = ("model", "ranker")
    checkpoint_every_epoch = False
    make_loader = staticmethod(build_ranking_loader)

    def build(self) -> Built:
        return build_finetune(self.spec, self.env)

    def evaluate(self, split: str) -> Dict[str, float]:
        return _eval(self.b, self.spec, split)

    def describe(self, steps_per_epoch: int, total: int) -> str:
        return (f"finetune: {steps_per_epoch} steps/epoch x {self.spec.train.epochs} epochs on "
                f"{self.env.world_size} rank(s), device {self.env.device}, encoder {self.spec.encoder.init}")

    def result_extra(self) -> dict:
        return {"encoder_init": self.spec.encoder.init}


def finetune(spec: FinetuneSpec, force_cpu: bool = False) -> Dict[str, float]:
    """Run fine-tuning end to end; returns final metrics (also in <run_dir>/results.json)."""
    return FinetuneRecipe(spec, force_cpu).run()

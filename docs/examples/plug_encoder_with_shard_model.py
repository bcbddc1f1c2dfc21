"""plug_encoder_into_dlrm.py (same model, same batch) with pinfm_rec's sharding helper instead of a
hand-made planner + DMP: shard_model plans your tables and the encoder's under the encoder spec's
sharding constraints, attaches the fused table optimizer (the encoder's tables at lr_mult x lr,
found by type), and wraps the dense rest in DDP or FSDP2 (ParallelSpec.dense).
python docs/examples/plug_encoder_with_shard_model.py runs/<pretrain run>/encoder   (or torchrun)"""
import sys

from plug_encoder_into_dlrm import MyRanker, main  # your DLRM, batches and training loop, unchanged
from pinfm_rec.model.embedding import table_shardings
from pinfm_rec.model.encoder import PinFMEncoder
from pinfm_rec.model.pretrained import load_pretrained
from pinfm_rec.parallel import ParallelSpec, build_optimizer, init_distributed, shard_model


def build(export_dir: str, dense: str = "ddp"):  # -> (DMP, optimizer: fused tables + dense AdamW)
    env = init_distributed(ParallelSpec(), force_cpu=True)  # joins torchrun's world, or a world of 1
    encoder = PinFMEncoder.from_pretrained(export_dir, out_dim=8, kernel="pytorch", device="meta",
                                           feature_names={"item_id": "hist_items", "timestamp": "hist_ts"})
    model = MyRanker(encoder, encoder.fm.vocab["num_items"])
    spec = ParallelSpec(embedding_optimizer="sgd", embedding_lr=0.05, dense=dense)
    dmp, _plan = shard_model(model, spec, env, table_shardings(encoder.fm.spec.embedding),
                             lr_mult={PinFMEncoder: 0.5})  # + {"dlrm": m} for your own tables
    load_pretrained(dmp, export_dir)  # pretrained tables + trunk into the plan (collective)
    return dmp, build_optimizer(dmp, lr=1e-3, weight_decay=0.0)


if __name__ == "__main__":
    print(f"loss {main(sys.argv[1], make=build):.4f}")  # the plain example's training loop, this build

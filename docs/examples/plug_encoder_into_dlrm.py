"""Plug the pretrained PinFM encoder into your own TorchRec DLRM: plain TorchRec, your own tables.
python docs/examples/plug_encoder_into_dlrm.py runs/<pretrain run>/encoder   (or torchrun -nproc_per_node N)"""
import os
import sys

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.models.dlrm import DLRM
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from pinfm_rec.model.encoder import PinFMEncoder
from pinfm_rec.model.pretrained import load_pretrained


class MyRanker(torch.nn.Module):  # your DLRM; its dense input gains the encoder's features
    def __init__(self, encoder: PinFMEncoder, num_items: int, num_dense: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        ebc = EmbeddingBagCollection(device=torch.device("meta"), tables=[EmbeddingBagConfig(
            name="my_items", embedding_dim=8, num_embeddings=num_items, feature_names=["cand_item"])])
        self.dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=num_dense + encoder.out_dim,
                         dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])

    def forward(self, dense, sparse, history, candidates, request_ts):  # dense [C, F], sparse: C rows
        feats = self.encoder(history, candidates, request_ts)  # [C, out_dim]; history once per request
        return self.dlrm(torch.cat([dense, feats], -1), sparse).squeeze(-1)


def build(export_dir: str, model_cls=MyRanker):  # -> (DMP, dense optimizer); tables update in backward
    encoder = PinFMEncoder.from_pretrained(export_dir, out_dim=8, kernel="pytorch", device="meta",
                                           feature_names={"item_id": "hist_items", "timestamp": "hist_ts"})
    model = model_cls(encoder, encoder.fm.vocab["num_items"])
    tables = [p for n, p in model.named_parameters() if "embedding" in n]  # yours and the encoder's
    apply_optimizer_in_backward(torch.optim.SGD, tables, {"lr": 0.05})
    planner = EmbeddingShardingPlanner(Topology(world_size=dist.get_world_size(), compute_device="cpu"),
                                       constraints=encoder.sharding_constraints())  # + your tables' constraints
    plan = planner.collective_plan(model, pg=dist.group.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
    load_pretrained(dmp, export_dir)  # pretrained tables + trunk into any sharding plan (collective)
    return dmp, torch.optim.Adam([p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=1e-3)


def example_batch(seed: int, num_items: int = 40):  # 3 requests: 10 history events, 6 candidates
    g = torch.Generator().manual_seed(seed)
    events = torch.cat([torch.randint(0, num_items, (10,), generator=g), torch.arange(10) * 60])  # items, times
    history = KeyedJaggedTensor.from_lengths_sync(["hist_items", "hist_ts"], events, torch.tensor([4, 0, 6] * 2))
    cand = torch.randint(0, num_items, (6,), generator=g)
    candidates = KeyedJaggedTensor.from_lengths_sync(["cand"], cand, torch.tensor([2, 3, 1]))  # per request
    sparse = KeyedJaggedTensor.from_lengths_sync(["cand_item"], cand, torch.ones(6, dtype=torch.long))  # C rows
    return torch.randn(6, 3, generator=g), sparse, history, candidates, torch.full((3,), 900), (cand % 2).float()


def main(export_dir: str, steps: int = 3, make=None) -> float:  # make: another build(export_dir)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # alone: a world of one; torchrun sets these
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("gloo", rank=int(os.environ.get("RANK", 0)),
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
    dmp, opt = (make or build)(export_dir)
    *inputs, labels = example_batch(dist.get_rank(), dmp.module.encoder.fm.vocab["num_items"])
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(*inputs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss)


if __name__ == "__main__":
    print(f"loss {main(sys.argv[1]):.4f}")

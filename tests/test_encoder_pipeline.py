"""TorchRec's TrainPipelineSparseDist drives a user's model (the docs example's DLRM with its own
EmbeddingBagCollection + the pretrained encoder) with a pipelineable batch of KJTs: same losses as a
plain training loop, the user's tables pipelined, the encoder traced as one call."""
import importlib.util
import os
import socket
from dataclasses import dataclass, fields

import pytest
import torch
import torch.distributed as dist
import yaml
from torchrec import KeyedJaggedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.streamable import Pipelineable

from pinfm_rec.model import EmbeddingSpec, ModelSpec, PinFM, TrunkSpec
from pinfm_rec.spec import to_dict
from pinfm_rec.train.checkpoint import export_encoder

_spec = importlib.util.spec_from_file_location("plug_example", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples", "plug_encoder_into_dlrm.py"))
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


@dataclass
class UserBatch(Pipelineable):
    """A user's batch type: what TrainPipelineSparseDist needs is to/record_stream/pin_memory."""

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    history: KeyedJaggedTensor
    candidates: KeyedJaggedTensor
    request_ts: torch.Tensor
    labels: torch.Tensor

    def _map(self, fn) -> "UserBatch":
        return UserBatch(*(fn(getattr(self, f.name)) for f in fields(self)))

    def to(self, device: torch.device, non_blocking: bool = False) -> "UserBatch":
        return self._map(lambda x: x.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream) -> None:
        self._map(lambda x: x.record_stream(stream))

    def pin_memory(self) -> "UserBatch":
        return self._map(lambda x: x.pin_memory())


class PipelinedRanker(example.MyRanker):
    """The pipeline calls model(batch) and wants (loss, output)."""

    def forward(self, b: UserBatch):
        logits = super().forward(b.dense, b.sparse, b.history, b.candidates, b.request_ts)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
        return loss, (loss.detach(), logits.detach())


def _train(path: str, pipelined: bool, steps: int = 8):
    torch.manual_seed(0)
    dmp, opt = example.build(path, PipelinedRanker)
    batches = [UserBatch(*example.example_batch(i % 2)) for i in range(steps)]
    losses = []
    if pipelined:
        pipe = TrainPipelineSparseDist(dmp, opt, device=torch.device("cpu"))
        it = iter(batches)
        for _ in range(steps):
            losses.append(float(pipe.progress(it)[0]))
        assert [type(m).__name__ for m in pipe._pipelined_modules] == ["ShardedEmbeddingBagCollection"]
        with pytest.raises(StopIteration):
            pipe.progress(it)
    else:
        for b in batches:
            loss, _ = dmp(b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    return losses


def test_train_pipeline_sparse_dist_trains_a_model_holding_the_encoder(tmp_path):
    owned = not dist.is_initialized()
    if owned:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ms = ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=16, n_layers=1, n_heads=2, max_len=20))
        vocab = {"num_items": 40, "num_actions": 4, "num_surfaces": 3}
        path = export_encoder(str(tmp_path / "encoder"), PinFM(ms, vocab, device="cpu"),
                              yaml.safe_dump({"model": to_dict(ms)}), vocab, rank=0)
        plain, piped = _train(path, False), _train(path, True)
        assert plain[-1] < plain[0]
        torch.testing.assert_close(piped, plain, rtol=1e-5, atol=1e-6)
    finally:
        if owned:
            dist.destroy_process_group()

"""encoder.fusion_init=zero: the ranker fed the encoder starts as a draw of the ranker alone (its
output independent of the encoder, its own dense inputs at the alone ranker's init scale)."""
from __future__ import annotations

import pytest
import torch

from pinfm_rec.data.ranking_batch import random_ranking_batch
from pinfm_rec.errors import SpecError
from pinfm_rec.model.embedding import EmbeddingSpec
from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder
from pinfm_rec.model.pinfm import ModelSpec
from pinfm_rec.model.trunk import TrunkSpec
from pinfm_rec.rankers.dlrm import RankerSpec, RankerWithEncoder, build_ranker, init_encoder_inputs
from pinfm_rec.spec import load_spec

NUM_ITEMS, F, OUT = 40, 3, 8


def _encoder(seed: int) -> PinFMEncoder:
    torch.manual_seed(seed)
    ms = ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=32, n_layers=1, n_heads=2, dropout=0.0,
                                                                    max_len=16))
    return PinFMEncoder(ms, EncoderSpec(kernel="pytorch", out_dim=OUT),
                        dict(num_items=NUM_ITEMS, num_actions=4, num_surfaces=3), device="cpu")


@pytest.mark.parametrize("arch", ["dlrm", "dlrm_dcn"])
def test_zero_fusion_init_output_ignores_the_encoder_and_keeps_the_alone_init_scale(arch):
    rs = RankerSpec(arch=arch, embedding_dim=8, dense_arch=[16, 8], over_arch=[16, 1], history_bag_len=5)
    torch.manual_seed(0)
    ranker = build_ranker(rs, NUM_ITEMS, F + OUT, device="cpu")
    lin = ranker.dense_arch.model._mlp[0]._linear
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    init_encoder_inputs(ranker, F, OUT)
    scale = ((F + OUT) / F) ** 0.5
    torch.testing.assert_close(lin.weight[:, :F], w0[:, :F] * scale)  # U(+-1/sqrt(F)), as the ranker alone
    torch.testing.assert_close(lin.bias, b0 * scale)
    assert not bool(lin.weight[:, F:].any())
    assert float(lin.weight[:, :F].abs().max()) <= 1 / F ** 0.5 + 1e-6
    b = random_ranking_batch(torch.Generator().manual_seed(3), [4, 0, 9], [3, 2, 4], num_items=NUM_ITEMS,
                             num_dense=F)
    outs = []
    for seed in (1, 2):  # two different encoders: the same logits
        m = RankerWithEncoder(ranker, _encoder(seed), 5).eval()
        assert bool(m.encoder(b).abs().sum() > 0)
        outs.append(m.logits(b).detach())
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    m.train()
    m(b)["loss"].backward()
    assert float(lin.weight.grad[:, F:].abs().sum()) > 0  # the encoder's columns learn
    with pytest.raises(ValueError, match="takes 11 inputs, expected 3 \\+ 4"):
        init_encoder_inputs(ranker, F, 4)


def test_fusion_init_spec():
    from pinfm_rec.train.finetune import FinetuneSpec

    assert load_spec(FinetuneSpec, None, ["encoder.fusion_init=zero"]).encoder.fusion_init == "zero"
    with pytest.raises(SpecError, match=r"encoder\.fusion_init': zero with proj_init=zero"):
        load_spec(FinetuneSpec, None, ["encoder.fusion_init=zero", "encoder.proj_init=zero"])
    with pytest.raises(SpecError, match=r"encoder\.fusion_init' must be one of"):
        load_spec(FinetuneSpec, None, ["encoder.fusion_init=small"])

"""The encoder's modules are found by type, not by attribute name: shard_model's table lr_mult
({PinFMEncoder: m}), the fine-tune recipe's dense optimizer groups and vocabulary/spec reading go
through model.pretrained (encoder_parameter_names, read_pretrained, check_vocab)."""
import json

import pytest
import torch
import yaml
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from pinfm_rec.errors import EncoderError
from pinfm_rec.model import EmbeddingSpec, ModelSpec, TrunkSpec
from pinfm_rec.model.encoder import EncoderSpec, PinFMEncoder
from pinfm_rec.model.pretrained import encoder_module_paths, encoder_parameter_names
from pinfm_rec.parallel import ParallelSpec, init_distributed, shard_model, shutdown_distributed
from pinfm_rec.spec import to_dict

VOCAB = dict(num_items=40, num_actions=4, num_surfaces=3)
MS = ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=16, n_layers=1, n_heads=2, max_len=20))


def _holder(device="meta"):
    """A user's model whose encoder attribute is not called 'encoder'."""
    m = torch.nn.Module()
    m.pretrained_part = PinFMEncoder(MS, EncoderSpec(kernel="pytorch", out_dim=4), VOCAB, device=device)
    m.ebc = EmbeddingBagCollection(device=torch.device(device), tables=[EmbeddingBagConfig(
        name="mine", embedding_dim=8, num_embeddings=40, feature_names=["x"])])
    m.head = torch.nn.Linear(2, 2)
    return m


def test_encoder_paths_and_parameter_names_by_type():
    m = _holder("cpu")
    assert encoder_module_paths(m) == ["pretrained_part"]
    names = encoder_parameter_names(m)
    assert "pretrained_part.proj.weight" in names and "pretrained_part.fm.ec.embeddings.t_item.weight" in names
    assert not any(n.startswith(("ebc.", "head.")) for n in names)
    assert names == {n for n, _ in m.named_parameters() if n.startswith("pretrained_part.")}


def test_lr_mult_and_dense_groups_follow_the_encoder_type():
    from pinfm_rec.train.finetune import FinetuneSpec, _dense_optimizer

    env = init_distributed(ParallelSpec(), force_cpu=True)
    try:
        m = _holder()
        enc = m.pretrained_part
        dmp, _ = shard_model(m, ParallelSpec(embedding_optimizer="sgd", embedding_lr=0.1), env, {},
                             lr_mult={PinFMEncoder: 0.25})
        lrs = {name: [g["lr"] for g in o.param_groups] for name, o in dmp.fused_optimizer.optimizers}
        assert lrs["pretrained_part.fm.ec"] == [pytest.approx(0.025)] and lrs["ebc"] == [pytest.approx(0.1)]
        spec = FinetuneSpec()
        spec.train.lr, spec.encoder.lr_mult = 1e-3, 0.5
        _, dense_opt = _dense_optimizer(dmp, spec)
        rest, encg = dense_opt.param_groups
        want = {id(p) for n, p in enc.named_parameters() if not n.startswith("fm.ec.")}
        assert {id(p) for p in encg["params"]} == want and encg["lr"] == pytest.approx(5e-4)
        assert {id(p) for p in rest["params"]} == {id(p) for p in m.head.parameters()}
    finally:
        shutdown_distributed()


def _pretrained_dir(d, meta_name, num_items):
    d.mkdir()
    (d / "spec.yaml").write_text(yaml.safe_dump({"model": to_dict(MS)}))
    (d / "COMPLETE").write_text("")
    (d / meta_name).write_text(json.dumps(dict(VOCAB, num_items=num_items)))
    return str(d)


@pytest.mark.parametrize("meta_name", ["encoder_meta.json", "train_state.json"])  # export / checkpoint
def test_finetune_reads_the_encoder_spec_and_checks_vocab(tmp_path, meta_name):
    from types import SimpleNamespace

    from pinfm_rec.train.finetune import _pretrained_spec

    info = SimpleNamespace(**VOCAB, pretrain_dir="pre")
    assert _pretrained_spec(_pretrained_dir(tmp_path / "ok", meta_name, 40), info) == MS
    with pytest.raises(EncoderError, match=r"ranking data .*corpus pre\): num_items=40 \(the encoder has 41\)"):
        _pretrained_spec(_pretrained_dir(tmp_path / "wrong", meta_name, 41), info)
    with pytest.raises(EncoderError, match="no such encoder export"):
        _pretrained_spec(str(tmp_path / "missing"), info)

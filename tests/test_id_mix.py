"""embedding.managed.id_hash=mix: the bijection on [0, 2**k) raw ids go through before TorchRec's
bucket routing (model/id_mix.py), its use in the managed table (slot state mixed, ``slot_ids``
original ids, out-of-range ids refused), the spec rule, and the old-spec rule (a spec saved before
the key existed loads as id_hash=none)."""
import json

import pytest
import torch
import yaml

from pinfm_rec.errors import CheckpointError, SpecError
from pinfm_rec.model.id_mix import _constants, hash_bits, mix, unmix
from pinfm_rec.model.managed import LEGACY_ID_HASH, ManagedSpec, legacy_spec_defaults, slot_ids

BITS = (1, 2, 3, 7, 16, 33, 40, 62, 63)


def _reference(x: int, bits: int) -> int:
    """The mix in Python integers (no overflow): what the int64 torch ops must reproduce exactly."""
    s, _, c1, c2, _, _ = _constants(bits)
    m = 1 << bits
    x = ((x ^ (x >> s)) * c1) % m
    return ((x ^ (x >> s)) * c2) % m


@pytest.mark.parametrize("bits", BITS)
def test_mix_is_an_exact_bijection_with_its_inverse(bits):
    top = (1 << bits) - 1
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.tensor([0, 1, top, top - 1]), torch.randint(0, max(top, 1), (20000,), generator=g)])
    y = mix(x, bits)
    assert y.dtype == torch.int64 and y.shape == x.shape
    assert bool((y >= 0).all()) and bool((y <= top).all())  # stays in [0, 2**bits)
    assert torch.equal(unmix(y, bits), x)  # exact inverse
    assert y[:200].tolist() == [_reference(int(v), bits) for v in x[:200]]  # int64 wrap is exact mod 2**bits
    if bits <= 16:  # exhaustively one-to-one
        assert torch.unique(mix(torch.arange(1 << bits), bits)).numel() == 1 << bits
    else:  # distinct ids stay distinct (zero collisions kept)
        assert torch.unique(y).numel() == torch.unique(x).numel()


@pytest.mark.parametrize("buckets", [2, 4, 8])
def test_mix_spreads_a_packed_catalogue_over_equal_buckets(buckets):
    """10k ids 2**40 + k * 7919 all sit in bucket 0 of [0, 2**62) as they are; mixed, every bucket
    gets n / b within 4 binomial standard deviations (deterministic ids: measured 5012/4988,
    max 3.1% off for 4 buckets, 6.3% for 8)."""
    n = 10_000
    ids = 2**40 + torch.arange(n) * 7919
    assert int((ids // (2**62 // buckets)).max()) == 0
    counts = torch.bincount(mix(ids, 62) // (2**62 // buckets), minlength=buckets)
    mean, sd = n / buckets, (n / buckets * (1 - 1 / buckets)) ** 0.5
    assert counts.numel() == buckets and bool(((counts - mean).abs() <= 4 * sd).all()), counts.tolist()
    # snowflake-like ids (shared high bits, low bits a sequence) too
    snow = (1_700_000_000_000 << 22) + torch.arange(n) * 4096
    counts = torch.bincount(mix(snow, 62) // (2**62 // buckets), minlength=buckets)
    assert bool(((counts - mean).abs() <= 4 * sd).all()), counts.tolist()


def test_hash_bits_needs_a_power_of_two():
    assert hash_bits(2**62) == 62 and hash_bits(2) == 1
    with pytest.raises(ValueError, match="2\\*\\*62"):
        hash_bits(2**63)  # a mixed id could be int64 max, the free-slot marker
    for bad in (3, 10**6, 2**62 + 1, 1, 2**64):
        with pytest.raises(ValueError, match="power of two.*id_hash=none"):
            hash_bits(bad)


def _model(**kw):
    from test_model_managed import managed_model

    return managed_model(**kw)


def test_managed_table_mixes_ids_and_slot_ids_gives_the_originals():
    from test_model_managed import raw_batch
    from torchrec.modules.mc_modules import MCHManagedCollisionModule

    ids = 2**40 + torch.arange(40) * 7919
    seen = {}
    for id_hash in ("mix", "none"):
        m = _model(id_hash=id_hash)
        assert m.ec.bits == (62 if id_hash == "mix" else 0)
        b = raw_batch(ids, seed=3)
        m(b)
        raw, slot = slot_ids(m)
        used = torch.unique(torch.cat([b.features["item_id"].values(), b.features["neg_item_id"].values()]))
        assert sorted(raw.tolist()) == used.tolist()  # the ORIGINAL raw ids, either way
        mch = next(x for x in m.modules() if isinstance(x, MCHManagedCollisionModule))
        state = mch._mch_sorted_raw_ids[mch._mch_sorted_raw_ids != torch.iinfo(torch.int64).max]
        want = mix(used, 62) if id_hash == "mix" else used
        assert sorted(state.tolist()) == sorted(want.tolist())  # the slot state holds mixed ids
        seen[id_hash] = m.eval().item_embeddings(ids[:5])
    assert seen["mix"].shape == seen["none"].shape


@pytest.mark.parametrize("bad", [-1, 2**62, 2**62 + 5])
def test_out_of_range_raw_ids_raise_a_clear_error(bad):
    m = _model().eval()
    with pytest.raises(ValueError, match=rf"raw item id.*{bad} is outside \[0, {2**62}\).*input_hash_size"):
        m.item_embeddings(torch.tensor([2**40, bad]))


def test_model_rejects_a_hash_size_that_is_no_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        _model(input_hash_size=10**6)
    assert _model(input_hash_size=10**6, id_hash="none").ec.bits == 0


def test_spec_check_names_the_key():
    from pinfm_rec.spec import load_spec
    from pinfm_rec.train.pretrain import PretrainSpec

    base = ["model.embedding.id_mode=managed"]
    with pytest.raises(SpecError, match=r"key 'model.embedding.managed.input_hash_size': 1000000 is not a power of two"):
        load_spec(PretrainSpec, None, base + ["model.embedding.managed.input_hash_size=1000000"])
    with pytest.raises(SpecError, match=r"input_hash_size': 9223372036854775808 is not a power of two up to 2\*\*62"):
        load_spec(PretrainSpec, None, base + [f"model.embedding.managed.input_hash_size={2**63}"])
    assert load_spec(PretrainSpec, None, base + ["model.embedding.managed.input_hash_size=1000000",
                                                 "model.embedding.managed.id_hash=none"]).model.embedding.managed.id_hash == "none"
    assert load_spec(PretrainSpec, None, base).model.embedding.managed.id_hash == "mix"  # default
    with pytest.raises(SpecError, match="id_hash"):
        load_spec(PretrainSpec, None, base + ["model.embedding.managed.id_hash=crc"])


def _old_model_section(id_mode="managed") -> dict:
    """The ``model`` section of a spec saved before id_hash existed (resolved: the other keys written)."""
    from pinfm_rec.model import ModelSpec
    from pinfm_rec.spec import to_dict

    d = to_dict(ModelSpec())
    d["embedding"]["id_mode"] = id_mode
    del d["embedding"]["managed"]["id_hash"]
    return d


def test_specs_saved_before_id_hash_load_as_none(tmp_path):
    assert LEGACY_ID_HASH == "none" and ManagedSpec().id_hash == "mix"
    old = _old_model_section()
    assert legacy_spec_defaults(old)["embedding"]["managed"]["id_hash"] == "none"
    assert "id_hash" not in old["embedding"]["managed"]  # not changed in place
    assert legacy_spec_defaults(_old_model_section("error")) == _old_model_section("error")  # only managed
    new = legacy_spec_defaults({"embedding": {"id_mode": "managed", "managed": {"id_hash": "mix"}}})
    assert new["embedding"]["managed"]["id_hash"] == "mix"  # a saved key wins

    # an encoder export / pretraining checkpoint (read_pretrained: fine-tune, pinfm score, init_from)
    from pinfm_rec.model.pretrained import read_pretrained

    exp = tmp_path / "encoder"
    exp.mkdir()
    (exp / "COMPLETE").write_text("")
    (exp / "encoder_meta.json").write_text(json.dumps({"num_items": 30, "num_actions": 4, "num_surfaces": 3}))
    (exp / "spec.yaml").write_text(yaml.safe_dump({"model": old}))
    assert read_pretrained(str(exp))[0].embedding.managed.id_hash == "none"
    (exp / "spec.yaml").write_text(yaml.safe_dump({"model": {**old, "embedding": {
        **old["embedding"], "managed": {**old["embedding"]["managed"], "id_hash": "mix"}}}}))
    assert read_pretrained(str(exp))[0].embedding.managed.id_hash == "mix"

    # a fine-tuning run's spec (pinfm score's loader)
    from pinfm_rec.serve.model_io import _read_spec

    ft = tmp_path / "ft.yaml"
    ft.write_text(yaml.safe_dump({"encoder": {"init": "none"}, "model": old}))
    assert _read_spec(str(ft)).model.embedding.managed.id_hash == "none"

    # resuming / evaluating: the saved spec compares as none, so a spec now asking for mix is refused by name
    from pinfm_rec.spec import dump_spec, load_spec
    from pinfm_rec.train.checkpoint import check_resume_compatible
    from pinfm_rec.train.pretrain import PretrainSpec

    ck = tmp_path / "run" / "checkpoints" / "step-1"
    ck.mkdir(parents=True)
    (ck / "spec.yaml").write_text(yaml.safe_dump({"model": old}))
    now = load_spec(PretrainSpec, None, ["model.embedding.id_mode=managed"])
    with pytest.raises(CheckpointError, match=r"model.embedding.managed.id_hash: checkpoint 'none' != now 'mix'"):
        check_resume_compatible(str(ck), dump_spec(now), ("model",), PretrainSpec)
    now.model.embedding.managed.id_hash = "none"
    check_resume_compatible(str(ck), dump_spec(now), ("model",), PretrainSpec)

    # `pinfm eval --spec runs/<name>` reads the run's saved spec.yaml with the old rule
    from pinfm_rec.cli import is_saved_spec

    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump({"model": old}))
    saved = str(tmp_path / "run" / "spec.yaml")
    assert is_saved_spec(saved) and not is_saved_spec(str(ft))
    assert load_spec(PretrainSpec, saved, saved=True).model.embedding.managed.id_hash == "none"
    assert load_spec(PretrainSpec, saved).model.embedding.managed.id_hash == "mix"  # a user's spec: the default


def test_init_from_refuses_another_id_hash():
    from pinfm_rec.model import ModelSpec
    from pinfm_rec.train.init_from import _arch

    a, b = ModelSpec(), ModelSpec()
    for s in (a, b):
        s.embedding.id_mode = "managed"
    b.embedding.managed.id_hash = "none"
    assert _arch(a)["managed.id_hash"] != _arch(b)["managed.id_hash"]
    a.embedding.id_mode = b.embedding.id_mode = "error"
    assert _arch(a) == _arch(b)  # dense ids: the key does not matter

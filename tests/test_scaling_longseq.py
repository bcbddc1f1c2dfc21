"""Long sequences: the trunk's activation checkpointing (model.trunk.activation_checkpointing) gives
the same outputs and gradients as keeping activations, and scripts/scaling/long_seq.py steps
max_len up on CPU (the GPU run finds the H200's limit)."""
import importlib.util
import json
import os

import pytest
import torch

from pinfm_rec.model.trunk import Trunk, TrunkSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grads(ac: bool, block: str):
    torch.manual_seed(0)
    trunk = Trunk(TrunkSpec(d_model=16, n_layers=2, n_heads=2, dropout=0.1, max_len=12, block=block,
                            activation_checkpointing=ac))
    trunk.train()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    offsets = torch.tensor([0, 12, 15, 20])
    torch.manual_seed(2)  # the same dropout masks (checkpoint replays the RNG state in the recompute)
    h = trunk(x, offsets, 12)
    (h * torch.arange(16.0)).sum().backward()
    return h.detach(), x.grad, {n: p.grad for n, p in trunk.named_parameters()}


def test_activation_checkpointing_same_outputs_and_gradients(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for block in ("transformer", "hstu"):
        h0, gx0, g0 = _grads(False, block)
        h1, gx1, g1 = _grads(True, block)
        torch.testing.assert_close(h1, h0, rtol=0, atol=0)
        torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)
        assert g0.keys() == g1.keys() and all(g0[k] is not None for k in g0)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7)
    assert len(calls) == 4  # one per layer, for each block type, only in the checkpointed runs


@pytest.mark.slow
def test_long_seq_script_steps_max_len_up_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("long_seq", os.path.join(ROOT, "scripts/scaling/long_seq.py"))
    ls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ls)
    out = tmp_path / "long_seq.json"
    assert ls.main(["--cpu", "--lens", "24,48", "--batch", "2", "--steps", "2", "--runs", str(tmp_path / "runs"),
                    "--out", str(out)]) == 0
    s = json.load(open(out))
    assert s["max_len_fits"] == {"no_activation_checkpointing": 48, "activation_checkpointing": 48}
    rows = s["rows"]
    assert [(r["max_len"], r["activation_checkpointing"]) for r in rows] == [(24, False), (48, False), (48, True)]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert "model.trunk.activation_checkpointing=true" in rows[-1]["command"]

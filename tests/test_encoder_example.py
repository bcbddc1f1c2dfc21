"""docs/examples/plug_encoder_into_dlrm.py runs as documented: a pretrained export plugged into a
user's own TorchRec DLRM (own EmbeddingBagCollection, plain DMP + planner, KJT inputs); and
plug_encoder_with_shard_model.py, the same with pinfm_rec.parallel.shard_model."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from pinfm_rec.model import EmbeddingSpec, ModelSpec, PinFM, TrunkSpec
from pinfm_rec.spec import to_dict
from pinfm_rec.train.checkpoint import export_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "docs", "examples")


@pytest.mark.parametrize("example", ["plug_encoder_into_dlrm.py", "plug_encoder_with_shard_model.py"])
def test_example_plugs_the_encoder_into_a_users_dlrm(tmp_path, example):
    torch.manual_seed(0)
    ms = ModelSpec(embedding=EmbeddingSpec(dim=16), trunk=TrunkSpec(d_model=16, n_layers=1, n_heads=2, max_len=20))
    vocab = {"num_items": 40, "num_actions": 4, "num_surfaces": 3}
    path = export_encoder(str(tmp_path / "encoder"), PinFM(ms, vocab, device="cpu"),
                          yaml.safe_dump({"model": to_dict(ms)}), vocab, rank=0)
    example = os.path.join(EXAMPLES, example)
    # keep the caller's PYTHONPATH (a GPU host puts its torchrec/fbgemm_gpu there) after the project root
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, MASTER_PORT=str(29500 + os.getpid() % 1000))
    out = subprocess.run([sys.executable, example, path], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loss = float(out.stdout.strip().split()[-1])
    assert 0.0 < loss < 5.0
    with open(example) as f:
        code = [line for line in f.read().splitlines() if line.strip()]
    assert len(code) <= 60 and max(map(len, code)) <= 120  # the docs promise a short example


def test_finetune_doc_shows_the_examples_as_they_run():
    """docs/finetune.md carries the plain example verbatim and the shard_model variant's build()
    as it is in the file CI runs, so the doc has no undefined names nor stale lines."""
    with open(os.path.join(ROOT, "docs", "finetune.md")) as f:
        blocks = f.read().split("```python\n")[1:]
    blocks = [b.split("```")[0] for b in blocks]
    with open(os.path.join(EXAMPLES, "plug_encoder_into_dlrm.py")) as f:
        assert f.read() in blocks
    with open(os.path.join(EXAMPLES, "plug_encoder_with_shard_model.py")) as f:
        variant = f.read()
    assert any(b.startswith("def build(") and b in variant for b in blocks)

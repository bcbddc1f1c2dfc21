"""``pinfm smoke``: a short pretrain that exercises the whole stack on whatever is present.

On a CUDA machine: nccl, FBGEMM fused TBE kernels under DMP, bf16 autocast. On CPU: gloo, the
same code. Prints the device, the sharding plan (shown by parallel.shard_model) and a table of
step times, throughput and peak memory.
"""
from __future__ import annotations

from typing import List

from pinfm_rec import console
from pinfm_rec.spec import load_spec
from pinfm_rec.train.pretrain import PretrainSpec, pretrain


def smoke_spec(spec_path: str, overrides: List[str], steps: int = 30) -> PretrainSpec:
    """The spec at ``spec_path`` as a fresh ``steps``-step run named 'smoke' (no periodic eval or
    checkpoints, no resume); ``overrides`` apply last."""
    base = [
        "name=smoke",
        f"train.max_steps={steps}",
        f"train.log_every={max(1, steps // 6)}",
        "train.eval_every_epochs=0",
        "train.eval_max_batches=4",
        "checkpoint.every_steps=0",
        "checkpoint.resume=false",
        "checkpoint.on_existing=overwrite",  # each smoke run replaces the previous one
    ]
    return load_spec(PretrainSpec, spec_path, base + list(overrides))


def smoke(spec: PretrainSpec, force_cpu: bool = False) -> dict:
    """Run ``spec`` (see ``smoke_spec``) and print its step-time table; returns the results."""
    res = pretrain(spec, force_cpu=force_cpu)
    rows = [[p["step"], p["perf/step_ms"], p["perf/tokens_per_s"], p["perf/examples_per_s"],
             p["perf/peak_mem_mb"], p.get("train/loss", float("nan"))] for p in res.get("perf", [])]
    if rows:
        console.echo(console.table(["step", "step ms", "tokens/s", "examples/s", "peak mem MB", "loss"], rows))
    console.echo(f"smoke OK on {res['device']} (world {res['world_size']}): {res['steps']} steps, "
                 f"test hr@10={res.get('test_hr@10', float('nan')):.4f} wall {res['wall_s']:.1f}s")
    return res

"""``pinfm smoke``: a short pretrain that exercises the whole stack on whatever is present.

On a CUDA machine: nccl, FBGEMM fused TBE kernels under DMP, bf16 autocast. On CPU: gloo, the
same code. Prints the device, the sharding plan (logged by parallel.shard_model) and a table of
step times, throughput and peak memory.
"""
from __future__ import annotations

from typing import List, Optional

from pinfm_rec.spec import load_spec


def smoke(spec_path: Optional[str], overrides: List[str], steps: int = 30, force_cpu: bool = False) -> dict:
    from pinfm_rec.cli import resolve_spec_path
    from pinfm_rec.train.pretrain import PretrainSpec, pretrain

    base = [
        "name=smoke",
        f"train.max_steps={steps}",
        f"train.log_every={max(1, steps // 6)}",
        "train.eval_every_epochs=0",
        "train.eval_max_batches=4",
        "checkpoint.every_steps=0",
        "checkpoint.resume=false",
    ]
    spec = load_spec(PretrainSpec, resolve_spec_path(spec_path), base + list(overrides))
    res = pretrain(spec, force_cpu=force_cpu)
    perf = res.get("perf", [])
    if perf:
        print("\n| step | step ms | tokens/s | examples/s | peak mem MB | loss |")
        print("|---:|---:|---:|---:|---:|---:|")
        for p in perf:
            print(f"| {p['step']} | {p['perf/step_ms']:.1f} | {p['perf/tokens_per_s']:.0f} | "
                  f"{p['perf/examples_per_s']:.0f} | {p['perf/peak_mem_mb']:.0f} | {p.get('train/loss', float('nan')):.4f} |")
    print(f"\nsmoke OK on {res['device']} (world {res['world_size']}): {res['steps']} steps, "
          f"test hr@10={res.get('test_hr@10', float('nan')):.4f} wall {res['wall_s']:.1f}s")
    return res

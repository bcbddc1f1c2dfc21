"""``pinfm eval``: load a checkpoint (or encoder export) and report full-ranking metrics."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

from pinfm_rec.parallel import init_distributed, shutdown_distributed
from pinfm_rec.spec import dump_spec
from pinfm_rec.train.checkpoint import check_resume_compatible, latest_checkpoint, load_model_state
from pinfm_rec.train.pretrain import PretrainSpec, build, run_dir_of, run_eval, setup_logging

logger = logging.getLogger("pinfm_rec")


def evaluate_checkpoint(spec: PretrainSpec, checkpoint: Optional[str] = None, force_cpu: bool = False) -> Dict[str, float]:
    """Valid and test HR@K/NDCG@K of ``checkpoint`` (default: newest complete one of the run)."""
    run_dir = run_dir_of(spec)
    path = checkpoint or latest_checkpoint(spec.checkpoint.dir or os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir}/checkpoints; pass --checkpoint")
    spec_yaml = dump_spec(spec)
    # the model built from this spec must be the one the checkpoint holds (else keys would be
    # silently dropped or left at their init): a clear error naming the differing keys
    check_resume_compatible(path, spec_yaml, ("model",), PretrainSpec)
    env = init_distributed(spec.parallel, force_cpu=force_cpu)
    setup_logging(env.rank)
    logger.info("resolved spec:\n%s", spec_yaml)
    b = build(spec, env, with_optimizer=False)
    load_model_state(path, b.model)
    logger.info("loaded %s", path)
    out = {f"valid_{k}": v for k, v in run_eval(b, spec, "valid").items()}
    out.update({f"test_{k}": v for k, v in run_eval(b, spec, "test").items()})
    out["checkpoint"] = path
    if env.is_main:
        logger.info("eval %s", json.dumps(out))
    shutdown_distributed()
    return out

"""``pinfm eval``: load a run's checkpoint and report its metrics on valid and test.

The run kind decides the metrics: a pretraining run (``PretrainSpec``) gets full-ranking HR@K /
NDCG@K (train/evaluate.py), a fine-tuning run (``FinetuneSpec``) ranking metrics (AUC, GAUC, NE,
log loss, calibration; train/rank_eval.py). The model is built by the run's own recipe, so eval
and training can never disagree on the architecture or the data.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, Optional

from pinfm_rec.errors import CheckpointError
from pinfm_rec.parallel import for_evaluation, init_distributed, shutdown_distributed
from pinfm_rec.spec import dump_spec
from pinfm_rec.train.checkpoint import check_resume_compatible, load_model_state, model_checkpoint

logger = logging.getLogger("pinfm_rec")


def _recipe(spec, kind: str, force_cpu: bool):
    if kind == "finetune":
        from pinfm_rec.train.finetune import FinetuneRecipe

        # the fine-tuned weights come from the checkpoint: do not load the pretrained encoder first
        # (the architecture still comes from encoder.checkpoint's spec.yaml, as in training)
        if spec.encoder.init == "pretrained":
            spec = dataclasses.replace(spec, encoder=dataclasses.replace(spec.encoder, init="random"))
        return FinetuneRecipe(spec, force_cpu)
    from pinfm_rec.train.pretrain import PretrainRecipe

    return PretrainRecipe(spec, force_cpu)


def evaluate_run(spec, kind: str, checkpoint: Optional[str] = None, force_cpu: bool = False) -> Dict[str, object]:
    """Valid and test metrics of ``checkpoint`` (default: the run's newest intact one, or its
    best-valid one when it early-stopped).

    kind: 'pretrain' or 'finetune' (``cli.spec_kind``). Returns ``valid_<metric>``,
    ``test_<metric>`` and ``checkpoint``. Collective: every rank calls it.
    """
    recipe = _recipe(spec, kind, force_cpu)
    run_dir = spec.run_dir or os.path.join("runs", spec.name)
    ckpt_dir = spec.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    path = checkpoint or model_checkpoint(ckpt_dir)  # early-stopped runs: the best-valid one
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint of run '{spec.name}'; train it first "
                              f"or pass --checkpoint")
    spec_yaml = dump_spec(spec)
    # the model built from this spec must be the one the checkpoint holds (else keys would be
    # silently dropped or left at their init): a clear error naming the differing keys
    check_resume_compatible(path, spec_yaml, recipe.compat_sections, recipe.spec_cls)
    recipe.env = init_distributed(spec.parallel, force_cpu=force_cpu)
    # evaluated only: a table optimizer this device lacks (a GPU run's adam on a CPU host) is not needed
    recipe.spec = dataclasses.replace(spec, parallel=for_evaluation(spec.parallel, recipe.env.device))
    logger.info("resolved spec:\n%s", spec_yaml)
    recipe.b = recipe.build()
    load_model_state(path, recipe.b.model)
    logger.info("loaded %s", path)
    out: Dict[str, object] = {f"valid_{k}": v for k, v in recipe.evaluate("valid").items()}
    out.update({f"test_{k}": v for k, v in recipe.evaluate("test").items()})
    out["checkpoint"] = path
    logger.info("eval %s", out)
    shutdown_distributed()
    return out


def evaluate_checkpoint(spec, checkpoint: Optional[str] = None, force_cpu: bool = False) -> Dict[str, object]:
    """HR@K / NDCG@K of a pretraining run's checkpoint (``evaluate_run`` of kind 'pretrain')."""
    return evaluate_run(spec, "pretrain", checkpoint, force_cpu)

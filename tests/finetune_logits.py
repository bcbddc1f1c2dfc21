"""Test helper: the logits a fine-tuning recipe's own (DMP) model gives on a split, to compare the
scorer and exported artifacts against."""
import torch


def training_logits(spec, checkpoint, split: str = "test"):
    """{(request id, candidate position): logit} of the recipe's own (DMP) model on ``split``."""
    from pinfm_rec.data.ranking import build_ranking_loader
    from pinfm_rec.parallel import init_distributed, shutdown_distributed
    from pinfm_rec.train.checkpoint import load_model_state
    from pinfm_rec.train.finetune import FinetuneRecipe

    recipe = FinetuneRecipe(spec, force_cpu=True)
    recipe.env = init_distributed(spec.parallel, force_cpu=True)
    try:
        b = recipe.build()
        load_model_state(checkpoint, b.model)
        model = b.model.module.eval()
        out = {}
        with torch.no_grad():
            for batch in build_ranking_loader(spec.data, b.info, split):
                logits = model.logits(batch).numpy()
                off = batch.cand_offsets.numpy()
                for i, r in enumerate(batch.request_ids.numpy()):
                    for j in range(off[i + 1] - off[i]):
                        out[(int(r), j)] = float(logits[off[i] + j])
        return out
    finally:
        shutdown_distributed()

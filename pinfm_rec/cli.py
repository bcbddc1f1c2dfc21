"""``pinfm`` command line: pretrain | eval | smoke | prepare-data | finetune.

    pinfm pretrain --spec specs/pretrain/synthetic-tiny.yaml train.epochs=2 data.batch_size=64
    pinfm eval     --spec specs/pretrain/ml1m-cpu.yaml [--checkpoint runs/ml1m-cpu/checkpoints/step_00001000]
    pinfm smoke    [--steps 30]          # CUDA + nccl + FBGEMM fused kernels + bf16 when a GPU is present
    pinfm prepare-data --spec specs/pretrain/ml1m-cpu.yaml
    pinfm prepare-ranking --spec specs/finetune/mind.yaml    # prints pretrain_dir, storage ratio
    pinfm finetune --spec specs/finetune/synthetic-tiny.yaml encoder.checkpoint=runs/ft-pre/encoder

Run under ``torchrun`` (or ``torchx run components/pinfm.py:pretrain``) for several ranks.
Every ``key=value`` after the options is a dotted spec override; unknown keys are errors.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from pinfm_rec.spec import SpecError, load_spec

SPEC_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")


def resolve_spec_path(path: Optional[str]) -> Optional[str]:
    """A spec path as given, or relative to the repo's specs/ (``pretrain/ml1m-cpu``)."""
    if not path:
        return None
    if os.path.isfile(path):
        return path
    for cand in (os.path.join(SPEC_ROOT, path), os.path.join(SPEC_ROOT, path + ".yaml")):
        if os.path.isfile(cand):
            return cand
    return path  # load_spec reports "not found" with the path


def _load_pretrain_spec(path: Optional[str], overrides: List[str]):
    from pinfm_rec.train.pretrain import PretrainSpec

    return load_spec(PretrainSpec, resolve_spec_path(path), overrides)


def cmd_pretrain(args) -> int:
    from pinfm_rec.train.pretrain import pretrain

    spec = _load_pretrain_spec(args.spec, args.overrides)
    pretrain(spec, force_cpu=args.cpu)
    return 0


def cmd_eval(args) -> int:
    from pinfm_rec.train.standalone_eval import evaluate_checkpoint

    spec = _load_pretrain_spec(args.spec, args.overrides)
    res = evaluate_checkpoint(spec, args.checkpoint, force_cpu=args.cpu)
    print(json.dumps(res, indent=1))
    return 0


def cmd_smoke(args) -> int:
    from pinfm_rec.train.smoke import smoke

    smoke(args.spec, args.overrides, steps=args.steps, force_cpu=args.cpu)
    return 0


def cmd_prepare(args) -> int:
    from pinfm_rec.data.prepare import prepare_dataset

    spec = _load_pretrain_spec(args.spec, args.overrides)
    info = prepare_dataset(spec.data)
    print(json.dumps({k: v for k, v in vars(info).items() if k != "item_counts"}, indent=1, default=str))
    return 0


def cmd_finetune(args) -> int:
    from pinfm_rec.train.finetune import FinetuneSpec, finetune

    finetune(load_spec(FinetuneSpec, resolve_spec_path(args.spec), args.overrides), force_cpu=args.cpu)
    return 0


def cmd_prepare_ranking(args) -> int:
    from dataclasses import asdict

    from pinfm_rec.data.ranking import prepare_ranking, storage_report
    from pinfm_rec.train.finetune import FinetuneSpec

    spec = load_spec(FinetuneSpec, resolve_spec_path(args.spec), args.overrides)
    info = prepare_ranking(spec.data)
    out = asdict(info)
    out["storage"] = storage_report(info.root)
    print(json.dumps(out, indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pinfm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        ("pretrain", cmd_pretrain, "pretrain the sequence model (resumes from the newest checkpoint)"),
        ("eval", cmd_eval, "full-ranking HR/NDCG of a checkpoint on valid and test"),
        ("smoke", cmd_smoke, "a few steps on GPU (or CPU) printing the sharding plan and step times"),
        ("prepare-data", cmd_prepare, "convert/generate the dataset of a spec into the Parquet cache"),
        ("prepare-ranking", cmd_prepare_ranking,
         "convert ranking data of a finetune spec (prints its pretraining corpus dir and storage sizes)"),
        ("finetune", cmd_finetune, "train a TorchRec ranker (DLRM) + the pretrained encoder on ranking data"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--spec", default=None if name != "smoke" else "pretrain/synthetic-tiny",
                        help="YAML spec (path, or name under specs/, e.g. pretrain/ml1m-cpu)")
        sp.add_argument("--cpu", action="store_true", help="stay on CPU/gloo even if CUDA is present")
        if name == "eval":
            sp.add_argument("--checkpoint", default=None, help="checkpoint dir (default: newest complete one)")
        if name == "smoke":
            sp.add_argument("--steps", type=int, default=30)
        sp.add_argument("overrides", nargs="*", help="dotted key=value spec overrides")
        sp.set_defaults(fn=fn)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        logging.getLogger("pinfm_rec").error("%s", e)
        print(f"pinfm: spec error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

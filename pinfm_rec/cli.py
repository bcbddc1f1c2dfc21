"""pinfm {pretrain, finetune, eval, smoke, prepare-data, prepare-ranking, plan, score}: PinFM on TorchRec.

    pinfm pretrain --spec specs/pretrain/synthetic-tiny.yaml train.epochs=2 data.batch_size=64
    pinfm finetune --spec specs/finetune/synthetic-tiny.yaml encoder.checkpoint=runs/synthetic-tiny/encoder
    pinfm eval     --spec runs/synthetic-tiny/spec.yaml      # pretraining or fine-tuning run, newest checkpoint
    pinfm smoke                                               # GPU (nccl, fused TBE, bf16) if present, else CPU
    pinfm prepare-data    --spec specs/pretrain/ml1m-cpu.yaml
    pinfm prepare-ranking --spec specs/finetune/mind.yaml
    pinfm plan --spec specs/pretrain/synthetic-50m.yaml --world-size 16   # sharding plan, nothing runs

Every ``key=value`` after the options overrides a dotted spec key (unknown keys are errors). The
console shows a header, progress bars and a result table; everything else (library logs, the
planner's statistics, warnings, tracebacks) is in runs/<name>/log.txt (``--verbose`` shows it).
A user error (spec, data, checkpoint, run locked, encoder, device, missing input file) prints one
line ``pinfm: <kind>: <message>`` and exits with code 2 (``--debug``: with its traceback). Run
under ``torchrun`` (or ``torchx run components/pinfm.py:pretrain``) for several ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Callable, List, Optional, Tuple

import yaml

from pinfm_rec import console
from pinfm_rec.errors import PinfmError, Preempted, SpecError
from pinfm_rec.serve import cli as _score_cli  # options only (argparse); the scorer loads on use
from pinfm_rec.spec import load_spec

SPEC_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
SMOKE_SPEC = "pretrain/synthetic-tiny"


def resolve_spec_path(path: str) -> str:
    """A spec path as given, a run dir holding spec.yaml, or a name under the repo's specs/
    (``pretrain/ml1m-cpu``)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "spec.yaml")):
        return os.path.join(path, "spec.yaml")
    if os.path.isfile(path):
        return path
    for cand in (os.path.join(SPEC_ROOT, path), os.path.join(SPEC_ROOT, path + ".yaml")):
        if os.path.isfile(cand):
            return cand
    return path  # load_spec reports "not found" with the path


def spec_kind(path: str) -> str:
    """'finetune' when the spec (or a run's saved spec.yaml) has an ``encoder`` or ``ranker``
    section, else 'pretrain'."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping of sections, got {type(raw).__name__}")
    return "finetune" if {"encoder", "ranker"} & set(raw) else "pretrain"


def _spec_class(kind: str):
    if kind == "finetune":
        from pinfm_rec.train.finetune import FinetuneSpec

        return FinetuneSpec
    from pinfm_rec.train.pretrain import PretrainSpec

    return PretrainSpec


def _load(args, kind: Optional[str] = None):
    """(spec, kind) of ``--spec`` + overrides; ``kind`` None: detected from the file."""
    path = resolve_spec_path(args.spec)
    kind = kind or spec_kind(path)
    overrides = args.overrides
    if kind == "pretrain":  # `auto` values (data/scaling.py): chosen from the dataset, as overrides
        from pinfm_rec.data.scaling import auto_overrides

        overrides = auto_overrides(path, overrides)
    return load_spec(_spec_class(kind), path, overrides, saved=is_saved_spec(path)), kind


def is_saved_spec(path: str) -> bool:
    """``path`` is the resolved spec.yaml a run saved (beside its checkpoints / in a checkpoint)."""
    d = os.path.dirname(os.path.abspath(path))
    return os.path.basename(path) == "spec.yaml" and (
        os.path.isdir(os.path.join(d, "checkpoints")) or os.path.isfile(os.path.join(d, "COMPLETE")))


def run_dir_of(spec) -> str:
    return spec.run_dir or os.path.join("runs", spec.name)


def _begin(command: str, args, spec, trains: bool = True) -> str:
    """Attach the run's log file (a command that does not train only to an existing run dir) and
    print the first header line; returns the run dir."""
    run_dir = run_dir_of(spec)
    if trains or os.path.isdir(run_dir):
        console.attach_run_log(run_dir, save_plan=trains)
    console.run_header(command, args.spec, run_dir)
    return run_dir


def _show_results(res: dict) -> None:
    console.echo(console.result_table(res))
    wall = res.get("wall_s")
    tail = f" in {wall:.1f}s" if isinstance(wall, (int, float)) else ""
    console.echo(f"{res.get('steps', 0)} steps{tail} on {res.get('device', '?')} "
                 f"(world size {res.get('world_size', 1)})")


def _check_device(spec, args) -> None:
    """What this host's device cannot run (adam tables, nccl without CUDA): one line, exit 2, before
    the run dir exists."""
    from pinfm_rec.parallel import check_device

    check_device(spec.parallel, force_cpu=args.cpu)


def cmd_pretrain(args) -> int:
    from pinfm_rec.train.pretrain import pretrain

    spec, _ = _load(args, "pretrain")
    _check_device(spec, args)
    run_dir = _begin("pretrain", args, spec)
    _show_results(pretrain(spec, force_cpu=args.cpu))
    console.echo(f"encoder export: {run_dir}/encoder")
    return 0


def cmd_finetune(args) -> int:
    from pinfm_rec.train.finetune import finetune

    spec, _ = _load(args, "finetune")
    _check_device(spec, args)
    _begin("finetune", args, spec)
    _show_results(finetune(spec, force_cpu=args.cpu))
    return 0


def cmd_eval(args) -> int:
    from pinfm_rec.train.standalone_eval import evaluate_run

    spec, kind = _load(args)
    _begin(f"eval ({kind} run)", args, spec, trains=False)
    res = evaluate_run(spec, kind, args.checkpoint, force_cpu=args.cpu)
    console.echo(f"checkpoint {res['checkpoint']}")
    console.echo(console.result_table(res))
    if args.json:
        console.echo(json.dumps(res, indent=1))
    return 0


def cmd_smoke(args) -> int:
    from pinfm_rec.train.smoke import smoke, smoke_spec

    spec = smoke_spec(resolve_spec_path(args.spec), args.overrides, steps=args.steps)
    _check_device(spec, args)
    _begin("smoke", args, spec)
    smoke(spec, force_cpu=args.cpu)
    return 0


def cmd_prepare(args) -> int:
    from pinfm_rec.data.prepare import prepare_dataset

    spec, _ = _load(args, "pretrain")
    info = prepare_dataset(spec.data)
    print(json.dumps({k: v for k, v in vars(info).items() if k != "item_counts"}, indent=1, default=str))
    return 0


def cmd_prepare_ranking(args) -> int:
    from dataclasses import asdict

    from pinfm_rec.data.ranking import prepare_ranking, storage_report

    spec, _ = _load(args, "finetune")
    info = prepare_ranking(spec.data)
    out = asdict(info)
    raw = out.pop("item_raw_ids", None)  # data.raw_ids: a range, not num_items ids
    if raw is not None:
        out["item_raw_ids"] = {"count": int(raw.size), "min": int(raw.min()), "max": int(raw.max())} if raw.size else {}
    out["storage"] = storage_report(info.root)
    print(json.dumps(out, indent=1, default=str))
    return 0


def cmd_plan(args) -> int:
    from torchrec.distributed.planner.types import PlannerError

    from pinfm_rec.parallel import spec_plan_rows

    spec, _ = _load(args, "pretrain")
    device = "cpu" if args.cpu else "cuda"
    try:
        rows = spec_plan_rows(spec, args.world_size, device, args.hbm_gb, args.gpus_per_host)
    except PlannerError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "failed" in ln), str(e).strip()[:200])
        raise SpecError(f"{args.spec}: no sharding plan fits {args.world_size} device(s) of {args.hbm_gb:g} GB "
                        f"({why.split('. ')[0]}): use more devices, row_wise sharding or --hbm-gb") from e
    where = "CPU ranks" if args.cpu else f"GPUs ({args.hbm_gb:g} GB each, {args.gpus_per_host} per host)"
    console.echo(f"sharding plan of {args.spec} on {args.world_size} {where}:")
    console.echo(console.plan_table(rows))
    if args.out:
        console.save_plan(args.out, rows, args.world_size)
        console.echo(f"written: {os.path.join(args.out, 'plan.txt')}, plan.json")
    return 0


def cmd_score(args) -> int:
    from pinfm_rec.serve.cli import run

    run(args)
    return 0


# name, function, one-line help, description, example
COMMANDS: List[Tuple[str, Callable, str, str, str]] = [
    ("pretrain", cmd_pretrain, "pretrain the sequence model",
     "Pretrain PinFM (sharded EmbeddingCollection + causal transformer trunk) on a spec's event data: "
     "valid HR/NDCG each epoch, checkpoints, test metrics, encoder export to runs/<name>/encoder. "
     "Re-running the same command resumes from the run's newest complete checkpoint.",
     "pinfm pretrain --spec specs/pretrain/synthetic-tiny.yaml train.epochs=2"),
    ("finetune", cmd_finetune, "fine-tune a TorchRec ranker (DLRM) with the pretrained encoder",
     "Train a TorchRec ranker (DLRM / DLRM_DCN) joined to the pretrained PinFM encoder (DCAT crossing, "
     "request dedup) on ranking data; reports AUC / GAUC / NE / log loss on valid and test.",
     "pinfm finetune --spec specs/finetune/synthetic-tiny.yaml encoder.checkpoint=runs/synthetic-tiny/encoder"),
    ("eval", cmd_eval, "evaluate a run's checkpoint (pretraining: HR/NDCG, fine-tuning: AUC/GAUC)",
     "Evaluate a checkpoint of a run on its valid and test splits. The run kind comes from the spec: "
     "a pretraining run gets full-ranking HR@K / NDCG@K, a fine-tuning run ranking metrics (AUC, GAUC, "
     "NE, log loss). --spec takes the spec the run was started with, its saved runs/<name>/spec.yaml, "
     "or the run dir itself.",
     "pinfm eval --spec runs/synthetic-tiny            # the run's newest complete checkpoint"),
    ("smoke", cmd_smoke, "a few training steps exercising the whole stack (GPU if present)",
     "A short pretraining run (name 'smoke', no resume) on CUDA + nccl + FBGEMM fused kernels + bf16 when "
     "a GPU is present, else CPU/gloo; prints the sharding plan and a table of step times, throughput "
     "and peak memory.",
     "pinfm smoke --steps 30"),
    ("prepare-data", cmd_prepare, "convert/generate a pretraining spec's dataset into the Parquet cache",
     "Convert (or generate) the event data of a pretraining spec into its validated Parquet cache "
     "(data.cache_dir) and print the dataset's sizes. Training does this on first use too.",
     "pinfm prepare-data --spec specs/pretrain/ml1m-cpu.yaml data.path=/data/ml-1m/ratings.dat"),
    ("prepare-ranking", cmd_prepare_ranking, "convert a fine-tuning spec's ranking data",
     "Convert the ranking data of a fine-tuning spec (impressions stored once per request); prints the "
     "prepared dir, the pretraining corpus dir to pretrain the encoder on, and storage sizes.",
     "pinfm prepare-ranking --spec specs/finetune/mind.yaml"),
    ("plan", cmd_plan, "print the sharding plan of a pretraining spec for N GPUs, without running",
     "The sharding plan TorchRec's planner would make for a pretraining spec on --world-size devices "
     "(table, sharding type, ranks, rows x dim, MB of weights per rank), computed without a process group "
     "or a GPU; --out writes plan.txt / plan.json as a run does.",
     "pinfm plan --spec specs/pretrain/synthetic-50m.yaml --world-size 16 --gpus-per-host 8"),
    ("score", cmd_score, "score request-grouped Parquet with a fine-tuned run (serving path)",
     _score_cli.DESCRIPTION, _score_cli.EXAMPLE),
]


def _global_flags(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, print the full traceback (it is always in the run's log.txt)")
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="show every log record on the console (library logs, planner stats, warnings)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pinfm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_flags(p, False)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(c[0] for c in COMMANDS) + "}")
    for name, fn, helptext, description, example in COMMANDS:
        sp = sub.add_parser(name, help=helptext, description=textwrap.fill(description, 88),
                            epilog=f"example:\n  {example}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "smoke":
            sp.add_argument("--spec", default=SMOKE_SPEC,
                            help="YAML spec (path, run dir, or name under specs/); default: %(default)s")
        elif name == "score":
            _score_cli.add_options(sp)  # --run/--spec and the scorer's options
        else:
            sp.add_argument("--spec", required=True,
                            help="YAML spec: a path, a run dir / its spec.yaml, or a name under specs/ "
                                 "(e.g. pretrain/ml1m-cpu)")
        if name in ("pretrain", "finetune", "eval", "smoke"):
            sp.add_argument("--cpu", action="store_true", help="stay on CPU/gloo even if CUDA is present")
        if name == "eval":
            sp.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the run's newest complete one)")
            sp.add_argument("--json", action="store_true", help="also print the metrics as JSON")
        if name == "smoke":
            sp.add_argument("--steps", type=int, default=30, help="training steps (default: %(default)s)")
        if name == "plan":
            sp.add_argument("--world-size", type=int, required=True, help="devices (ranks) in all")
            sp.add_argument("--gpus-per-host", type=int, default=8, help="ranks per host (default: %(default)s)")
            sp.add_argument("--hbm-gb", type=float, default=141.0, help="GB per GPU (default: %(default)s, H200)")
            sp.add_argument("--cpu", action="store_true", help="plan for CPU ranks (gloo)")
            sp.add_argument("--out", default="", help="write plan.txt / plan.json into this dir")
        _global_flags(sp, argparse.SUPPRESS)
        sp.add_argument("overrides", nargs="*", help="dotted key=value spec overrides, e.g. train.epochs=2")
        sp.set_defaults(fn=fn)
    return p


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def _where() -> str:
    return f" (traceback in {console.log_path()})" if console.log_path() else " (--debug shows the traceback)"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (argparse alone stops taking positionals
    after the first option that follows them)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = list(getattr(args, "overrides", None) or []) + extra
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        # C++ warnings (c10 / FBGEMM LOG(WARNING)) print straight to stderr, past Python's logging:
        # errors only, unless --verbose or the user set the level (torch is not imported yet)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    console.configure(verbose=args.verbose)
    try:
        return args.fn(args)
    except Preempted as e:
        console.log_exception(e, "preempted")
        print(f"pinfm: preempted: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (PinfmError, FileNotFoundError) as e:
        console.log_exception(e)
        if args.debug:
            raise
        kind = e.kind if isinstance(e, PinfmError) else "file not found"
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        hint = "" if isinstance(e, (SpecError, FileNotFoundError)) else _where()
        print(f"pinfm: {kind}: {_one_line(msg)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        console.log_exception(e, "interrupted")
        if args.debug:
            raise
        print("pinfm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: keep the traceback, on the console and in the log
        console.log_exception(e, "unexpected error")
        raise


if __name__ == "__main__":
    sys.exit(main())

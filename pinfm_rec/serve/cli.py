"""``pinfm score``: options and the command (``pinfm_rec/cli.py`` registers it; nothing heavy is
imported until the command runs)."""
from __future__ import annotations

import argparse
import json

DESCRIPTION = (
    "Score request-grouped Parquet (one row per request: history lists + candidate lists, schema in "
    "pinfm_rec/serve/requests_io.py) with a fine-tuned run's model (encoder + ranker, its best-valid or "
    "newest checkpoint): each request's context is encoded once, all its candidates are scored with DCAT, "
    "the ranker gives one score per candidate. Writes request_id, cand_index, item_id, score, logit "
    "(+ label). --make-input writes an input file from a split of the run's prepared ranking data; "
    "--export saves the scorer as a torch.export program (.pt2).")
EXAMPLE = "pinfm score --run runs/ft-synthetic-tiny --input requests.parquet --output scores.parquet --tables int8"


def add_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--spec", "--run", dest="spec", required=True, metavar="RUN",
                    help="the fine-tuning run: its dir (runs/<name>), its spec.yaml, or a checkpoint dir")
    sp.add_argument("--input", help="request-grouped Parquet to score")
    sp.add_argument("--output", help="Parquet of scores to write (one row per candidate)")
    sp.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the run's best-valid / newest)")
    sp.add_argument("--tables", default="fp32", choices=("fp32", "fp16", "int8", "int4", "mixed"),
                    help=("embedding table storage (torchrec.quant / FBGEMM TBE below fp32; mixed: int8, tables "
                          "under 32 dims int4); default %(default)s"))
    sp.add_argument("--batch-requests", type=int, default=256, help="requests per batch (default %(default)s)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the hot path (static bucketed shapes)")
    sp.add_argument("--cuda-graphs", action="store_true",
                    help="replay a CUDA graph of the scoring forward per bucketed shape (CUDA only; off by default)")
    sp.add_argument("--no-buckets", dest="buckets", action="store_false",
                    help="do not pad batches to power-of-two shapes")
    sp.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    sp.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is present")
    sp.add_argument("--make-input", metavar="SPLIT", choices=("train", "valid", "test"),
                    help="write --input from this split of the run's prepared ranking data, then score it")
    sp.add_argument("--max-requests", type=int, default=None, help="with --make-input: at most this many requests")
    sp.add_argument("--export", metavar="PATH", help="also save the scorer as a torch.export program for the "
                                                     "first batch's bucket shape (pinfm_rec/serve/export.py)")
    sp.add_argument("--aoti", metavar="PATH", help="with --export: also an AOTInductor package of it (.pt2; "
                                                   "compiles C++, about a minute on 2 CPU cores)")


def run(args) -> dict:
    """The command: returns the summary it prints."""
    import os

    import torch

    from pinfm_rec import console
    from pinfm_rec.cli import resolve_spec_path
    from pinfm_rec.errors import SpecError
    from pinfm_rec.serve.model_io import load_finetuned
    from pinfm_rec.serve.quantize import quantize_tables, table_bytes
    from pinfm_rec.serve.requests_io import RequestFile, write_request_file
    from pinfm_rec.serve.scorer import Scorer, history_cap, pad_batch

    if args.overrides:
        raise SpecError(f"pinfm score takes no key=value overrides (got {args.overrides}); it serves the run "
                        f"as trained")
    if not args.input or not (args.output or args.export):
        raise SpecError("pinfm score needs --input and --output (or --export)")
    run_path = args.spec
    if os.path.isfile(run_path):  # a spec.yaml: its run dir
        run_path = os.path.dirname(os.path.abspath(resolve_spec_path(run_path)))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    loaded = load_finetuned(run_path, args.checkpoint, device=device)
    if args.make_input:
        from pinfm_rec.data.ranking import prepare_ranking

        info = prepare_ranking(loaded.spec.data)
        n = write_request_file(info.root, args.make_input, args.input, args.max_requests,
                               raw_ids=loaded.spec.data.raw_ids)
        console.echo(f"wrote {n} {args.make_input} requests to {args.input}")
    fp32_bytes = table_bytes(loaded.model)
    quantize_tables(loaded.model, args.tables)
    req = RequestFile(args.input, loaded.num_dense)
    req.check_item_ids(*loaded.item_id_rule())
    out = {"checkpoint": loaded.checkpoint, "device": str(device), "tables": args.tables,
           "table_bytes": table_bytes(loaded.model), "table_bytes_fp32": fp32_bytes}
    if args.export:  # first: the Scorer's --bf16 casts the model's Linear weights (serve/precision.py)
        from pinfm_rec.serve.export import export_scorer

        first = next(req.batches(args.batch_requests, loaded.max_len), None)
        if first is None:
            raise SpecError(f"--export: {args.input} has no request to take the shape from")
        ep = export_scorer(loaded.model, pad_batch(first[0], history_cap(loaded.model, loaded.max_len)), args.export)
        console.echo(f"exported the scorer to {args.export} (load: import torch, pinfm_rec.serve.ops; "
                     f"torch.export.load(path).module())")
        if args.aoti:
            from pinfm_rec.serve.export import aoti_package

            path, why = aoti_package(ep, args.aoti)
            out["aoti"] = why
            console.echo(f"AOTInductor package: {path} (load: torch._inductor.aoti_load_package)" if path
                         else f"AOTInductor packaging failed: {why}; the torch.export program stands")
    if args.output:
        scorer = Scorer(loaded.model, loaded.max_len, device, buckets=args.buckets, compile=args.compile,
                        autocast=torch.bfloat16 if args.bf16 else None, cuda_graphs=args.cuda_graphs)
        out.update(scorer.score_file(req, args.output, args.batch_requests))
        console.echo(f"scored {out['requests']} requests, {out['candidates']} candidates in {out['wall_s']:.2f}s "
                     f"({out['candidates_per_s']:.0f} candidates/s) -> {args.output}")
    console.echo(json.dumps(out))
    return out

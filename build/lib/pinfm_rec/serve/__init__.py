"""Serving the fine-tuned ranker (issue 15): ``pinfm score``.

requests_io.py  request-grouped Parquet schema, converter from a prepared ranking dir, scores writer
model_io.py     load a fine-tuning run's checkpoint unsharded (no data, no process group)
scorer.py       batched scoring (context once + DCAT + ranker), bucketed shapes, compiled hot path
quantize.py     fp16 / int8 / int4 tables (torchrec.quant, FBGEMM TBE), table memory, AUC/GAUC delta
export.py       torch.export (.pt2) of the scorer, AOTInductor package; ops.py: what loading it needs
bench.py        load benchmark against the peers (docs/benchmarks/serving.json)
cli.py          the ``pinfm score`` options and command
"""

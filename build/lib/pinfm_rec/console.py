"""What a ``pinfm`` run shows on the console, and where everything else goes.

The console (rank 0) gets a short header (spec, run dir, device, world size, the sharding plan as a
small table), a progress bar for training and for each evaluation (loss, throughput) and one result
table at the end; warnings of pinfm_rec itself and errors of anything also show. Everything logged
(library INFO logs, torchrec's planner stats, FBGEMM's TBE argument dumps, Python warnings, the
traceback of a failed run) goes to the run's log file ``<run_dir>/log.txt`` (rank r > 0:
``log.rank<r>.txt``); ``--verbose`` shows it on the console too.

    console.configure(verbose=False)          # once, by the CLI (before anything logs)
    console.attach_run_log("runs/x")          # records so far, and from now on, go to runs/x/log.txt
    console.echo("...")                       # a console line (rank 0), also in the log file
    bar = console.Progress(96, "train")       # tqdm on a terminal, a plain line every 30 s otherwise
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

LOG_FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
_ECHO = "pinfm_echo"  # record attribute: already printed by echo(), the console handler skips it
_FILE_ONLY = "pinfm_file_only"  # record attribute: for the log file only (e.g. a traceback)
PLAIN_INTERVAL_S = 30.0  # without a terminal, a progress line at most this often


@dataclass
class _State:
    verbose: bool = False
    configured: bool = False
    console: Optional[logging.Handler] = None
    buffer: Optional["_Buffer"] = None
    file: Optional[logging.Handler] = None
    log_path: str = ""
    plan_dir: str = ""  # where show_plan saves plan.txt / plan.json ('' = nowhere)
    bars: List["Progress"] = field(default_factory=list)


_state = _State()


def rank() -> int:
    """This process's global rank (torchrun's RANK; 0 outside torchrun)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def verbose() -> bool:
    return _state.verbose


def configured() -> bool:
    """Whether ``configure`` ran (the CLI routes the logs; library callers keep their own)."""
    return _state.configured


def log_path() -> str:
    """The run's log file ('' before ``attach_run_log``)."""
    return _state.log_path


class _ConsoleFilter(logging.Filter):
    """Default console: pinfm_rec's warnings and anyone's errors. Verbose: every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _ECHO, False) or getattr(record, _FILE_ONLY, False):
            return False
        if _state.verbose:
            return True
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.startswith("pinfm_rec")


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm so a log line never tears an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if _state.bars:
                from tqdm import tqdm

                tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + "\n")
                self.flush()
        except Exception:  # pragma: no cover
            self.handleError(record)


class _Buffer(logging.handlers.MemoryHandler):
    """Records logged before the run's log file exists (the newest ``capacity``), written into it
    by ``attach_run_log``."""

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        if len(self.buffer) > self.capacity:
            del self.buffer[0]
        return False


def _route_torch_loggers() -> None:
    """torch's own loggers (``[rank0]:W... torch/fx/...``) print to stderr and do not propagate:
    send them through the root logger's handlers (log file; console when verbose) instead."""
    for name in list(logging.root.manager.loggerDict):
        if name != "torch" and not name.startswith("torch."):
            continue
        lg = logging.getLogger(name)
        streams = [h for h in lg.handlers if type(h) is logging.StreamHandler]
        for h in streams:
            lg.removeHandler(h)
        if streams:
            lg.propagate = True


def configure(verbose: bool = False) -> None:
    """Install the console handler and capture everything else until ``attach_run_log``.

    Root level INFO (libraries' INFO records reach the log file), Python warnings become log
    records (``py.warnings``), torch's own stderr handlers are routed through the root logger.
    Idempotent; a second call only changes ``verbose``.
    """
    _state.verbose = verbose
    root = logging.getLogger()
    if not _state.configured:
        for h in list(root.handlers):
            root.removeHandler(h)
        con = _ConsoleHandler(sys.stdout)
        con.addFilter(_ConsoleFilter())
        con.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(con)
        # records before the run dir is known wait here (flushed into the log file when it is)
        buf = _Buffer(capacity=10_000)
        root.addHandler(buf)
        _state.console, _state.buffer, _state.configured = con, buf, True
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _route_torch_loggers()


def attach_run_log(run_dir: str, rank_: Optional[int] = None, save_plan: bool = True) -> str:
    """Log every record (INFO and up, all libraries) to ``<run_dir>/log.txt`` (rank r > 0:
    ``log.rank<r>.txt``), appending; records buffered since ``configure`` are written first.
    Replaces a previous run's file handler. ``save_plan``: ``show_plan`` writes plan.txt /
    plan.json into ``run_dir``. Returns the path."""
    if not _state.configured:
        configure(_state.verbose)
    _state.plan_dir = run_dir if save_plan else ""
    r = rank() if rank_ is None else rank_
    path = os.path.join(run_dir, "log.txt" if r == 0 else f"log.rank{r}.txt")
    if _state.file is not None and _state.log_path == path:
        return path
    os.makedirs(run_dir, exist_ok=True)
    fh = logging.FileHandler(path, mode="a", encoding="utf-8")
    fh.setFormatter(logging.Formatter(LOG_FORMAT.format(rank=r)))
    root = logging.getLogger()
    if _state.file is not None:
        root.removeHandler(_state.file)
        _state.file.close()
    if _state.buffer is not None:
        _state.buffer.setTarget(fh)
        _state.buffer.flush()
        root.removeHandler(_state.buffer)
        _state.buffer = None
    root.addHandler(fh)
    _route_torch_loggers()  # torch loggers created since configure()
    _state.file, _state.log_path = fh, path
    return path


def log_exception(exc: BaseException, what: str = "failed") -> None:
    """The full traceback of ``exc`` into the log file only (the console gets one line)."""
    logging.getLogger("pinfm_rec.cli").error("%s: %s", what, exc, exc_info=exc, extra={_FILE_ONLY: True})


def echo(msg: str = "") -> None:
    """A console line on rank 0 (written above any progress bar), also in the log file."""
    logging.getLogger("pinfm_rec.console").info("%s", msg, extra={_ECHO: True})
    if not is_main():
        return
    if _state.bars:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


class Progress:
    """A progress bar on rank 0: tqdm on a terminal; without one (CI, scheduler logs) a plain line
    at most every ``PLAIN_INTERVAL_S`` seconds and at ``close`` (when ``leave``)."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, leave: bool = True) -> None:
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.n = initial
        self.t0 = self.last = time.perf_counter()
        self.postfix: Dict[str, str] = {}
        self.enabled = is_main()
        self._bar = None
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                             file=sys.stdout, dynamic_ncols=True, position=len(_state.bars))
        if self.enabled:
            _state.bars.append(self)

    def set_postfix(self, **values) -> None:
        self.postfix = {k: _fmt(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix_str(), refresh=False)

    def _postfix_str(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.postfix.items())

    def _line(self) -> str:
        dt = time.perf_counter() - self.t0
        tail = f" {self._postfix_str()}" if self.postfix else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}s [{dt:.1f}s]{tail}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= PLAIN_INTERVAL_S:
            self.last = time.perf_counter()
            print(self._line(), flush=True)

    def close(self) -> None:
        if not self.enabled or self not in _state.bars:
            return
        _state.bars.remove(self)
        if self._bar is not None:
            self._bar.close()
        elif self.leave:
            print(self._line(), flush=True)
        logging.getLogger("pinfm_rec.console").info("%s", self._line())


def track(items: Iterable, desc: str, max_items: int = 0, unit: str = "batch") -> Iterator:
    """Yield the items of ``items`` (the first ``max_items`` when > 0) under a transient progress
    bar (an evaluation's batches)."""
    total = len(items) if hasattr(items, "__len__") else max_items
    total = min(total, max_items) if max_items else total
    bar = Progress(total, desc, unit=unit, leave=False)
    try:
        for i, x in enumerate(items):
            if i >= total:
                break
            yield x
            bar.update()
    finally:
        bar.close()


def metrics_line(metrics: Dict[str, float]) -> str:
    """``hr@10 0.3147  ndcg@10 0.2111 ...`` (counts left out)."""
    names = sorted((k for k in metrics if k not in SKIP_METRICS), key=_metric_order)
    return "  ".join(f"{k} {_fmt(float(metrics[k]))}" for k in names)


def table(headers: Sequence[str], rows: Sequence[Sequence], indent: str = "  ") -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) and rows for i in range(len(headers))]

    def line(vals):
        return indent + "  ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                                  for i, (v, w) in enumerate(zip(vals, widths))).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths])] + [line(r) for r in cells])


def plan_table(rows: Sequence[dict]) -> str:
    """The sharding plan (``parallel.plan_rows``): table, sharding type, ranks, rows x dim, MB per rank."""
    return table(["table", "sharding", "ranks", "rows x dim", "weights MB/rank"],
                 [[r["table"], r["sharding_type"], ",".join(map(str, r["ranks"])),
                   f"{r['rows']} x {r['dim']}",
                   " ".join(f"{mb:.3g}" for mb in r["mb_per_rank"].values())] for r in rows])


def save_plan(run_dir: str, rows: Sequence[dict], world_size: int) -> None:
    """``plan.json`` (the rows) and ``plan.txt`` (the table) in the run dir (rank 0)."""
    if not is_main():
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "plan.json"), "w") as f:
        json.dump({"world_size": world_size, "tables": list(rows)}, f, indent=1)
    with open(os.path.join(run_dir, "plan.txt"), "w") as f:
        f.write(f"sharding plan, world size {world_size}\n{plan_table(rows)}\n")


def show_plan(rows: Sequence[dict], world_size: int, device: str) -> None:
    """Header lines about placement: device, world size and the sharding plan table; the plan is
    also saved in the attached run dir (``attach_run_log``)."""
    echo(f"device {device}, world size {world_size}; sharding plan:")
    echo(plan_table(rows))
    if _state.plan_dir:
        save_plan(_state.plan_dir, rows, world_size)


SKIP_METRICS = ("count", "requests")


def _metric_order(name: str):
    base, _, k = name.partition("@")
    return (base, int(k) if k.isdigit() else 0)


def result_table(results: Dict[str, object]) -> str:
    """``valid_<metric>`` / ``test_<metric>`` entries of a results dict as metric x split rows."""
    splits = [s for s in ("valid", "test") if any(k.startswith(s + "_") for k in results)]
    names = sorted({k.split("_", 1)[1] for k in results if k.split("_", 1)[0] in splits} - set(SKIP_METRICS),
                   key=_metric_order)
    rows = [[n] + [float(results.get(f"{s}_{n}", float("nan"))) for s in splits] for n in names]
    return table(["metric"] + splits, rows)


def run_header(command: str, spec_path: str, run_dir: str) -> None:
    """First console line of a run: what runs, from which spec, where it writes."""
    log = f" (log: {os.path.basename(_state.log_path)})" if _state.log_path else ""
    echo(f"pinfm {command}: spec {spec_path} -> {run_dir}/{log}")


def reset() -> None:
    """Undo ``configure`` / ``attach_run_log`` (tests that run the CLI in-process)."""
    root = logging.getLogger()
    for h in (_state.console, _state.buffer, _state.file):
        if h is not None:
            root.removeHandler(h)
            h.close()
    for bar in list(_state.bars):
        bar.close()
    logging.captureWarnings(False)
    _state.__init__()

"""The `pinfm` command line without training: help texts, one-line errors with exit codes, --debug,
the run's log file, spec kinds, and no cli <-> train import circle."""
import logging
import os
import re

import pytest

import pinfm_rec.train.pretrain as pretrain_mod
from pinfm_rec import cli, console
from pinfm_rec.errors import (
    CheckpointError,
    DataError,
    DeviceError,
    EncoderError,
    Preempted,
    RunDirLockedError,
    SpecError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "specs", "pretrain", "synthetic-tiny.yaml")
FT_TINY = os.path.join(ROOT, "specs", "finetune", "synthetic-tiny.yaml")


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    console.reset()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage = " ".join(out.split("\n\n")[0].split())  # the usage "line" (argparse may wrap it)
    for name, *_ in cli.COMMANDS:
        assert name in usage, (name, usage)
    assert "prepare-ranking" in out.splitlines()[[i for i, l in enumerate(out.splitlines()) if l.startswith("pinfm {")][0]]


@pytest.mark.parametrize("name", [c[0] for c in cli.COMMANDS])
def test_subcommand_help_has_description_and_example(name, capsys):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    description = [c[3] for c in cli.COMMANDS if c[0] == name][0]
    assert " ".join(description.split()[:6]) in " ".join(out.split())
    example = out.split("example:")[1].strip()
    assert example.startswith(f"pinfm {name}"), out
    assert "--debug" in out and "--verbose" in out
    if name == "smoke":
        assert f"default: {cli.SMOKE_SPEC}" in " ".join(out.split())


@pytest.mark.parametrize("name", [c[0] for c in cli.COMMANDS if c[0] != "smoke"])
def test_spec_is_required(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name])
    assert e.value.code == 2
    assert "the following arguments are required: --spec" in capsys.readouterr().err


def test_options_and_overrides_in_any_order(capsys):
    args = cli.parse_args(["pretrain", "a.b=1", "--cpu", "c.d=2", "--debug", "--spec", "x.yaml", "e=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"] and args.cpu and args.debug and args.spec == "x.yaml"
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["pretrain", "--spec", "x.yaml", "a=1", "--nope"])
    assert e.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def _raise(exc):
    def fn(*a, **k):
        raise exc
    return fn


EXPECTED = [
    (SpecError("train.epochs: must be >= 1, got -1"), "spec error"),
    (DataError("data/x.csv:7: bad timestamp 'abc'"), "data error"),
    (CheckpointError("runs/x/checkpoints/step_00000010: truncated"), "checkpoint error"),
    (RunDirLockedError("runs/x is held by host h pid 42"), "run locked"),
    (EncoderError("encoder.checkpoint: vocabulary 800 != 600"), "encoder error"),
    (DeviceError("parallel.backend=nccl needs CUDA"), "device error"),
    (FileNotFoundError(2, "No such file or directory", "/data/ml-1m/ratings.dat"), "file not found"),
]


@pytest.mark.parametrize("exc,kind", EXPECTED, ids=[k for _, k in EXPECTED])
def test_expected_errors_are_one_line_exit_2_traceback_in_log(exc, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain_mod, "pretrain", _raise(exc))
    rc = cli.main(["pretrain", "--spec", TINY, f"run_dir={tmp_path}/run"])
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pinfm: {kind}: "), cap.err
    msg = "/data/ml-1m/ratings.dat: No such file or directory" if kind == "file not found" else str(exc)
    assert msg in lines[0]
    assert "Traceback" not in cap.err + cap.out
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log and "in fn\n    raise exc" in log
    if kind not in ("spec error", "file not found"):
        assert f"traceback in {tmp_path}/run/log.txt" in lines[0]


def test_multiline_message_is_joined_into_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain_mod, "pretrain", _raise(DataError("first problem\n  second problem\n")))
    assert cli.main(["pretrain", "--spec", TINY, f"run_dir={tmp_path}/run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pinfm: data error: first problem | second problem (traceback in {tmp_path}/run/log.txt)"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_anywhere_reraises(where, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_mod, "pretrain", _raise(DataError("bad row")))
    args = ["pretrain", "--spec", TINY, f"run_dir={tmp_path}/run"]
    args = ["--debug"] + args if where == "before" else args + ["--debug"]
    with pytest.raises(DataError, match="bad row"):
        cli.main(args)


@pytest.mark.parametrize("signum,code", [(2, 130), (15, 143)])
def test_preempted_exits_with_its_code(signum, code, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain_mod, "pretrain",
                        _raise(Preempted("SIGTERM at step 12: checkpoint step_00000012 written", signum)))
    assert cli.main(["pretrain", "--spec", TINY, f"run_dir={tmp_path}/run"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pinfm: preempted: SIGTERM at step 12: checkpoint step_00000012 written"]


def test_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_mod, "pretrain", _raise(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["pretrain", "--spec", TINY, f"run_dir={tmp_path}/run"])
    assert "ZeroDivisionError: a bug" in (tmp_path / "run" / "log.txt").read_text()


def test_real_spec_error_from_an_override(tmp_path, capsys):
    assert cli.main(["pretrain", "--spec", TINY, "data.batch_size=0", f"run_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pinfm: spec error: ") and "data.batch_size" in err[0]


@pytest.mark.parametrize("override, key", [("parallel.embedding_optimizer=adam", "parallel.embedding_optimizer"),
                                           ("parallel.backend=nccl", "parallel.backend")])
@pytest.mark.parametrize("command", ["pretrain", "smoke"])
def test_what_the_device_cannot_run_is_one_line_before_the_run_dir(command, override, key, tmp_path, capsys):
    # e.g. the GPU recipes' adam tables on a CPU host: refused before any work, with the fix named
    args = [command, "--cpu", "--spec", TINY, override, f"run_dir={tmp_path}/run"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pinfm: device error: key '{key}': "), err
    assert ("parallel.embedding_optimizer=rowwise_adagrad" if "adam" in override else "backend=auto") in err[0]
    assert not (tmp_path / "run").exists()


def test_missing_spec_file(capsys):
    assert cli.main(["pretrain", "--spec", "no/such/spec.yaml"]) == 2
    assert capsys.readouterr().err.strip().startswith("pinfm: file not found: no/such/spec.yaml")


def test_eval_without_checkpoint_is_a_checkpoint_error_and_creates_no_run_dir(tmp_path, capsys):
    assert cli.main(["eval", "--spec", TINY, f"run_dir={tmp_path}/none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pinfm: checkpoint error: ") and "no complete checkpoint" in err
    assert not (tmp_path / "none").exists()


def test_library_records_go_to_the_log_file_not_the_console(tmp_path, capsys):
    console.configure(verbose=False)
    logging.getLogger("torchrec.distributed.planner.stats").info("# planner stats line")
    logging.getLogger("pinfm_rec.train").info("resolved spec: ...")
    logging.getLogger("pinfm_rec.train").warning("checkpoint step_8 corrupt, skipped")
    import warnings

    warnings.warn("a library FutureWarning", FutureWarning)
    path = console.attach_run_log(str(tmp_path / "run"))  # earlier records are flushed into it
    logging.getLogger("root").info("[TBE=1] SplitTableBatchedEmbeddingBagsCodegen Arguments: ...")
    out = capsys.readouterr().out
    assert out.strip().splitlines() == ["WARNING pinfm_rec.train: checkpoint step_8 corrupt, skipped"]
    log = open(path).read()
    for text in ("# planner stats line", "resolved spec", "corrupt, skipped", "a library FutureWarning", "[TBE=1]"):
        assert text in log, text


def test_cpp_warnings_quiet_unless_verbose(tmp_path, monkeypatch):
    """c10/FBGEMM C++ warnings bypass Python logging: the CLI sets TORCH_CPP_LOG_LEVEL (before torch
    loads in a fresh process) unless --verbose or the user chose a level."""
    monkeypatch.setattr(pretrain_mod, "pretrain", _raise(DataError("x")))
    for argv, preset, want in ((["--verbose"], None, None), ([], None, "ERROR"), ([], "INFO", "INFO")):
        if preset is None:
            monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
        else:
            monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", preset)
        cli.main(argv + ["pretrain", "--spec", TINY, f"run_dir={tmp_path}/run"])
        assert os.environ.get("TORCH_CPP_LOG_LEVEL") == want
        console.reset()


def test_verbose_shows_library_records(tmp_path, capsys):
    console.configure(verbose=True)
    logging.getLogger("torchrec.distributed.planner.stats").info("# planner stats line")
    assert "# planner stats line" in capsys.readouterr().out


def test_spec_kind_and_run_dir_as_spec(tmp_path):
    assert cli.spec_kind(TINY) == "pretrain" and cli.spec_kind(FT_TINY) == "finetune"
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(open(FT_TINY).read())
    assert cli.resolve_spec_path(str(run)) == str(run / "spec.yaml")
    assert cli.resolve_spec_path("pretrain/synthetic-tiny") == TINY
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="YAML mapping"):
        cli.spec_kind(str(tmp_path / "list.yaml"))


def test_tables():
    t = console.result_table({"valid_hr@10": 0.5, "test_hr@10": 0.25, "valid_hr@200": 0.9, "test_hr@200": 0.8,
                              "valid_count": 1500.0, "test_count": 1500.0, "steps": 3})
    rows = [l.split() for l in t.splitlines()]
    assert rows[0] == ["metric", "valid", "test"]
    assert rows[2] == ["hr@10", "0.5", "0.25"] and rows[3] == ["hr@200", "0.9", "0.8"] and len(rows) == 4
    assert console.metrics_line({"ndcg@10": 0.2, "hr@50": 0.4, "hr@10": 0.3, "count": 9.0}) == \
        "hr@10 0.3  hr@50 0.4  ndcg@10 0.2"


def test_train_package_does_not_import_the_cli():
    """cli -> train only (issue 16.3: smoke used to import cli.resolve_spec_path)."""
    train_dir = os.path.join(ROOT, "pinfm_rec", "train")
    for name in os.listdir(train_dir):
        if name.endswith(".py"):
            src = open(os.path.join(train_dir, name)).read()
            assert not re.search(r"pinfm_rec\.cli|from pinfm_rec import .*\bcli\b", src), name


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", readme.split("## The two commands")[1].split("\n## ")[0], re.S)
    commands = [l for b in blocks for l in b.splitlines() if l and not l.startswith("#")]
    assert commands == [
        "bash scripts/setup.sh && .venv/bin/pinfm pretrain --spec specs/pretrain/synthetic-tiny.yaml",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -q -ra tests",
    ]
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert commands[1] in ci
    assert "shared/" not in readme  # the GPU install needs nothing outside the repository
    assert os.access(os.path.join(ROOT, "scripts", "gpu", "stage-gpu-wheels"), os.X_OK)


def test_pyproject_license_is_an_spdx_string_and_k8s_extra_exists():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["license"] == "BSD-3-Clause"  # a TOML table makes setuptools warn ~38 lines
    assert any(d.startswith("kubernetes") for d in meta["project"]["optional-dependencies"]["k8s"])


def test_records_before_the_run_dir_are_bounded_then_written(tmp_path):
    console.configure()
    log = logging.getLogger("pinfm_rec.data")
    for i in range(10_005):
        log.info("record %d", i)
    path = console.attach_run_log(str(tmp_path / "run"))
    text = open(path).read()
    assert "record 10004" in text and "record 3\n" not in text and text.count("record ") <= 10_001

"""The tests a cut GPU suite run did not reach, run now (gpu-suite.md run 7: the whole suite in one
10-minute call reached 94 %). Usage, on the GPU host in the repo root, after ``round.sh suite``:

    python3 scripts/gpu/suite_rest.py LOG [pytest args...]   # e.g. -n 16 --dist worksteal
    python3 scripts/gpu/suite_rest.py --failed LOG [pytest args...]

Collects the suite (``pytest --collect-only -q tests``), drops every node id that LOG (a
``pytest -v`` log, xdist or not) names with an outcome, and runs the rest with ``-v -ra``; prints
how many were left. ``--failed``: runs the ids LOG names FAILED or ERROR instead (``round.sh suite``
runs them again in one process: a parallel-run artefact or a real failure). Node ids may hold
spaces (parametrised ids), so they are read and compared whole (the ``-ra`` summary lines, which
append `` - message``, are not read). Exit status: pytest's (0 when nothing was left).
"""

from __future__ import annotations

import re
import subprocess
import sys

_KINDS = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# xdist: "[gw3] [ 41%] PASSED tests/...::id "; one process: "tests/...::id PASSED   [ 41%]"
OUTCOME_XDIST = re.compile(rf"\] ({_KINDS}) (tests/\S.*?)\s*$")
OUTCOME_SERIAL = re.compile(rf"^(tests/\S.*?) ({_KINDS})\s*(?:\[ *\d+%\])?\s*$")


def _outcome_lines(log_text: str):
    """(outcome, node id) of every line of the -v log that names a test with an outcome."""
    for line in log_text.splitlines():
        m = OUTCOME_XDIST.search(line)
        if m:
            yield m.group(1), m.group(2)
            continue
        m = OUTCOME_SERIAL.match(line)
        if m:
            yield m.group(2), m.group(1)


def done_ids(log_text: str) -> set[str]:
    """Node ids the -v log names with an outcome."""
    return {nid for _, nid in _outcome_lines(log_text)}


def failed_ids(log_text: str) -> list[str]:
    """Node ids the -v log names FAILED or ERROR (a teardown ERROR after a PASSED call too), once each."""
    return list(dict.fromkeys(nid for kind, nid in _outcome_lines(log_text) if kind in ("FAILED", "ERROR")))


def collected(args=("tests",)) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failed_only = argv[0] == "--failed"
    if failed_only:
        argv = argv[1:]
    log, extra = argv[0], argv[1:]
    text = open(log, errors="replace").read()
    if failed_only:
        left = failed_ids(text)
        print(f"suite_rest: {len(left)} failed or erred in {log}", flush=True)
    else:
        done = done_ids(text)
        left = [i for i in collected() if i not in done]
        print(f"suite_rest: {len(done)} ids in {log}, {len(left)} left", flush=True)
    if not left:
        return 0
    import pytest
    return int(pytest.main(["-v", "-ra", "--durations=15", "-p", "no:cacheprovider", *extra, *left]))


if __name__ == "__main__":
    sys.exit(main())

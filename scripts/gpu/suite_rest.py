"""The tests a cut GPU suite run did not reach, run now (gpu-suite.md run 7: the whole suite in one
10-minute call reached 94 %). Usage, on the GPU host in the repo root, after ``round.sh suite``:

    python3 scripts/gpu/suite_rest.py LOG [pytest args...]   # e.g. -n 16 --dist worksteal

Collects the suite (``pytest --collect-only -q tests``), drops every node id that LOG (a
``pytest -v`` log, xdist or not) names with an outcome, and runs the rest with ``-v -ra``; prints
how many were left. Node ids may hold spaces (parametrised ids), so they are compared whole.
Exit status: pytest's (0 when nothing was left).
"""

from __future__ import annotations

import re
import subprocess
import sys

_KINDS = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# xdist: "[gw3] [ 41%] PASSED tests/...::id "; one process: "tests/...::id PASSED   [ 41%]"
OUTCOME_XDIST = re.compile(rf"(?:^|\] )(?:{_KINDS}) (tests/\S.*?)\s*$")
OUTCOME_SERIAL = re.compile(rf"^(tests/\S.*?) (?:{_KINDS})\s*(?:\[ *\d+%\])?\s*$")


def done_ids(log_text: str) -> set[str]:
    """Node ids the -v log names with an outcome."""
    done = set()
    for line in log_text.splitlines():
        m = OUTCOME_XDIST.search(line) or OUTCOME_SERIAL.match(line)
        if m:
            done.add(m.group(1))
    return done


def collected(args=("tests",)) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *args], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    log, extra = argv[0], argv[1:]
    done = done_ids(open(log, errors="replace").read())
    left = [i for i in collected() if i not in done]
    print(f"suite_rest: {len(done)} ids in {log}, {len(left)} left", flush=True)
    if not left:
        return 0
    import pytest
    return int(pytest.main(["-v", "-ra", "--durations=15", "-p", "no:cacheprovider", *extra, *left]))


if __name__ == "__main__":
    sys.exit(main())

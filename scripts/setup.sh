#!/usr/bin/env bash
# Create .venv with the pinned CPU stack and pinfm_rec installed editable. Idempotent.
set -euo pipefail
# -qq: pip prints errors only (a machine's pip config may add a warning per package otherwise)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -qq --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -qq setuptools wheel
.venv/bin/python -m pip install -qq -r requirements-cpu.txt
.venv/bin/python -m pip install -qq --no-deps torchrec==1.8.0
# the k8s extra, pinned: tests/test_components.py dry-runs `torchx run -s kubernetes`
.venv/bin/python -m pip install -qq kubernetes==33.1.0
# (setuptools' note on editable installs with a package-dir mapping is informational only)
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -qq --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, torchrec, fbgemm_gpu, pinfm_rec.kernels; print('pinfm_rec env ready: torch', torch.__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0')"

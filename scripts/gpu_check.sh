#!/usr/bin/env bash
# The device check for a session lent a GPU, in one call of the `device` tool:
#   run(command="bash scripts/gpu_check.sh", timeout_s=600)
# That machine has its own python3 with torch, nvcc, ninja, pytest and transformers, but no network
# and no grpcio-tools, so this builds the extension's kernels only (no gRPC stubs), for Hopper unless
# TORCH_CUDA_ARCH_LIST says otherwise, and runs every test marked `cuda`: each op against its
# plain-torch reference and the CPU op, the decoder against the CPU decoder, the engine on CUDA
# against the engine on CPU. The log is also written to $OUT/gpu_check.log when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  start=$(date +%s)
  MISTRAL_GRPC_PROTO_STUBS=0 MISTRAL_GRPC_CUDA="${MISTRAL_GRPC_CUDA:-1}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py -q build_ext --inplace || { echo "gpu_check: the build failed"; exit 1; }
  echo "gpu_check: built in $(( $(date +%s) - start )) s"
  # A module whose imports this machine lacks (xgrammar) is reported, not fatal.
  PYTHONPATH=python "$PY" -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors \
    tests/ops tests/model tests/engine/test_sampler.py tests/engine/test_engine.py
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The checks that need CUDA GPUs and NCCL (tests/gpu/test_gpu.py): the NCCL reduce ops
# (AVG, PREMUL_SUM; flat and hierarchical, with replicas and two-hop accumulation) against
# the single-process reference, CPU offload (states on the host, GPU copies freed), and the
# Trainer's GPU-only idioms (sync_batchnorm vs DDP, setup peak memory, fit -> test -> fit).
#
# Usage (from anywhere):  tests/gpu/run_gpu_checks.sh [pytest args]
# Needs a CUDA build of torch (PYTHON=... to pick the interpreter; default .venv/bin/python).
# Uses every GPU up to 8: 1 GPU runs world 1 only; multi-rank reductions need >= 2 GPUs,
# the hierarchical reduce-scatter >= 4. Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi -L || true
"$PYTHON" -c 'import torch, torch.distributed as d; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "gpus", torch.cuda.device_count(), "nccl", d.is_nccl_available())'
exec "$PYTHON" -m pytest tests/gpu -v -rs -p no:cacheprovider "$@"

#!/usr/bin/env bash
# The GPU checks of issues 17 and 18 as one script for a lent GPU (about 10 minutes on an
# H100/H200): the GPU tests, the training-step benchmark with and without the fast path, the
# sampling benchmark and the perceptual-loss cost. JSON rows go to ${OUT:-benchmarks/out}/;
# copy the tables into benchmarks/RESULTS.md.
#   make install && bash benchmarks/run_gpu.sh
set -euo pipefail
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 300 $py -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$out/pytest_gpu.txt" || true
timeout 300 $py -m benchmarks.train_step --batch-size 8 --out "$out/train_step.json" || true
timeout 400 $py -m benchmarks.train_step --batch-size 8 --compile --out "$out/train_step_compile.json" || true
timeout 300 $py -m benchmarks.sampling --batch-size 4 --out "$out/sampling.json" || true
timeout 300 $py -m benchmarks.perceptual_step --batch-size 4 --out "$out/perceptual.json" || true

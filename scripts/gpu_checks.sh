#!/usr/bin/env bash
# The GPU checks, run once on a lent GPU machine (see docs/devices.md): install what its image
# lacks from carried wheels (.gpu/), then the `gpu` tests and the GPU benchmark. Output goes
# to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
PY=${PY:-python3}
{
  nvidia-smi -L
  $PY -m pip install -q --no-deps --no-index .gpu/*.whl 2>&1 | tail -3
  # datasets (imported by TransformerLens) needs a recent pyarrow; an older one is carried in
  # .gpu/alt for an image whose pyarrow is older
  $PY -c "import datasets" 2>/dev/null || $PY -m pip install -q --no-deps --no-index .gpu/alt/*.whl 2>&1 | tail -3
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|transformer.lens|datasets|pyarrow) "
  $PY -c "import torch, transformer_lens; print('torch', torch.__version__, 'TL', transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else '?', 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/setup.log"
start=$(date +%s)
$PY -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests/engine/test_devices.py tests/experiments/test_lm_edges_required.py -rA 2>&1 | tee "$OUT/gpu_tests.log"
echo "gpu tests: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu_tests.log"
start=$(date +%s)
$PY benchmarks/bench_gpu.py --tokens "${TOKENS:-100000}" 2>&1 | tee "$OUT/bench_gpu.log"
echo "benchmark: $(( $(date +%s) - start )) s" | tee -a "$OUT/bench_gpu.log"
start=$(date +%s)
$PY benchmarks/gram_variants_gpu.py 2>&1 | tee "$OUT/gram_variants.log"
echo "gram variants: $(( $(date +%s) - start )) s" | tee -a "$OUT/gram_variants.log"

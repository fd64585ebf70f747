#!/usr/bin/env bash
# Issue 14, runs 27-28: FlashAttention-4 (PyPI flash-attn-4, CuTe DSL, with a Hopper forward) against
# the engine's attention kernels at its shapes, alone (benchmarks/gpu/attention_probe.py).
# Its wheels (~100 MB, the CUTLASS DSL's compiler alone 92 MB) are over one call's 64 MiB carry,
# so they reach the GPU machine in two calls, both halves into /tmp/fa4 there:
#   here:   benchmarks/gpu/run_issue14_fa4.sh --stage     (downloads, splits into .fa4a/ .fa4b/)
#   call 1: carry .fa4a:  mkdir -p /tmp/fa4 && cp .fa4a/* /tmp/fa4/
#   call 2: carry .fa4b, while the machine is still warm:
#           cp .fa4b/* /tmp/fa4/ && [PART=model] benchmarks/gpu/run_issue14_fa4.sh OUT_DIR TAG
# PART=probe (runs 27-28): attention_probe.py; PART=model (run 29): the GPU tests, then
# model_alone.py with EngineConfig.varlen_kernel "flash" (today's) and "fa4" side by side.
set -euo pipefail
CU13=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
if [ "${1:-}" = --stage ]; then
  PIP=${PIP:-.venv/bin/pip}
  rm -rf .fa4a .fa4b /tmp/fa4-stage && mkdir -p .fa4a .fa4b /tmp/fa4-stage
  for p in flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
      apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5; do
    "$PIP" download -q --no-deps "$p" -d /tmp/fa4-stage --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --only-binary=:all:
  done
  split -b 46M "/tmp/fa4-stage/$CU13" .fa4a/libs_cu13.part.
  mv .fa4a/libs_cu13.part.ab .fa4b/
  find /tmp/fa4-stage -name '*.whl' ! -name "$CU13" -exec cp {} .fa4b/ \;
  du -sh .fa4a .fa4b
  exit 0
fi
OUT=${1:?output folder}; TAG=${2:-run}
PY=${PYTHON:-python3}
cat /tmp/fa4/libs_cu13.part.* > "/tmp/fa4/$CU13"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4site /tmp/fa4/*.whl
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
# the DSL's own .pth puts its packages on the path: a site directory, not a plain path entry
echo "import site; site.addsitedir('/tmp/fa4site')" > "$SITE/ugt_fa4.pth"
(cd / && "$PY" -c 'import algorithm' 2>/dev/null) || echo "$PWD" > "$SITE/ugt_repo.pth"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ "${PART:-probe}" = probe ]; then  # runs 27-28: the kernels alone
  "$PY" benchmarks/gpu/attention_probe.py --out "$OUT/gpu_issue14_${TAG}_attention.json" 2>&1 \
    | tee "$OUT/gpu_issue14_${TAG}_attention.log"
else  # run 29 (PART=model): the GPU tests (FA4's included), then the engine with each kernel
  PYTHONPATH=. timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider algorithm/serving/tests/test_gpu.py \
    2>&1 | tail -25 | tee "$OUT/gpu_issue14_${TAG}_tests.txt" || true
  E='"dtype":"bf16","gelu":"tanh_fused"'
  GPU_SCRIPT=benchmarks/gpu/model_alone.py benchmarks/gpu/run_gpu.sh --out "$OUT/gpu_issue14_${TAG}_model.json" --rounds 5 \
    --breakdown --no-pieces --variants "{\"flash\":{$E},\"fa4\":{$E,\"varlen_kernel\":\"fa4\"}}" \
    2>&1 | tee "$OUT/gpu_issue14_${TAG}_model.log"
fi

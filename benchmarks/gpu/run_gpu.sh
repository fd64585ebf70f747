#!/usr/bin/env bash
# The GPU benchmark on the GPU machine, from the repository root:
#   benchmarks/gpu/run_gpu.sh --parts ceilings,model,server,extras --out $OUT/gpu_h100.json
#   GPU_SCRIPT=benchmarks/gpu/tune_gpu.py benchmarks/gpu/run_gpu.sh --out $OUT/tune_h100.json
# Wheels that machine lacks (nvidia-pytriton, tritonclient, python-rapidjson) come in .whl/
# (pip download ... -d .whl, see benchmarks/RESULTS.md); they are installed into /tmp/site and
# made importable through .pth files, because the python-backend stub ignores PYTHONPATH.
set -euo pipefail
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
  echo /tmp/site > "$SITE/ugt_carried.pth"
  VER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  LIBDIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
  STUB=/tmp/site/pytriton/tritonserver/python_backend_stubs/$VER/triton_python_backend_stub
  [ -f "$STUB" ] && { echo "stub libs:"; LD_LIBRARY_PATH=$LIBDIR:/tmp/site/nvidia_pytriton.libs ldd "$STUB" | grep -E "not found|python" || true; }
fi
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
(cd / && "$PY" -c 'import algorithm' 2>/dev/null) || echo "$PWD" > "$SITE/ugt_repo.pth"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# GPU_SCRIPT picks another script of this folder with the same set-up (e.g. tune_gpu.py)
exec "$PY" "${GPU_SCRIPT:-benchmarks/gpu/run_gpu.py}" "$@"
